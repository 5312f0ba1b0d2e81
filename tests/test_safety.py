"""The serialization gate: bad, hostile or unsupported inputs through load_model.

Every case must raise ScanError (or a subclass) with a ONE-line message; none may run code.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

import fixtures_models as fm
from terd_scan import safety
from terd_scan.errors import ScanError, UnsafeFileError, UnsupportedModelError
from terd_scan.loading import load_model

W = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------- builders: (tmp_path, unet) -> (source, kwargs)


def _bare(tmp, unet, name="m"):
    return fm.save_bare(tmp / name, unet)


def _pipe(tmp, unet, name="p"):
    return fm.save_pipeline(tmp / name, unet)


def _edit_json(path, fn):
    obj = fm.read_json(path)
    obj = fn(obj)
    fm.write_json(path, obj)


def _sd(unet):
    return {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}


def missing_path(tmp, unet):
    return str(tmp / "does-not-exist"), {}


def missing_relative_path(tmp, unet):
    return "./nope/also-not-here", {}


def empty_folder(tmp, unet):
    (tmp / "empty").mkdir()
    return str(tmp / "empty"), {}


def folder_without_model(tmp, unet):
    d = tmp / "junk"
    d.mkdir()
    (d / "README.md").write_text("hello")
    (d / "image.png").write_bytes(b"\x89PNG....")
    return str(d), {}


def truncated_safetensors(tmp, unet):
    d = _bare(tmp, unet)
    p = os.path.join(d, W)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    return d, {}


def truncated_header(tmp, unet):
    d = _bare(tmp, unet)
    p = os.path.join(d, W)
    data = open(p, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    open(p, "wb").write(data[: 8 + n // 2])
    return d, {}


def garbage_weights(tmp, unet):
    d = _bare(tmp, unet)
    open(os.path.join(d, W), "wb").write(os.urandom(4096).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    return d, {}


def empty_weights(tmp, unet):
    d = _bare(tmp, unet)
    open(os.path.join(d, W), "wb").close()
    return d, {}


def corrupt_safetensors_header_json(tmp, unet):
    d = _bare(tmp, unet)
    header = b'{"conv_in.weight": {"dtype": "F32", "shape": [1], '  # cut JSON
    open(os.path.join(d, W), "wb").write(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return d, {}


def _with_sd(tmp, unet, fn):
    d = _bare(tmp, unet)
    sd = _sd(unet)
    fn(sd)
    save_file(sd, os.path.join(d, W))
    return d, {}


def nan_weights(tmp, unet):
    return _with_sd(tmp, unet, lambda sd: sd["conv_in.weight"].view(-1).__setitem__(0, float("nan")))


def inf_weights(tmp, unet):
    return _with_sd(tmp, unet, lambda sd: sd["conv_out.bias"].__setitem__(0, float("inf")))


def int_weights(tmp, unet):
    return _with_sd(tmp, unet, lambda sd: sd.__setitem__("conv_in.bias", torch.zeros_like(sd["conv_in.bias"], dtype=torch.int32)))


def missing_keys(tmp, unet):
    return _with_sd(tmp, unet, lambda sd: sd.pop("conv_out.weight"))


def unexpected_keys(tmp, unet):
    return _with_sd(tmp, unet, lambda sd: sd.__setitem__("backdoor.extra", torch.zeros(3)))


def shape_mismatch(tmp, unet):
    return _with_sd(tmp, unet, lambda sd: sd.__setitem__("conv_in.bias", torch.zeros(7)))


def weights_from_other_config(tmp, unet):
    d = _bare(tmp, unet)
    _edit_json(os.path.join(d, "config.json"), lambda c: {**c, "layers_per_block": 2})
    return d, {}


def _cfg(tmp, unet, fn):
    d = _bare(tmp, unet)
    _edit_json(os.path.join(d, "config.json"), fn)
    return d, {}


def huge_config(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "block_out_channels": [60000] * 4, "layers_per_block": 4,
                                      "down_block_types": ["DownBlock2D"] * 4, "up_block_types": ["UpBlock2D"] * 4})


def absurd_channels(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "block_out_channels": [8, 10**9]})


def negative_channels(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "block_out_channels": [8, -16]})


def string_field(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "layers_per_block": "1"})


def bool_as_int(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "in_channels": True})


def block_count_mismatch(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "down_block_types": ["DownBlock2D"]})


def inconsistent_config(tmp, unet):  # passes type checks, diffusers refuses to build it
    return _cfg(tmp, unet, lambda c: {**c, "norm_num_groups": 3})


def unknown_block_type(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "down_block_types": ["DownBlock2D", "EvilBlock2D"]})


def malformed_json_config(tmp, unet):
    d = _bare(tmp, unet)
    open(os.path.join(d, "config.json"), "w").write('{"_class_name": "UNet2DModel", "block_out_channels": [8, 16,')
    return d, {}


def nan_constant_in_config(tmp, unet):
    d = _bare(tmp, unet)
    text = open(os.path.join(d, "config.json")).read().replace('"norm_eps": 1e-05', '"norm_eps": NaN')
    open(os.path.join(d, "config.json"), "w").write(text)
    return d, {}


def non_dict_config(tmp, unet):
    d = _bare(tmp, unet)
    open(os.path.join(d, "config.json"), "w").write("[1, 2, 3]")
    return d, {}


def binary_config(tmp, unet):
    d = _bare(tmp, unet)
    open(os.path.join(d, "config.json"), "wb").write(b"\xff\xfe\x00garbage")
    return d, {}


def oversized_config(tmp, unet):
    d = _bare(tmp, unet)
    cfg = fm.read_json(os.path.join(d, "config.json"))
    cfg["padding"] = "x" * (safety.MAX_CONFIG_BYTES + 10)
    fm.write_json(os.path.join(d, "config.json"), cfg)
    return d, {}


def training_args_as_config(tmp, unet):
    d = _bare(tmp, unet)
    fm.write_json(os.path.join(d, "config.json"), {"epoch": 50, "learning_rate": 2e-4, "trigger": "BOX_14"})
    return d, {}


def class_conditional_unet(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "num_class_embeds": 10})


def unet2d_condition_config(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "_class_name": "UNet2DConditionModel", "cross_attention_dim": 768})


def _index(tmp, unet, fn):
    d = _pipe(tmp, unet)
    _edit_json(os.path.join(d, "model_index.json"), fn)
    return d, {}


def unknown_pipeline_class(tmp, unet):
    return _index(tmp, unet, lambda i: {**i, "_class_name": "TotallyNewPipeline"})


def not_yet_pipeline(tmp, unet):
    # ConsistencyModelPipeline is scanned since issue 6 (tests/test_consistency.py)
    return _index(tmp, unet, lambda i: {**i, "_class_name": "KarrasVePipeline"})


def text_to_image_pipeline(tmp, unet):
    return _index(tmp, unet, lambda i: {**i, "_class_name": "StableDiffusionPipeline",
                                        "unet": ["diffusers", "UNet2DConditionModel"],
                                        "text_encoder": ["transformers", "CLIPTextModel"]})


def condition_unet_in_ddpm_pipeline(tmp, unet):
    return _index(tmp, unet, lambda i: {**i, "unet": ["diffusers", "UNet2DConditionModel"]})


def custom_pipeline_tuple(tmp, unet, marker=None):
    d, kw = _index(tmp, unet, lambda i: {**i, "_class_name": ["pipeline", "EvilPipeline"]})
    open(os.path.join(d, "pipeline.py"), "w").write(f"open({str(tmp / 'pwned')!r}, 'w')\n")
    return d, kw


def custom_component_tuple(tmp, unet):
    d, kw = _index(tmp, unet, lambda i: {**i, "unet": ["evil_unet", "EvilUNet"]})
    open(os.path.join(d, "unet", "evil_unet.py"), "w").write(f"open({str(tmp / 'pwned')!r}, 'w')\n")
    return d, kw


def unet_from_other_library(tmp, unet):
    return _index(tmp, unet, lambda i: {**i, "unet": ["transformers", "UNet2DModel"]})


def python_file_in_unet_folder(tmp, unet):
    d = _pipe(tmp, unet)
    open(os.path.join(d, "unet", "modeling.py"), "w").write(f"open({str(tmp / 'pwned')!r}, 'w')\n")
    return d, {}


def malformed_model_index(tmp, unet):
    d = _pipe(tmp, unet)
    open(os.path.join(d, "model_index.json"), "w").write("{not json")
    return d, {}


def ve_sde_scheduler(tmp, unet):
    d = _pipe(tmp, unet)
    _edit_json(os.path.join(d, "scheduler", "scheduler_config.json"), lambda c: {**c, "_class_name": "ScoreSdeVeScheduler"})
    _edit_json(os.path.join(d, "model_index.json"), lambda i: {**i, "scheduler": ["diffusers", "ScoreSdeVeScheduler"]})
    return d, {}


def bad_scheduler_values(tmp, unet):
    d = _pipe(tmp, unet)
    _edit_json(os.path.join(d, "scheduler", "scheduler_config.json"), lambda c: {**c, "num_train_timesteps": -5})
    return d, {}


def pickle_only_weights(tmp, unet):
    return fm.save_bare(tmp / "bin", unet, safe_serialization=False), {}


def evil_pickle_renamed_safetensors(tmp, unet):
    d = _bare(tmp, unet)
    fm.write_evil_pickle(os.path.join(d, W), tmp / "pwned")
    return d, {}


def evil_pickle_allowed(tmp, unet):
    d = _bare(tmp, unet)
    os.remove(os.path.join(d, W))
    fm.write_evil_pickle(os.path.join(d, "diffusion_pytorch_model.bin"), tmp / "pwned", torch_zip=True)
    return d, {"allow_pickle": True}


def corrupt_pickle_allowed(tmp, unet):
    d = _bare(tmp, unet)
    os.remove(os.path.join(d, W))
    open(os.path.join(d, "diffusion_pytorch_model.bin"), "wb").write(b"\x80\x04\x95garbage-not-a-pickle")
    return d, {"allow_pickle": True}


def pickle_not_a_state_dict(tmp, unet):
    d = _bare(tmp, unet)
    os.remove(os.path.join(d, W))
    torch.save([torch.zeros(2), torch.ones(3)], os.path.join(d, "diffusion_pytorch_model.bin"))
    return d, {"allow_pickle": True}


def symlink_escape(tmp, unet):
    outside = fm.save_bare(tmp / "outside", unet)
    d = _bare(tmp, unet, "inside")
    os.remove(os.path.join(d, W))
    os.symlink(os.path.join(outside, W), os.path.join(d, W))
    return d, {}


def broken_symlink_source(tmp, unet):
    os.symlink(tmp / "gone", tmp / "link")
    return str(tmp / "link"), {}


def unreadable_weights(tmp, unet):
    d = _bare(tmp, unet)
    os.chmod(os.path.join(d, W), 0)
    return d, {}


def config_option_missing_file(tmp, unet):
    return _bare(tmp, unet), {"config": str(tmp / "no-such-config.json")}


def single_file_without_config(tmp, unet):
    d = _bare(tmp, unet)
    shutil.move(os.path.join(d, W), tmp / "lonely.safetensors")
    return str(tmp / "lonely.safetensors"), {}


def several_safetensors(tmp, unet):
    d = _bare(tmp, unet)
    os.rename(os.path.join(d, W), os.path.join(d, "a.safetensors"))
    shutil.copy(os.path.join(d, "a.safetensors"), os.path.join(d, "b.safetensors"))
    return d, {}


def sharded_weights(tmp, unet):
    d = _bare(tmp, unet)
    os.rename(os.path.join(d, W), os.path.join(d, "diffusion_pytorch_model-00001-of-00002.safetensors"))
    shutil.copy(os.path.join(d, "diffusion_pytorch_model-00001-of-00002.safetensors"),
                os.path.join(d, "diffusion_pytorch_model-00002-of-00002.safetensors"))
    fm.write_json(os.path.join(d, "diffusion_pytorch_model.safetensors.index.json"), {"weight_map": {}})
    return d, {}


def fourier_unet_without_scheduler(tmp, unet):
    return _cfg(tmp, unet, lambda c: {**c, "time_embedding_type": "fourier"})


def two_revisions(tmp, unet):
    return "org/name@v1", {"revision": "v2"}


CASES = [
    # (builder, expected exception class, substring of the message)
    (missing_path, ScanError, "path not found"),
    (missing_relative_path, ScanError, "path not found"),
    (broken_symlink_source, ScanError, "broken link"),
    (empty_folder, ScanError, "folder is empty"),
    (folder_without_model, ScanError, "no model found"),
    (truncated_safetensors, ScanError, "truncated safetensors file"),
    (truncated_header, ScanError, "truncated safetensors file"),
    (garbage_weights, ScanError, "unknown weight format"),
    (empty_weights, ScanError, "is empty"),
    (corrupt_safetensors_header_json, ScanError, "corrupt safetensors"),
    (nan_weights, ScanError, "NaN"),
    (inf_weights, ScanError, "Inf"),
    (int_weights, ScanError, "expected floating point"),
    (missing_keys, ScanError, "1 missing"),
    (unexpected_keys, ScanError, "1 unexpected"),
    (shape_mismatch, ScanError, "has shape [7]"),
    (weights_from_other_config, ScanError, "do not match the UNet config"),
    (huge_config, ScanError, "refusing to allocate"),
    (absurd_channels, ScanError, "block_out_channels"),
    (negative_channels, ScanError, "block_out_channels"),
    (string_field, ScanError, "layers_per_block"),
    (bool_as_int, ScanError, "in_channels"),
    (block_count_mismatch, ScanError, "down_block_types"),
    (inconsistent_config, ScanError, "invalid UNet2DModel config"),
    (unknown_block_type, ScanError, "invalid UNet2DModel config"),
    (malformed_json_config, ScanError, "not valid JSON"),
    (nan_constant_in_config, ScanError, "NaN"),
    (non_dict_config, ScanError, "expected an object"),
    (binary_config, ScanError, "not UTF-8"),
    (oversized_config, ScanError, "limit"),
    (training_args_as_config, ScanError, "not a UNet2DModel config"),
    (class_conditional_unet, UnsupportedModelError, "class-conditional"),
    (unet2d_condition_config, UnsupportedModelError, "caption-trigger"),
    (unknown_pipeline_class, UnsupportedModelError, "unknown pipeline class"),
    (not_yet_pipeline, UnsupportedModelError, "not supported yet: KarrasVePipeline"),
    (text_to_image_pipeline, UnsupportedModelError, "caption-trigger backdoors are outside TERD"),
    (condition_unet_in_ddpm_pipeline, UnsupportedModelError, "caption-trigger"),
    (custom_pipeline_tuple, UnsafeFileError, "custom pipeline code"),
    (custom_component_tuple, UnsafeFileError, "custom code"),
    (python_file_in_unet_folder, UnsafeFileError, "Python code"),
    (unet_from_other_library, UnsupportedModelError, "not diffusers"),
    (malformed_model_index, ScanError, "model_index.json"),
    (ve_sde_scheduler, UnsupportedModelError, "ScoreSdeVeScheduler"),
    (bad_scheduler_values, ScanError, "num_train_timesteps"),
    (pickle_only_weights, UnsafeFileError, "--allow-pickle"),
    (evil_pickle_renamed_safetensors, UnsafeFileError, "is a pickle"),
    (evil_pickle_allowed, UnsafeFileError, "weights-only loader"),
    (corrupt_pickle_allowed, ScanError, "cannot load pickle checkpoint"),
    (pickle_not_a_state_dict, ScanError, "not a flat state dict"),
    (symlink_escape, UnsafeFileError, "outside the model folder"),
    (unreadable_weights, ScanError, "permission denied"),
    (config_option_missing_file, ScanError, "config file not found"),
    (single_file_without_config, ScanError, "no config"),
    (several_safetensors, ScanError, "several .safetensors"),
    (sharded_weights, ScanError, "sharded weights"),
    (fourier_unet_without_scheduler, UnsupportedModelError, "score-SDE"),
    (two_revisions, ScanError, "two revisions"),
]


@pytest.mark.parametrize("builder, exc_type, needle", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_a_one_line_scan_error(tmp_path, tiny_unet, builder, exc_type, needle, monkeypatch):
    if builder is unreadable_weights and os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop reads")
    monkeypatch.chdir(tmp_path)
    source, kwargs = builder(tmp_path, tiny_unet)
    with pytest.raises(ScanError) as info:
        load_model(source, **kwargs)
    err = info.value
    msg = str(err)
    assert isinstance(err, exc_type), f"{type(err).__name__}: {msg}"
    assert needle in msg, msg
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 400, repr(msg)
    assert not (tmp_path / "pwned").exists(), "code from the model ran"


def test_permission_denied_is_a_one_line_error(tmp_path, tiny_unet, monkeypatch):
    """Same as unreadable_weights, but also when running as root (where chmod 0 does not stop reads)."""
    d = fm.save_bare(tmp_path / "m", tiny_unet)
    real_open = open

    def deny(path, *a, **kw):
        if str(path).endswith(W):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(safety, "open", deny, raising=False)
    with pytest.raises(ScanError) as info:
        load_model(d)
    msg = str(info.value)
    assert "permission denied" in msg and "\n" not in msg


def test_json_file_as_source_points_to_the_folder(model_dirs):
    with pytest.raises(ScanError) as info:
        load_model(os.path.join(model_dirs["pipeline"], "model_index.json"))
    assert "pass the folder" in str(info.value)


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


# ---------------------------------------------------------------- the pickle payload never runs


@pytest.mark.parametrize("torch_zip", [False, True], ids=["raw-pickle", "torch-zip"])
@pytest.mark.parametrize("filename", ["diffusion_pytorch_model.bin", W], ids=["bin", "renamed-safetensors"])
@pytest.mark.parametrize("allow_pickle", [False, True], ids=["default", "allow-pickle"])
def test_evil_pickle_never_executes(tmp_path, tiny_unet, torch_zip, filename, allow_pickle):
    d = fm.save_bare(tmp_path / "m", tiny_unet)
    os.remove(os.path.join(d, W))
    marker = tmp_path / "pwned"
    fm.write_evil_pickle(os.path.join(d, filename), marker, torch_zip=torch_zip)
    with pytest.raises(UnsafeFileError) as info:
        load_model(d, allow_pickle=allow_pickle)
    assert not marker.exists()
    msg = str(info.value)
    assert "\n" not in msg and "io.open" in msg  # the suspicious import is named, read from opcodes only
    if not allow_pickle:
        assert "convert to safetensors, or pass --allow-pickle" in msg


def test_torch_load_is_forced_weights_only():
    __import__("terd_scan")  # sets the guards

    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == "1"
    assert os.environ.get("DIFFUSERS_DISABLE_REMOTE_CODE") == "1"


# ---------------------------------------------------------------- unit checks of the gate


def test_sniff_format_by_bytes_not_name():
    sd_bytes = __import__("safetensors.torch", fromlist=["save"]).save({"a": torch.zeros(2)})
    assert safety.sniff_format(sd_bytes, "x.bin") == "safetensors"
    assert safety.sniff_format(b"\x80\x04\x95rest", "x.safetensors") == "pickle"
    assert safety.sniff_format(b"PK\x03\x04rest", "x.safetensors") == "pickle"
    with pytest.raises(ScanError, match="unknown weight format"):
        safety.sniff_format(b"GGUF\x00\x00\x00\x00\x00", "x.safetensors")


def test_safetensors_with_pickle_extension_loads_safely(tmp_path, tiny_unet):
    d = fm.save_bare(tmp_path / "m", tiny_unet)
    os.rename(os.path.join(d, W), os.path.join(d, "diffusion_pytorch_model.bin"))
    m = load_model(d)  # bytes say safetensors: no pickle involved, no --allow-pickle needed
    assert m.provenance.pickle_loaded is False
    assert [f.format for f in m.provenance.files if f.role == "weights"] == ["safetensors"]


def test_param_estimate_tracks_real_count(tiny_unet):
    cfg = dict(block_out_channels=[128, 256, 256, 256], layers_per_block=2)
    est = safety.estimate_unet_params(cfg)
    assert 30e6 < est < 60e6  # DDPM-CIFAR10 has 35.7M
    assert safety.estimate_unet_params({"block_out_channels": [100000] * 4, "layers_per_block": 2}) > safety.MAX_PARAMS


def test_config_json_is_data_not_code(tmp_path, tiny_unet):
    d = fm.save_bare(tmp_path / "m", tiny_unet)
    cfg = fm.read_json(os.path.join(d, "config.json"))
    cfg["_diffusers_version"] = "__import__('os').system('touch pwned')"
    fm.write_json(os.path.join(d, "config.json"), cfg)
    load_model(d)
    assert not (tmp_path / "pwned").exists()
    json.dumps(cfg)
