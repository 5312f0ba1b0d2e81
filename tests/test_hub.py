"""Hub sources against a loopback fake Hub (tests/fake_hub.py): no network, real huggingface_hub code.

Covers: repo id, @branch, @tag, @commit and revision=; the revision is resolved once and exactly that
commit is scanned even if the branch moves mid-download; only JSON + safetensors are fetched (pickles
only with allow_pickle); private and gated repos need a token (argument or HF_TOKEN); unknown repo or
revision; unreachable Hub; offline mode from a filled cache (downloaded or hand-made); offline and
not cached. Every error is a one-line ScanError.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
import torch

import fixtures_models as fm
from fake_hub import FakeHub, closed_port
from terd_scan.errors import ScanError, UnsafeFileError, UnsupportedModelError
from terd_scan.loading import load_model
from terd_scan.sources import parse_repo_id

TOKEN = "hf_test_token"


def _point_hub_at(monkeypatch, url: str) -> None:
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh Hub cache per test (HF_HUB_CACHE), no token, online."""
    c = tmp_path / "hf-cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(c))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    return c


@pytest.fixture(scope="module")
def unets():
    return fm.make_unet(seed=0), fm.make_unet(seed=1)


@pytest.fixture(scope="module")
def repo_folders(tmp_path_factory, unets):
    base = tmp_path_factory.mktemp("repos")
    a, b = unets
    return {"v1": fm.save_baddiffusion(base / "v1", a),  # pipeline + root training-args config.json + data.ckpt
            "v2": fm.save_pipeline(base / "v2", b),
            "flat": fm.save_flat(base / "flat", a),
            "bin": fm.save_bare(base / "bin", a, safe_serialization=False)}


@pytest.fixture
def hub(monkeypatch, cache, repo_folders):
    h = FakeHub(tokens={TOKEN})
    h.create_repo("org/tiny")
    h.sha_v1 = h.commit("org/tiny", repo_folders["v1"], branch="main")
    h.tag("org/tiny", "v1.0", h.sha_v1)
    h.sha_v2 = h.commit("org/tiny", repo_folders["v2"], branch="main")  # main moved on
    h.sha_dev = h.commit("org/tiny", repo_folders["v1"], branch="dev")
    h.create_repo("google/ddpm-tiny-8")
    h.sha_flat = h.commit("google/ddpm-tiny-8", repo_folders["flat"])
    h.create_repo("org/private", private=True)
    h.sha_private = h.commit("org/private", repo_folders["v2"])
    h.create_repo("org/gated", gated=True)
    h.commit("org/gated", repo_folders["v2"])
    h.create_repo("org/binonly")
    h.commit("org/binonly", repo_folders["bin"])
    h.start()
    _point_hub_at(monkeypatch, h.url)
    yield h
    h.stop()


def _output(m, seed=3):
    torch.manual_seed(seed)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([250])
    with torch.no_grad():
        return m.unet(x, t).sample


def _ref(unet):
    torch.manual_seed(3)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([250])
    with torch.no_grad():
        return unet(x, t).sample


def _file_hashes(hub, repo_id, sha):
    return {p: hashlib.sha256(b).hexdigest() for p, b in hub.repos[repo_id].commits[sha].items()}


def _one_line(exc):
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 400, repr(msg)
    return msg


# ---------------------------------------------------------------- downloads


def test_parse_repo_id():
    assert parse_repo_id("org/name") == ("org/name", None)
    assert parse_repo_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    assert parse_repo_id("google/ddpm-cifar10-32@0123abc") == ("google/ddpm-cifar10-32", "0123abc")
    for bad in ("./x/y", "/abs/path", "a/b/c", "name", "org/na me", "org/..", "org--x/y", ""):
        assert parse_repo_id(bad) is None, bad


def test_download_by_repo_id_main(hub, unets):
    m = load_model("org/tiny")
    p = m.provenance
    assert p.kind == "hub" and p.repo_id == "org/tiny" and p.requested_revision is None
    assert p.resolved_commit == hub.sha_v2
    assert m.name == "tiny"
    assert torch.allclose(_output(m), _ref(unets[1]), atol=1e-6)
    hashes = _file_hashes(hub, "org/tiny", hub.sha_v2)
    assert {f.path: f.sha256 for f in p.files} == {k: hashes[k] for k in (f.path for f in p.files)}
    assert os.path.realpath(p.root).endswith(hub.sha_v2)


def test_hub_url_forms(hub):
    for source in ("hf://org/tiny@dev", "https://huggingface.co/org/tiny/tree/dev", "https://huggingface.co/org/tiny@dev"):
        m = load_model(source)
        assert m.provenance.repo_id == "org/tiny" and m.provenance.resolved_commit == hub.sha_dev, source
        assert m.provenance.source == source


@pytest.mark.parametrize("how", ["at-branch", "revision-arg", "at-tag", "at-commit", "pr-ref"])
def test_download_by_revision(hub, unets, how):
    hub.tag("org/tiny", "refs/pr/1", hub.sha_v1)  # a Hub pull request: the CI gate scans it before merging
    source, kw, expected = {
        "pr-ref": ("org/tiny@refs/pr/1", {}, hub.sha_v1),
        "at-branch": ("org/tiny@dev", {}, hub.sha_dev),
        "revision-arg": ("org/tiny", {"revision": "dev"}, hub.sha_dev),
        "at-tag": ("org/tiny@v1.0", {}, hub.sha_v1),
        "at-commit": (f"org/tiny@{hub.sha_v1}", {}, hub.sha_v1),
    }[how]
    m = load_model(source, **kw)
    assert m.provenance.resolved_commit == expected
    assert m.provenance.requested_revision == (kw.get("revision") or source.split("@")[1])
    assert torch.allclose(_output(m), _ref(unets[0]), atol=1e-6)


def test_only_configs_and_safetensors_are_fetched(hub):
    m = load_model(f"org/tiny@{hub.sha_v1}")
    fetched = {path.split(f"/resolve/{hub.sha_v1}/", 1)[1] for method, path in hub.requests
               if method == "GET" and "/resolve/" in path}
    assert "data.ckpt" not in fetched  # the BadDiffusion pickle is never downloaded
    assert all(p.endswith((".json", ".safetensors")) for p in fetched), fetched
    assert not os.path.exists(os.path.join(m.provenance.root, "data.ckpt"))
    # the root config.json (training args) is downloaded but ignored: the UNet comes from unet/
    assert "unet/config.json" in [f.path for f in m.provenance.files]


def test_flat_legacy_repo(hub, unets):
    m = load_model("google/ddpm-tiny-8")
    assert m.pipeline_class == "DDPMPipeline" and m.schedule_origin.startswith("scheduler_config.json")
    assert m.name == "ddpm-tiny-8"
    assert torch.allclose(_output(m), _ref(unets[0]), atol=1e-6)


def test_branch_moved_after_resolution_does_not_change_what_is_scanned(hub, unets, repo_folders):
    moved = {}

    def move_main_after_resolution(method, path):
        # right after the revision is resolved (model_info), push a new commit to main
        if path.startswith("/api/models/org/tiny") and "/tree/" not in path and not moved:
            moved["sha"] = hub.commit("org/tiny", repo_folders["v1"], branch="main",
                                      files={"unet/config.json": b'{"_class_name": "UNet2DModel", "block_out_channels": [4]}'})

    hub.on_request = move_main_after_resolution
    m = load_model("org/tiny")
    hub.on_request = None
    assert moved and hub.repos["org/tiny"].refs["main"] == moved["sha"] != hub.sha_v2
    assert m.provenance.resolved_commit == hub.sha_v2
    hashes = _file_hashes(hub, "org/tiny", hub.sha_v2)
    for f in m.provenance.files:
        assert f.sha256 == hashes[f.path], f.path
    assert torch.allclose(_output(m), _ref(unets[1]), atol=1e-6)
    # every file request named the resolved commit, never the moving branch
    assert all(f"/resolve/{hub.sha_v2}/" in p for meth, p in hub.requests if "/resolve/" in p)


def test_pickle_repo_refused_unless_allowed(hub, unets):
    with pytest.raises(UnsafeFileError) as info:  # the .bin is not even downloaded without allow_pickle
        load_model("org/binonly")
    msg = _one_line(info.value)
    assert "is a pickle" in msg and "not downloaded" in msg and "--allow-pickle" in msg
    assert not any(p.endswith(".bin") for _m, p in hub.requests)
    m = load_model("org/binonly", allow_pickle=True)
    assert m.provenance.pickle_loaded and torch.allclose(_output(m), _ref(unets[0]), atol=1e-6)


def test_oversized_files_are_refused_before_download(hub, repo_folders, monkeypatch):
    import terd_scan.sources as sources

    big = b'{"_class_name": "UNet2DModel", "pad": "' + b"x" * 1_100_000 + b'"}'
    hub.create_repo("org/bigconfig")
    hub.commit("org/bigconfig", repo_folders["v2"], files={"unet/config.json": big})
    with pytest.raises(ScanError) as info:
        load_model("org/bigconfig")
    assert "over the 1000000-byte limit" in _one_line(info.value)
    assert not any("/resolve/" in p for _m, p in hub.requests if "org/bigconfig" in p)

    monkeypatch.setattr(sources, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(ScanError) as info:
        load_model("org/tiny")
    assert "limit for one weights file" in _one_line(info.value)
    assert not any(p.endswith(".safetensors") for _m, p in hub.requests)


# ---------------------------------------------------------------- access errors


def test_private_repo_needs_token(hub, monkeypatch, unets):
    with pytest.raises(ScanError) as info:
        load_model("org/private")
    msg = _one_line(info.value)
    assert "org/private" in msg and "--token" in msg and "HF_TOKEN" in msg
    m = load_model("org/private", token=TOKEN)
    assert m.provenance.resolved_commit == hub.sha_private
    assert torch.allclose(_output(m), _ref(unets[1]), atol=1e-6)


def test_private_repo_token_from_env(hub, monkeypatch, cache):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # huggingface_hub reads it at call time
    m = load_model("org/private")
    assert m.provenance.resolved_commit == hub.sha_private


def test_wrong_token(hub):
    with pytest.raises(ScanError) as info:
        load_model("org/private", token="hf_wrong")
    assert "org/private" in _one_line(info.value)


def test_gated_repo_needs_token(hub):
    with pytest.raises(ScanError) as info:
        load_model("org/gated")
    msg = _one_line(info.value)
    assert "gated" in msg and "--token" in msg
    load_model("org/gated", token=TOKEN)


def test_repo_not_found(hub):
    with pytest.raises(ScanError) as info:
        load_model("org/nope")
    assert "repo not found" in _one_line(info.value) and "org/nope" in str(info.value)


def test_revision_not_found(hub):
    with pytest.raises(ScanError) as info:
        load_model("org/tiny@no-such-branch")
    msg = _one_line(info.value)
    assert "revision not found" in msg and "no-such-branch" in msg


def test_unsupported_hub_model_is_an_error(hub, repo_folders, tmp_path):
    d = shutil.copytree(repo_folders["v2"], tmp_path / "t2i")
    idx = fm.read_json(d / "model_index.json")
    fm.write_json(d / "model_index.json", {**idx, "_class_name": "StableDiffusionPipeline",
                                           "unet": ["diffusers", "UNet2DConditionModel"]})
    hub.create_repo("org/t2i")
    hub.commit("org/t2i", d)
    with pytest.raises(UnsupportedModelError, match="caption-trigger"):
        load_model("org/t2i")
    # refused from its JSON configs alone: no weights were downloaded
    assert not any(p.endswith(".safetensors") for _m, p in hub.requests if "org/t2i" in p)


def test_custom_code_repo_is_refused(hub, repo_folders, tmp_path):
    d = shutil.copytree(repo_folders["v2"], tmp_path / "code")
    idx = fm.read_json(d / "model_index.json")
    fm.write_json(d / "model_index.json", {**idx, "_class_name": ["pipeline", "EvilPipeline"]})
    (d / "pipeline.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    hub.create_repo("org/code")
    hub.commit("org/code", d)
    with pytest.raises(UnsafeFileError, match="custom pipeline code"):
        load_model("org/code")
    assert not any(p.endswith(".py") for _m, p in hub.requests)  # never even downloaded
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- network and offline


def test_unreachable_hub_closed_port(monkeypatch, cache):
    url = f"http://127.0.0.1:{closed_port()}"
    _point_hub_at(monkeypatch, url)
    with pytest.raises(ScanError) as info:
        load_model("org/tiny")
    msg = _one_line(info.value)
    assert f"cannot reach the Hugging Face Hub at {url}" in msg and "HF_HUB_OFFLINE=1" in msg


def test_unreachable_hub_server_stopped(hub):
    load_model("org/tiny")  # works while the server runs
    hub.stop()
    with pytest.raises(ScanError) as info:
        load_model("org/tiny@dev")
    assert "cannot reach the Hugging Face Hub" in _one_line(info.value)
    hub.start()  # let the fixture stop it cleanly


def test_offline_from_filled_cache(hub, monkeypatch, unets):
    online = load_model("org/tiny@dev")
    hub.stop()
    n_requests = len(hub.requests)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    for source in ("org/tiny@dev", f"org/tiny@{hub.sha_dev}"):
        m = load_model(source)
        assert m.provenance.resolved_commit == hub.sha_dev
        assert [(f.path, f.sha256) for f in m.provenance.files] == [(f.path, f.sha256) for f in online.provenance.files]
        assert any("offline" in n for n in m.provenance.notes)
        assert torch.allclose(_output(m), _ref(unets[0]), atol=1e-6)
    assert len(hub.requests) == n_requests
    with pytest.raises(ScanError) as info:  # main was never downloaded
        load_model("org/tiny")
    msg = _one_line(info.value)
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    hub.start()


def test_offline_hand_made_cache(monkeypatch, cache, repo_folders, unets):
    """A cache laid out by hand (refs/main + snapshots/<sha>/...), as in ECOSYSTEM.md section 3.4 (a)."""
    sha = "ab" * 20
    repo_dir = cache / "models--acme--ddpm"
    shutil.copytree(repo_folders["v1"], repo_dir / "snapshots" / sha)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    m = load_model("acme/ddpm")
    assert m.provenance.resolved_commit == sha and m.provenance.kind == "hub"
    assert torch.allclose(_output(m), _ref(unets[0]), atol=1e-6)


def test_offline_not_cached(monkeypatch, cache):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ScanError) as info:
        load_model("org/never-downloaded")
    msg = _one_line(info.value)
    assert "not in the local Hugging Face cache" in msg


def test_cache_snapshot_folder_as_local_path(hub, cache):
    """A Hub cache snapshot folder passed as a path: its links into ../../blobs are not an escape."""
    m = load_model("org/tiny")
    local = load_model(m.provenance.root)
    assert local.provenance.kind == "local"
    assert [(f.path, f.sha256) for f in local.provenance.files] == [(f.path, f.sha256) for f in m.provenance.files]


def test_explicit_cache_dir(hub, tmp_path):
    c = tmp_path / "my-cache"
    m = load_model("org/tiny", cache_dir=str(c))
    assert os.path.realpath(m.provenance.root).startswith(os.path.realpath(c))


def test_local_path_wins_over_repo_id(tmp_path, monkeypatch, repo_folders, cache):
    """An existing local folder shaped like org/name is local: the Hub is not contacted."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(repo_folders["v2"], tmp_path / "org" / "tiny")
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    m = load_model("org/tiny")
    assert m.provenance.kind == "local"


def test_huggingface_hub_version():
    assert int(huggingface_hub.__version__.split(".")[0]) >= 1
