"""load_model on local sources: every layout loads the same weights; provenance is complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

import fixtures_models as fm
from terd_scan.errors import ScanError, UnsafeFileError, UnsupportedModelError
from terd_scan.loading import DEFAULT_SCHEDULE_ORIGIN, LoadedModel, load_model


def _same_output(m: LoadedModel, ref) -> bool:
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        return torch.allclose(m.unet(x, t).sample, ref(x, t).sample, atol=1e-6)


@pytest.mark.parametrize("layout, sched_origin, pipeline", [
    ("pipeline", "scheduler/scheduler_config.json (DDPMScheduler)", "DDPMPipeline"),
    ("flat", "scheduler_config.json (DDPMScheduler)", "DDPMPipeline"),
    ("bare", DEFAULT_SCHEDULE_ORIGIN, None),
    ("bare_sched", "scheduler_config.json (DDIMScheduler)", None),
    ("baddiffusion", "scheduler/scheduler_config.json (DDPMScheduler)", "DDPMPipeline"),
])
def test_layouts_load_same_unet(model_dirs, tiny_unet, layout, sched_origin, pipeline):
    m = load_model(model_dirs[layout])
    assert m.name == layout
    assert m.pipeline_class == pipeline
    assert m.schedule_origin == sched_origin
    assert _same_output(m, tiny_unet)
    p = next(m.unet.parameters())
    assert p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad and not m.unet.training
    assert m.unet_config["block_out_channels"] == [8, 16]
    assert m.scheduler_config["_class_name"] in ("DDPMScheduler", "DDIMScheduler")
    prov = m.provenance
    assert prov.kind == "local" and prov.root == os.path.abspath(model_dirs[layout])
    assert prov.pickle_loaded is False and prov.repo_id is None and prov.resolved_commit is None
    roles = {f.role for f in prov.files}
    assert {"config", "weights"} <= roles
    for f in prov.files:  # every recorded hash is the hash of the file on disk
        with open(os.path.join(prov.root, f.path), "rb") as fh:
            data = fh.read()
        assert f.sha256 == hashlib.sha256(data).hexdigest() and f.size == len(data)
    json.dumps(prov.to_dict())  # JSON-able for the report


def test_bare_default_schedule_is_noted(model_dirs):
    m = load_model(model_dirs["bare"])
    assert m.scheduler_config["num_train_timesteps"] == 1000
    assert m.scheduler_config["beta_schedule"] == "linear"
    assert any("no scheduler config" in n for n in m.provenance.notes)


def test_baddiffusion_root_training_config_ignored_and_pickle_never_used(model_dirs):
    m = load_model(model_dirs["baddiffusion"])
    paths = [f.path for f in m.provenance.files]
    assert "unet/config.json" in paths and "config.json" not in paths and "data.ckpt" not in paths
    assert any("root config.json ignored" in n for n in m.provenance.notes)


def test_single_safetensors_file_with_config_beside(model_dirs, tiny_unet):
    path = os.path.join(model_dirs["bare"], "diffusion_pytorch_model.safetensors")
    m = load_model(path)
    assert _same_output(m, tiny_unet)
    assert m.schedule_origin == DEFAULT_SCHEDULE_ORIGIN


def test_single_file_with_explicit_config(tmp_path, model_dirs, tiny_unet):
    shutil.copy(os.path.join(model_dirs["bare"], "diffusion_pytorch_model.safetensors"), tmp_path / "weights.safetensors")
    with pytest.raises(ScanError, match="no config"):
        load_model(str(tmp_path / "weights.safetensors"))
    cfg = os.path.join(model_dirs["bare"], "config.json")
    m = load_model(str(tmp_path / "weights.safetensors"), config=cfg)
    assert m.name == "weights" and _same_output(m, tiny_unet)
    paths = {f.role: f.path for f in m.provenance.files}
    assert paths == {"config": os.path.abspath(cfg), "weights": "weights.safetensors"}  # outside the root: absolute


def test_prefers_safetensors_over_pickle(tmp_path, tiny_unet):
    d = fm.save_bare(tmp_path / "both", tiny_unet)
    tiny_unet.save_pretrained(str(d), safe_serialization=False)  # adds diffusion_pytorch_model.bin
    marker = tmp_path / "pwned"
    fm.write_evil_pickle(os.path.join(d, "diffusion_pytorch_model.bin"), marker)
    m = load_model(d)
    assert [f.format for f in m.provenance.files if f.role == "weights"] == ["safetensors"]
    assert any("never opened" in n for n in m.provenance.notes)
    assert not marker.exists()


def test_pickle_only_needs_allow_pickle(tmp_path, tiny_unet):
    d = fm.save_bare(tmp_path / "bin", tiny_unet, safe_serialization=False)
    with pytest.raises(UnsafeFileError, match="--allow-pickle"):
        load_model(d)
    m = load_model(d, allow_pickle=True)
    assert m.provenance.pickle_loaded is True and _same_output(m, tiny_unet)
    assert [f.format for f in m.provenance.files if f.role == "weights"] == ["pickle"]


def test_ddim_pipeline_and_prediction_type_passthrough(tmp_path, tiny_unet):
    d = fm.save_pipeline(tmp_path / "ddim", tiny_unet, fm.make_scheduler("DDIMScheduler", prediction_type="v_prediction"),
                         pipeline="DDIMPipeline")
    m = load_model(d)
    assert m.pipeline_class == "DDIMPipeline"
    assert m.scheduler_config["prediction_type"] == "v_prediction"


def test_missing_prediction_type_is_noted(tmp_path, tiny_unet):
    d = fm.save_flat(tmp_path / "old", tiny_unet)
    cfg = fm.read_json(os.path.join(d, "scheduler_config.json"))
    cfg.pop("prediction_type")
    fm.write_json(os.path.join(d, "scheduler_config.json"), cfg)
    m = load_model(d)
    assert "prediction_type" not in m.scheduler_config
    assert any("prediction_type" in n for n in m.provenance.notes)


def test_revision_on_local_path_is_an_error(model_dirs):
    with pytest.raises(ScanError, match="local path"):
        load_model(model_dirs["pipeline"], revision="main")


def test_unsupported_is_not_scan_clean(tmp_path, tiny_unet):
    d = fm.save_pipeline(tmp_path / "p", tiny_unet)
    idx = fm.read_json(os.path.join(d, "model_index.json"))
    idx["_class_name"] = "KarrasVePipeline"  # VE, latent and consistency pipelines load since issue 6
    fm.write_json(os.path.join(d, "model_index.json"), idx)
    with pytest.raises(UnsupportedModelError, match="not supported yet"):
        load_model(d)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_legacy_attention_key_names_are_mapped(tmp_path, tiny_unet, safe):
    """google/ddpm-* checkpoints predate diffusers' Attention class: query/key/value/proj_attn names."""
    from safetensors.torch import save_file

    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in tiny_unet.state_dict().items():
        for new, old in new_to_old.items():
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v.clone().contiguous()
    assert any(".proj_attn." in k for k in sd)
    d = fm.save_bare(tmp_path / "legacy", tiny_unet)
    os.remove(os.path.join(d, "diffusion_pytorch_model.safetensors"))
    if safe:
        save_file(sd, os.path.join(d, "diffusion_pytorch_model.safetensors"))
        m = load_model(d)
    else:
        torch.save(sd, os.path.join(d, "diffusion_pytorch_model.bin"))
        m = load_model(d, allow_pickle=True)
    assert _same_output(m, tiny_unet)
    assert any("legacy attention weight names" in n for n in m.provenance.notes)
