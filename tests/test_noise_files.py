"""Reading noise files safely: formats by magic bytes, weights-only pickles, corrupt files, listing."""

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from terd_scan.noise_files import (
    FORMAT_EMPTY, FORMAT_NPY, FORMAT_NPZ, FORMAT_PICKLE, FORMAT_SAFETENSORS, FORMAT_TORCH_ZIP,
    FORMAT_UNKNOWN, NoiseFileError, UnsafeNoiseFileError, list_noise_files, pickle_globals,
    read_noise_file, sniff_format,
)
from terd_scan.errors import ScanError, UnsafeFileError

SHAPE = (3, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small memory-bound ops


class Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tensors(entries):
    return {nt.key: nt.tensor for nt in entries}


# ---------------------------------------------------------------- formats

def test_safetensors_single_batch_and_multikey(tmp_path):
    a, b = torch.randn(SHAPE), torch.randn(5, *SHAPE)
    save_file({"noise": a}, tmp_path / "one.safetensors")
    save_file({"b": b, "a": a}, tmp_path / "multi.safetensors")
    assert sniff_format(tmp_path / "one.safetensors") == FORMAT_SAFETENSORS
    got = _tensors(read_noise_file(tmp_path / "one.safetensors"))
    assert torch.equal(got["noise"], a)
    got = read_noise_file(tmp_path / "multi.safetensors")
    assert [nt.key for nt in got] == ["a", "b"]
    assert torch.equal(got[1].tensor, b)


def test_npy_plain_fortran_bigendian_float16(tmp_path):
    x = np.random.randn(4, *SHAPE)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    np.save(tmp_path / "be.npy", x.astype(">f4"))
    np.save(tmp_path / "h.npy", x.astype(np.float16))
    for name in ("a", "f", "be", "h"):
        assert sniff_format(tmp_path / f"{name}.npy") == FORMAT_NPY
        (nt,) = read_noise_file(tmp_path / f"{name}.npy")
        assert nt.key is None and nt.error is None
        tol = 1e-2 if name == "h" else 1e-6
        np.testing.assert_allclose(nt.tensor.double().numpy(), x, atol=tol, rtol=tol)


def test_npz_multi_key(tmp_path):
    x, y = np.random.randn(*SHAPE).astype(np.float32), np.random.randn(2, *SHAPE).astype(np.float32)
    np.savez(tmp_path / "n.npz", first=x, second=y)
    np.savez_compressed(tmp_path / "c.npz", only=y)
    assert sniff_format(tmp_path / "n.npz") == FORMAT_NPZ
    got = _tensors(read_noise_file(tmp_path / "n.npz"))
    assert set(got) == {"first", "second"}
    assert np.array_equal(got["first"].numpy(), x) and np.array_equal(got["second"].numpy(), y)
    assert np.array_equal(_tensors(read_noise_file(tmp_path / "c.npz"))["only"].numpy(), y)


def test_torch_tensor_dict_list_and_legacy(tmp_path):
    x = torch.randn(2, *SHAPE)
    torch.save(x, tmp_path / "t.pt")
    torch.save({"k": x, "j": x[0]}, tmp_path / "d.pth")
    torch.save([x[0], x[1]], tmp_path / "l.pt")
    torch.save(x, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert sniff_format(tmp_path / "t.pt") == FORMAT_TORCH_ZIP
    assert sniff_format(tmp_path / "legacy.pt") == FORMAT_PICKLE
    assert torch.equal(read_noise_file(tmp_path / "t.pt")[0].tensor, x)
    assert set(_tensors(read_noise_file(tmp_path / "d.pth"))) == {"j", "k"}
    assert [nt.key for nt in read_noise_file(tmp_path / "l.pt")] == ["0", "1"]
    assert torch.equal(read_noise_file(tmp_path / "legacy.pt")[0].tensor, x)


def test_format_from_bytes_not_extension(tmp_path):
    x = np.random.randn(*SHAPE).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    os.rename(tmp_path / "x.npy", tmp_path / "x.safetensors")
    assert sniff_format(tmp_path / "x.safetensors") == FORMAT_NPY
    assert np.array_equal(read_noise_file(tmp_path / "x.safetensors")[0].tensor.numpy(), x)
    save_file({"a": torch.from_numpy(x)}, tmp_path / "y.bin")
    assert sniff_format(tmp_path / "y.bin") == FORMAT_SAFETENSORS


def test_non_float_tensor_is_per_key_error(tmp_path):
    save_file({"ints": torch.ones(SHAPE, dtype=torch.int64), "ok": torch.randn(SHAPE)}, tmp_path / "m.safetensors")
    got = {nt.key: nt for nt in read_noise_file(tmp_path / "m.safetensors")}
    assert got["ints"].tensor is None and "not floating point" in got["ints"].error
    assert got["ok"].error is None


# ---------------------------------------------------------------- unsafe pickles

@pytest.mark.parametrize("name", ["evil.pkl", "evil.pt", "evil.npy", "evil.safetensors", "evil.npz"])
def test_raw_pickle_refused_without_running(tmp_path, name):
    marker = tmp_path / "MARKER"
    (tmp_path / name).write_bytes(pickle.dumps({"noise": Evil(marker)}))
    assert sniff_format(tmp_path / name) == FORMAT_PICKLE
    with pytest.raises(UnsafeNoiseFileError) as info:
        read_noise_file(tmp_path / name)
    assert not marker.exists()
    msg = str(info.value)
    assert "refused" in msg and "system" in msg and "\n" not in msg
    assert isinstance(info.value, UnsafeFileError) and isinstance(info.value, ScanError)


def test_torch_zip_with_code_refused_without_running(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"noise": torch.randn(SHAPE), "x": Evil(marker)}, tmp_path / "evil.pt")
    os.rename(tmp_path / "evil.pt", tmp_path / "evil.npz")  # a torch zip renamed .npz is still a torch zip
    assert sniff_format(tmp_path / "evil.npz") == FORMAT_TORCH_ZIP
    assert any("system" in g for g in pickle_globals(tmp_path / "evil.npz"))
    with pytest.raises(UnsafeNoiseFileError):
        read_noise_file(tmp_path / "evil.npz")
    assert not marker.exists()


def test_npy_and_npz_object_arrays_refused(tmp_path):
    marker = tmp_path / "MARKER"
    arr = np.empty(1, dtype=object)
    arr[0] = Evil(marker)
    np.save(tmp_path / "obj.npy", arr, allow_pickle=True)
    np.savez(tmp_path / "obj.npz", bad=arr, good=np.zeros(SHAPE, np.float32))
    with pytest.raises(NoiseFileError, match="Python objects"):
        read_noise_file(tmp_path / "obj.npy")
    got = {nt.key: nt for nt in read_noise_file(tmp_path / "obj.npz")}
    assert "Python objects" in got["bad"].error and got["good"].error is None
    assert not marker.exists()


# ---------------------------------------------------------------- corrupt files

def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) + keep])


@pytest.mark.parametrize("fmt", ["safetensors", "npy", "npz", "pt"])
def test_truncated_files_are_errors(tmp_path, fmt):
    p = tmp_path / f"x.{fmt}"
    x = torch.randn(4, *SHAPE)
    if fmt == "safetensors":
        save_file({"x": x}, p)
    elif fmt == "npy":
        np.save(p, x.numpy())
    elif fmt == "npz":
        np.savez(p, x=x.numpy())
    else:
        torch.save(x, p)
    _truncate(p, -100)  # zips (npz, torch) lose their central directory, the others their data
    with pytest.raises(NoiseFileError) as info:
        read_noise_file(p)
    assert "\n" not in str(info.value) and ("truncated" in str(info.value) or "corrupt" in str(info.value)
                                            or "cannot load" in str(info.value))


def test_header_lies_are_errors(tmp_path):
    # safetensors header length beyond the file
    p = tmp_path / "lie.safetensors"
    save_file({"x": torch.randn(SHAPE)}, p)
    data = bytearray(p.read_bytes())
    data[0:8] = (len(data) + 10).to_bytes(8, "little")
    p.write_bytes(bytes(data))
    with pytest.raises(NoiseFileError):
        read_noise_file(p)
    # npy header claiming a huge array: refused before allocating it
    q = tmp_path / "huge.npy"
    with open(q, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (300_000_000, 3, 8, 8)})
        f.write(np.zeros(SHAPE, np.float32).tobytes())
    with pytest.raises(NoiseFileError, match="truncated npy"):
        read_noise_file(q)


def test_garbage_empty_and_unknown_zip(tmp_path):
    (tmp_path / "g.npy").write_bytes(b"not a noise at all")
    (tmp_path / "e.pt").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    assert sniff_format(tmp_path / "g.npy") == FORMAT_UNKNOWN
    assert sniff_format(tmp_path / "e.pt") == FORMAT_EMPTY
    assert sniff_format(tmp_path / "z.zip") == FORMAT_UNKNOWN
    with pytest.raises(NoiseFileError, match="unknown format"):
        read_noise_file(tmp_path / "g.npy")
    with pytest.raises(NoiseFileError, match="empty"):
        read_noise_file(tmp_path / "e.pt")
    with pytest.raises(NoiseFileError, match="unknown format"):
        read_noise_file(tmp_path / "z.zip")


def test_torch_file_with_non_tensor_payload(tmp_path):
    torch.save(42, tmp_path / "n.pt")
    with pytest.raises(NoiseFileError, match="expected a tensor"):
        read_noise_file(tmp_path / "n.pt")


# ---------------------------------------------------------------- listing

def test_listing_hidden_recursive_exclude(tmp_path):
    (tmp_path / "sub" / ".hid").mkdir(parents=True)
    for rel in ["a.npy", ".DS_Store", "r.json.partial", "sub/b.npy", "sub/.hid/c.npy"]:
        (tmp_path / rel).write_bytes(b"x")
    flat = list_noise_files(tmp_path)
    assert [p.name for p in flat.files] == ["a.npy"]
    assert sorted(p.name for p in flat.skipped) == [".DS_Store", "r.json.partial"]
    rec = list_noise_files(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in rec.files] == ["a.npy", "sub/b.npy"]
    ex = list_noise_files(tmp_path, recursive=True, exclude=(tmp_path / "a.npy",))
    assert [p.name for p in ex.files] == ["b.npy"]
    single = list_noise_files(tmp_path / ".DS_Store")
    assert [p.name for p in single.files] == [".DS_Store"]
    with pytest.raises(ScanError, match="not found"):
        list_noise_files(tmp_path / "missing")


@pytest.mark.parametrize("keylen", [1, 60, 100, 200])
def test_safetensors_whose_header_length_starts_with_0x80(tmp_path, keylen):
    # header lengths of 128..255 bytes make the first byte look like a pickle's 0x80
    p = tmp_path / "k.safetensors"
    save_file({"k" * keylen: torch.randn(SHAPE)}, p)
    assert sniff_format(p) == FORMAT_SAFETENSORS
    assert read_noise_file(p)[0].error is None


def test_npz_member_with_lying_header_is_not_allocated(tmp_path):
    buf = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                               "shape": (10**9, 3, 8, 8)})
    buf.write(np.zeros(SHAPE).tobytes())
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("huge.npy", buf.getvalue())
        with z.open("ok.npy", "w") as f:
            np.lib.format.write_array(f, np.ones(SHAPE, np.float32))
    got = {nt.key: nt for nt in read_noise_file(tmp_path / "bomb.npz")}
    assert "truncated npy data" in got["huge"].error
    assert got["ok"].error is None and float(got["ok"].tensor.sum()) == float(np.prod(SHAPE))


def test_trigger_file_is_not_read_as_noise(tmp_path):
    from terd_scan.trigger import Trigger

    Trigger(r=torch.zeros(SHAPE), gamma=torch.ones(SHAPE)).save(tmp_path / "other_trigger.safetensors")
    with pytest.raises(NoiseFileError, match="trigger file"):
        read_noise_file(tmp_path / "other_trigger.safetensors")
