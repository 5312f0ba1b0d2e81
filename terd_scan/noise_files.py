"""Reading starting-noise files (x_T) safely, for `terd-scan inputs`.

A noise file holds one noise shaped like the model input (C, H, W) or a batch (N, C, H, W); a
safetensors/npz file (or a torch file holding a dict or list) may hold several tensors, one per key.

The format is decided from the file's first bytes, never from its extension:

    safetensors  8-byte little-endian header length, then '{'
    npy          b'\\x93NUMPY'
    npz          a zip ('PK\\x03\\x04') whose members are all *.npy
    torch zip    a zip holding a '<name>/data.pkl' member (torch.save, the default since torch 1.6)
    pickle       0x80 (a raw pickle stream, e.g. torch.save(..., _use_new_zipfile_serialization=False))

Nothing here can run code from a file: safetensors and npy are read by their own parsers, numpy
with allow_pickle=False (object arrays are refused), and every pickle-based file (torch zip, raw
pickle) only through torch.load(weights_only=True), whose restricted unpickler refuses any global
that is not a plain tensor building block *before* calling it. A refused pickle is reported with the
globals it would have imported (found by reading its opcodes, not by running it).

Directory listing (see `list_noise_files`): every regular file is a candidate, whatever its
extension; hidden files and directories (name starting with '.', e.g. .DS_Store, .git) and
temporaries of atomic writes (*.partial, *.tmp) are skipped and counted, not reported as errors.
Anything else that is not a recognised noise format is reported as an error for that file.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import ScanError, UnsafeFileError

FORMAT_SAFETENSORS = "safetensors"
FORMAT_NPY = "npy"
FORMAT_NPZ = "npz"
FORMAT_TORCH_ZIP = "torch-zip"
FORMAT_PICKLE = "pickle"
FORMAT_UNKNOWN = "unknown"
FORMAT_EMPTY = "empty"

NOISE_SUFFIXES = (".safetensors", ".npy", ".npz", ".pt", ".pth")
SKIPPED_SUFFIXES = (".partial", ".tmp")

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
# safetensors headers are JSON; the format caps them at 100 MB.
_SAFETENSORS_MAX_HEADER = 100_000_000


class NoiseFileError(ScanError):
    """A noise file (or one tensor in it) that cannot be scored; reported per file, not fatal."""


class UnsafeNoiseFileError(NoiseFileError, UnsafeFileError):
    """A pickle that would import code when loaded: refused without running it."""


@dataclass
class NoiseTensor:
    """One tensor read from a noise file. `key` is None when the file holds a single unnamed tensor."""

    key: str | None
    tensor: torch.Tensor | None  # None when `error` is set
    error: str | None = None


# --------------------------------------------------------------------------- format detection

def sniff_format(path: str | os.PathLike) -> str:
    """Return the noise-file format of `path` from its magic bytes (one of the FORMAT_* names)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return FORMAT_EMPTY
    if head.startswith(_NPY_MAGIC):
        return FORMAT_NPY
    if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC):
        return _sniff_zip(path)
    # Before the pickle test: a header length of 128..255 makes a safetensors file start with 0x80.
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= _SAFETENSORS_MAX_HEADER and head[8:9] == b"{":
            return FORMAT_SAFETENSORS
    if head[:1] == b"\x80":
        return FORMAT_PICKLE
    return FORMAT_UNKNOWN


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        # A damaged zip: still tell the user what it was meant to be, if the extension says so.
        suffix = path.suffix.lower()
        return FORMAT_NPZ if suffix == ".npz" else FORMAT_TORCH_ZIP if suffix in (".pt", ".pth") else FORMAT_UNKNOWN
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return FORMAT_TORCH_ZIP
    if names and all(n.endswith(".npy") for n in names):
        return FORMAT_NPZ
    if not names and path.suffix.lower() == ".npz":
        return FORMAT_NPZ  # np.savez() with no arrays
    return FORMAT_UNKNOWN


# --------------------------------------------------------------------------- listing

@dataclass
class NoiseListing:
    files: list[Path]  # candidates to read, sorted
    skipped: list[Path]  # hidden files / temporaries, not read


def _is_skipped_name(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(SKIPPED_SUFFIXES)


def list_noise_files(path: str | os.PathLike, recursive: bool = False,
                     exclude: tuple[str | os.PathLike, ...] = ()) -> NoiseListing:
    """List the candidate noise files at `path` (a file or a directory).

    A single file is always a candidate (even if hidden: the user named it). In a directory, every
    regular file is a candidate except hidden ones and temporaries; with `recursive`, subdirectories
    are walked too (hidden directories skipped, directory symlinks not followed, so no loops).
    `exclude` lists paths never to read (e.g. the report being written inside the directory).
    """
    path = Path(path)
    if not path.exists():
        raise ScanError(f"noise path not found: {path} (pass a directory of noise files or a single noise file)")
    if path.is_file():
        return NoiseListing([path], [])
    if not path.is_dir():
        raise ScanError(f"{path} is neither a file nor a directory (pass a directory of noise files)")
    excluded = {os.path.realpath(p) for p in exclude}
    files: list[Path] = []
    skipped: list[Path] = []
    try:
        if recursive:
            walker: Iterator = os.walk(path, followlinks=False)
        else:
            walker = iter([(str(path), [], sorted(os.listdir(path)))])
        for root, dirs, names in walker:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in names:
                p = Path(root) / name
                if not p.is_file():
                    continue  # subdirectory (non-recursive), socket, broken link...
                if os.path.realpath(p) in excluded:
                    continue
                (skipped if _is_skipped_name(name) else files).append(p)
    except OSError as exc:
        raise ScanError(f"cannot list {path}: {exc.strerror or exc} (check the path and its permissions)") from None
    return NoiseListing(sorted(files), sorted(skipped))


# --------------------------------------------------------------------------- reading

def read_noise_file(path: str | os.PathLike) -> list[NoiseTensor]:
    """Read every tensor of a noise file.

    Raises NoiseFileError (or UnsafeNoiseFileError) with a one-line cause when the whole file cannot
    be read; a tensor that can be located but not used (e.g. a non-numeric dtype) comes back as a
    NoiseTensor with `error` set, so the file's other tensors are still scored.
    """
    path = Path(path)
    try:
        fmt = sniff_format(path)
    except OSError as exc:
        raise NoiseFileError(f"cannot read file: {exc.strerror or exc}") from None
    if fmt == FORMAT_EMPTY:
        raise NoiseFileError("empty file (0 bytes)")
    if fmt == FORMAT_UNKNOWN:
        hint = " (the extension says noise, the content does not: corrupt?)" if path.suffix.lower() in NOISE_SUFFIXES else ""
        raise NoiseFileError("not a noise file: unknown format" + hint +
                             "; expected .safetensors, .npy, .npz or a torch.save file")
    reader = {FORMAT_SAFETENSORS: _read_safetensors, FORMAT_NPY: _read_npy, FORMAT_NPZ: _read_npz,
              FORMAT_TORCH_ZIP: _read_torch, FORMAT_PICKLE: _read_torch}[fmt]
    try:
        return reader(path)
    except NoiseFileError:
        raise
    except MemoryError:
        raise NoiseFileError(f"{fmt} file too large to load into memory") from None
    except Exception as exc:  # any parser failure is a per-file error, never a crash
        raise NoiseFileError(f"corrupt or truncated {fmt} file: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.kind not in "fiub":
        raise NoiseFileError(f"dtype {arr.dtype} is not numeric")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr))


def _check_dtype(key: str | None, t) -> NoiseTensor:
    if not isinstance(t, torch.Tensor):
        return NoiseTensor(key, None, f"holds a {type(t).__name__}, not a tensor")
    if not (t.dtype.is_floating_point):
        return NoiseTensor(key, None, f"dtype {str(t.dtype).replace('torch.', '')} is not floating point "
                                      "(noises are float tensors)")
    return NoiseTensor(key, t)


def _read_safetensors(path: Path) -> list[NoiseTensor]:
    from safetensors import safe_open

    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    if 8 + n > size:
        raise NoiseFileError(f"truncated safetensors file: header claims {n} bytes, file has {size}")
    out = []
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("format") == "terd-scan-trigger":
            raise NoiseFileError("a terd-scan trigger file (r, gamma), not noises; keep it out of the noise "
                                 "directory or pass it with --trigger")
        for key in sorted(f.keys()):
            try:
                out.append(_check_dtype(key, f.get_tensor(key)))
            except Exception as exc:  # e.g. a dtype torch cannot represent
                out.append(NoiseTensor(key, None, f"cannot read tensor: {_first_line(exc)}"))
    return out


def _read_npy_stream(f, size: int | None) -> np.ndarray:
    """Read one .npy from a binary stream after checking its header against the bytes available
    (`size`: total bytes of the stream, header included), so a lying header never allocates more
    than the data actually present."""
    from numpy.lib import format as npf

    version = npf.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npf.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = npf.read_array_header_2_0(f)
    else:  # pragma: no cover - numpy raises on unknown versions already
        raise NoiseFileError(f"unsupported npy version {version}")
    if dtype.hasobject:
        raise NoiseFileError("npy holds Python objects (a pickle); refused: only numeric arrays are accepted")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    need = count * dtype.itemsize
    if size is not None:
        have = size - f.tell()
        if have < need:
            raise NoiseFileError(f"truncated npy data: header says {tuple(shape)} {dtype} ({need} bytes), "
                                 f"{have} bytes present")
    data = f.read(need)
    if len(data) < need:
        raise NoiseFileError(f"truncated npy data: {len(data)} of {need} bytes")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    arr = arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)
    return np.array(arr)  # writable copy


def _read_npy(path: Path) -> list[NoiseTensor]:
    with open(path, "rb") as f:
        arr = _read_npy_stream(f, path.stat().st_size)
    return [_check_dtype(None, _to_tensor(arr))]


def _read_npz(path: Path) -> list[NoiseTensor]:
    out = []
    with zipfile.ZipFile(path) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            try:
                # Stream the member: the header is checked against the declared uncompressed size
                # before the data is read, and never more than that size is decompressed (zip bombs).
                with z.open(info) as member:
                    arr = _read_npy_stream(_Counting(member), info.file_size)
                out.append(_check_dtype(key, _to_tensor(arr)))
            except NoiseFileError as exc:
                out.append(NoiseTensor(key, None, str(exc)))
            except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
                out.append(NoiseTensor(key, None, f"corrupt npz member: {_first_line(exc)}"))
    return out


class _Counting:
    """A read-only stream wrapper that knows its position (zip member streams may not)."""

    def __init__(self, raw):
        self._raw, self._pos = raw, 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def pickle_globals(path: str | os.PathLike, limit: int = 64 * 1024 * 1024) -> list[str]:
    """The module.name globals a pickle (raw or inside a torch zip) would import, read from its
    opcodes without executing anything. Best effort: used to explain a refusal."""
    path = Path(path)
    streams: list[bytes] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for n in z.namelist():
                    if n.endswith(".pkl"):
                        streams.append(z.read(n)[:limit])
        else:
            with open(path, "rb") as f:
                streams.append(f.read(limit))
    except (OSError, zipfile.BadZipFile, ValueError):
        return []
    found: list[str] = []
    for data in streams:
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    strings.append(str(arg))
        except Exception:  # truncated / malformed pickle: report what was found so far
            pass
    return list(dict.fromkeys(found))


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
                         "builtins.bytearray", "builtins.complex", "builtins.slice", "builtins.range")


def _read_torch(path: Path) -> list[NoiseTensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4" from the restricted unpickler
            # A file object, not the path: torch.load must not pick a loader from the file name.
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if type(exc).__name__ == "UnpicklingError" or "Weights only load failed" in text:
            names = [g for g in pickle_globals(path) if not g.startswith(_SAFE_GLOBAL_PREFIXES)]
            names = names or _GLOBAL_RE.findall(text)
            what = f" (it would import {', '.join(names[:5])})" if names else ""
            raise UnsafeNoiseFileError(
                f"refused: pickle with code or non-tensor objects{what}; not loaded. "
                "Only tensors are accepted: re-save the noise with safetensors") from None
        raise NoiseFileError(f"corrupt or truncated torch file: {_first_line(exc)}") from None
    if isinstance(obj, torch.Tensor):
        return [_check_dtype(None, obj)]
    if isinstance(obj, dict):
        out = []
        for key in sorted(obj, key=str):
            out.append(_check_dtype(str(key), obj[key]))
        return out
    if isinstance(obj, (list, tuple)):
        return [_check_dtype(str(i), t) for i, t in enumerate(obj)]
    raise NoiseFileError(f"torch file holds a {type(obj).__name__}; expected a tensor, "
                         "a dict of tensors or a list of tensors")
