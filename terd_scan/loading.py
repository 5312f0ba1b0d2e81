"""Load an unconditional diffusers UNet2DModel (and its noise schedule) from a local folder, a single
weights file or a Hub repo, without running any code from the source.

Never calls DiffusionPipeline.from_pretrained on the source: model_index.json, the UNet config and
the scheduler config are read as JSON data and allow-listed; the UNet is built from its validated
config on the meta device (no allocation), the weights file is checked against it (keys, shapes,
dtypes) and only then are the tensors loaded, checked for NaN/Inf and assigned (strict).

Layouts:
  pipeline folder   model_index.json + unet/ + scheduler/            (save_pretrained, BadDiffusion)
  flat legacy       model_index.json + config.json + weights + scheduler_config.json at the root
                    (google/ddpm-cifar10-32)
  bare UNet         config.json + weights [+ scheduler_config.json]  (else default DDPM schedule)
  single file       x.safetensors with config= or a config.json beside it
  DDIM repo         ckpt.pth of ermongroup/ddim / TrojDiff (a pickled list; --allow-pickle), the file or
                    its folder; architecture from --config, else from the config.yml the DDIM repo writes
                    beside it (checked against the weights; it also gives the noise schedule), else
                    inferred from the weights (ddim_repo.py)
  score-SDE VE      any of the above with a ScoreSdeVeScheduler config and a Fourier-embedding UNet
  consistency       ConsistencyModelPipeline folder: model_index.json + unet/ + scheduler/ with a
                    CMStochasticIterativeScheduler (or any layout above with that scheduler config);
                    unconditional only (a class-conditional UNet is refused)
  latent (LDM)      LDMPipeline folder: model_index.json + unet/ + scheduler/ + vqvae/ (VQModel, CompVis/ldm-*)
                    or vae/ (AutoencoderKL); the autoencoder goes through the same gate as the UNet
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from . import safety
from .errors import ScanError, UnsafeFileError, UnsupportedModelError
from .sources import ResolvedSource, resolve_source

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DModel

DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
    "prediction_type": "epsilon",
}
DEFAULT_SCHEDULE_ORIGIN = "default: DDPM linear 1e-4..0.02, 1000 steps (no scheduler config found)"
DEFAULT_SCHEDULE_NOTE = "no scheduler config: standard DDPM linear schedule (1e-4..0.02), 1000 steps"

WEIGHT_NAMES_SAFE = ("diffusion_pytorch_model.safetensors", "model.safetensors")
WEIGHT_NAMES_PICKLE = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


@dataclass
class FileRecord:
    path: str  # relative to the source root
    sha256: str
    size: int
    role: str  # "weights" | "config" | "scheduler" | "model_index"
    format: str  # "safetensors" | "pickle" | "json"


@dataclass
class Provenance:
    source: str
    kind: str  # "local" | "hub"
    root: str
    repo_id: str | None = None
    requested_revision: str | None = None
    resolved_commit: str | None = None
    files: list[FileRecord] = field(default_factory=list)
    pickle_loaded: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedAutoencoder:
    """The decoder side of a latent diffusion model: latents (what the UNet sees) -> images."""

    model: object  # diffusers VQModel | AutoencoderKL, frozen, eval mode
    class_name: str  # "VQModel" | "AutoencoderKL"
    component: str  # model_index.json key: "vqvae" | "vae"
    config: dict
    scaling_factor: float  # decode(latents / scaling_factor + shift_factor)
    shift_factor: float
    downsample: int  # image side / latent side


@dataclass
class LoadedModel:
    name: str
    unet: "UNet2DModel"
    unet_config: dict
    scheduler_config: dict
    schedule_origin: str
    pipeline_class: str | None
    provenance: Provenance
    autoencoder: LoadedAutoencoder | None = None  # latent diffusion only


def _rel(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    return rel.replace(os.sep, "/")


class _Reader:
    """Reads files of one source, records a FileRecord for each."""

    def __init__(self, src: ResolvedSource):
        self.src = src
        self.files: list[FileRecord] = []

    def rel(self, path: str) -> str:
        rel = _rel(self.src.root, path)
        return os.path.abspath(path) if rel.startswith("../") else rel  # e.g. a --config outside the source

    def json(self, path: str, role: str, what: str) -> dict:
        cfg, rf = safety.read_json_config(path, what, allowed_root=self._allowed(path))
        self.files.append(FileRecord(self.rel(path), rf.sha256, rf.size, role, "json"))
        return cfg

    def weights(self, path: str) -> tuple[safety.ReadFile, str]:
        rf = safety.read_bytes(path, limit=safety.MAX_WEIGHT_BYTES, what="weight file",
                               allowed_root=self._allowed(path))
        fmt = safety.sniff_format(rf.data, self.rel(path))
        return rf, fmt

    def record_weights(self, path: str, rf: safety.ReadFile, fmt: str) -> None:
        self.files.append(FileRecord(self.rel(path), rf.sha256, rf.size, "weights", fmt))

    def _allowed(self, path: str) -> str:
        # an explicit config= outside the source folder is the user's own file: no link boundary
        root = os.path.realpath(self.src.root)
        ap = os.path.abspath(path)
        if os.path.commonpath([ap, os.path.abspath(self.src.root)]) != os.path.abspath(self.src.root):
            return os.path.dirname(os.path.realpath(ap)) or root
        return self.src.allowed_root


def _list_folder(src: ResolvedSource, folder: str) -> list[str]:
    """File names in a folder of the source: the Hub commit's listing when known, else the disk."""
    if src.remote_files is not None:
        rel = _rel(src.root, folder)
        rel = "" if rel == "." else rel
        return sorted(p.rsplit("/", 1)[-1] for p in src.remote_files if (p.rsplit("/", 1)[0] if "/" in p else "") == rel)
    try:
        return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    except OSError:
        return []


def _find_weights(names: list[str], rel_folder: str, notes: list[str]) -> str:
    """Pick the weights file of a component folder: safetensors first, pickles as a fallback."""
    where = rel_folder or "the model folder"
    safe = [n for n in WEIGHT_NAMES_SAFE if n in names]
    if not safe and any(n.endswith(".safetensors.index.json") for n in names):
        raise ScanError(f"sharded weights in {where} are not supported yet; merge the shards into one "
                        "diffusion_pytorch_model.safetensors")
    if not safe:
        others = [n for n in names if n.endswith(".safetensors")]
        if len(others) > 1:
            raise ScanError(f"several .safetensors files in {where} ({', '.join(others[:4])}); keep one, or pass "
                            "the file itself with --config")
        safe = others
    pickles = [n for n in WEIGHT_NAMES_PICKLE if n in names]
    if not pickles:
        pickles = [n for n in names if n.lower().endswith(safety.PICKLE_SUFFIXES)]
    if safe:
        if pickles:
            notes.append(f"{where}: safetensors and pickle weights both present; used {safe[0]}, never opened "
                         f"{', '.join(pickles[:3])}")
        return safe[0]
    if len(pickles) == 1:
        return pickles[0]
    if len(pickles) > 1:
        raise ScanError(f"several pickle weight files in {where} ({', '.join(pickles[:4])}); keep one, or convert "
                        "it to diffusion_pytorch_model.safetensors")
    raise ScanError(f"no weights in {where}: expected diffusion_pytorch_model.safetensors beside config.json; "
                    "re-save the model with save_pretrained")


def _refuse_code(folder: str, rel_folder: str) -> None:
    py = sorted(glob.glob(os.path.join(folder, "*.py")))
    if py:
        raise UnsafeFileError(f"{(rel_folder + '/') if rel_folder else 'the model folder'} holds Python code ({os.path.basename(py[0])}) beside the model; "
                              "terd-scan never runs code from a model: remove it or scan a clean copy")


def _plan_folder(src: ResolvedSource, reader: _Reader, config: str | None, notes: list[str]):
    """Decide which files make the model. Returns (pipeline_class, unet_dir, unet_config_path, sched_path,
    latent), latent = (model_index key, class, folder) of an LDMPipeline's autoencoder, else None."""
    root = src.root
    index_path = os.path.join(root, "model_index.json")
    pipeline_class = None
    if os.path.isfile(index_path):
        index = reader.json(index_path, "model_index", "model_index.json")
        pipeline_class, components = safety.check_model_index(index, reader.rel(index_path))
        unet_key = "unet" if "unet" in components else "model"
        unet_dir = os.path.join(root, unet_key)
        if not os.path.isdir(unet_dir):
            unet_dir = root  # flat legacy layout (google/ddpm-*)
        if unet_dir != root:
            _refuse_code(unet_dir, reader.rel(unet_dir))
            if os.path.isfile(os.path.join(root, "config.json")):
                notes.append(f"root config.json ignored: model_index.json names the UNet in {unet_key}/")
        sched_dir = os.path.join(root, "scheduler")
        if os.path.isdir(sched_dir):
            _refuse_code(sched_dir, "scheduler")
        latent = None
        ae_key = next((k for k in safety.AUTOENCODER_KEYS if k in components), None)
        if pipeline_class in safety.LATENT_PIPELINES and ae_key is not None:
            ae_dir = os.path.join(root, ae_key)
            if not os.path.isfile(os.path.join(ae_dir, "config.json")):
                raise ScanError(f"{pipeline_class} names a {components[ae_key][1]} in {ae_key}/ but {ae_key}/config.json "
                                "is missing; add the autoencoder folder (config.json + weights) from the original model")
            _refuse_code(ae_dir, ae_key)
            latent = (ae_key, components[ae_key][1], ae_dir)
        sched = None
        if "scheduler" in components:
            for cand in (os.path.join(sched_dir, "scheduler_config.json"), os.path.join(root, "scheduler_config.json")):
                if os.path.isfile(cand):
                    sched = cand
                    break
            if sched is None:
                notes.append("model_index.json names a scheduler but its scheduler_config.json is missing")
    elif os.path.isfile(os.path.join(root, "config.json")) or config:
        unet_dir, latent = root, None
        sched = next((c for c in (os.path.join(root, "scheduler_config.json"),
                                  os.path.join(root, "scheduler", "scheduler_config.json")) if os.path.isfile(c)), None)
    elif os.path.isfile(os.path.join(root, "unet", "config.json")):
        unet_dir, latent = os.path.join(root, "unet"), None
        _refuse_code(unet_dir, "unet")
        notes.append("no model_index.json: used unet/ as the UNet folder")
        sched = next((c for c in (os.path.join(root, "scheduler", "scheduler_config.json"),
                                  os.path.join(root, "scheduler_config.json")) if os.path.isfile(c)), None)
    else:
        try:
            entries = os.listdir(root)
        except OSError:
            entries = []
        what = "the folder is empty" if not entries else "no model_index.json or config.json in it"
        raise ScanError(f"no model found in {src.source}: {what}; pass a diffusers model folder (model_index.json, "
                        "unet/, scheduler/) or a UNet folder (config.json + diffusion_pytorch_model.safetensors)")
    unet_cfg_path = os.path.abspath(config) if config else os.path.join(unet_dir, "config.json")
    return pipeline_class, unet_dir, unet_cfg_path, sched, latent


def load_model(source: str, *, revision: str | None = None, token: str | None = None,
               cache_dir: str | None = None, allow_pickle: bool = False, config: str | None = None,
               progress: bool | None = None) -> LoadedModel:
    """Load the UNet and noise schedule of `source` (folder, weights file, or Hub `org/name[@rev]`).

    Raises ScanError (one-line message) for anything wrong with the source; UnsupportedModelError for
    model kinds terd-scan cannot scan; UnsafeFileError for refused pickles or code.
    `progress`: Hub download bars on stderr (None: only when stderr is a terminal).
    """
    if config is not None and not os.path.isfile(config):
        raise ScanError(f"config file not found: {config}; pass the UNet's config.json")
    src = resolve_source(source, revision=revision, token=token, cache_dir=cache_dir, allow_pickle=allow_pickle,
                         progress=progress)
    notes = list(src.notes)
    reader = _Reader(src)

    if src.weights_file is None and src.kind == "local":
        ckpt = _ddim_repo_file_in_folder(src.root)
        if ckpt is not None:  # a DDIM-repo / TrojDiff log folder: ckpt.pth and no diffusers files
            src.weights_file = ckpt
            notes.append(f"no diffusers model files in the folder: scanned {reader.rel(ckpt)}")
    if src.weights_file is not None:
        ddim = _load_ddim_repo(source, src, reader, allow_pickle=allow_pickle, config=config, notes=notes)
        if ddim is not None:
            return ddim
    if src.weights_file is not None:  # a single weights file
        pipeline_class = None
        cfg_path = os.path.abspath(config) if config else os.path.join(src.root, "config.json")
        if not os.path.isfile(cfg_path):
            raise ScanError(f"no config for {source}: pass --config <UNet config.json> or put config.json beside "
                            "the weights file")
        sched = os.path.join(src.root, "scheduler_config.json")
        sched = sched if os.path.isfile(sched) else None
        weights_path = src.weights_file
        unet_dir = src.root
        latent = None
    else:
        pipeline_class, unet_dir, cfg_path, sched, latent = _plan_folder(src, reader, config, notes)
        weights_path = None

    # UNet config: JSON data, checked before anything is built
    unet_cfg = reader.json(cfg_path, "config", "UNet config")
    safety.check_unet_config(unet_cfg, reader.rel(cfg_path) if not config else config, pipeline_class)

    sched_cfg, schedule_origin = _scheduler_config(reader, sched, unet_cfg, reader.rel(cfg_path), notes)
    _check_family(pipeline_class, sched_cfg, unet_cfg, reader.rel(cfg_path))

    # build on the meta device: exact parameter count and expected shapes, nothing allocated
    meta_unet = _build_unet(unet_cfg, meta=True, where=reader.rel(cfg_path))
    n_params = sum(p.numel() for p in meta_unet.parameters())
    if n_params > safety.MAX_PARAMS:
        raise ScanError(f"{reader.rel(cfg_path)} describes a UNet of {n_params:.2e} parameters (limit "
                        f"{safety.MAX_PARAMS:.0e}); refusing to allocate it")
    expected = {k: tuple(v.shape) for k, v in meta_unet.state_dict().items()}
    # every config is checked before any weights are read (on the Hub: downloaded)
    ae_plan = _plan_autoencoder(reader, latent, unet_cfg, reader.rel(cfg_path)) if latent is not None else None

    # weights
    if weights_path is None:
        weights_path = _weights_path(src, reader, unet_dir, allow_pickle, notes)
    sd, pickle_loaded = _read_weights(reader, meta_unet, weights_path, expected, allow_pickle, notes, "UNet")
    unet = _assign(meta_unet, sd, reader.rel(weights_path))

    autoencoder = None
    if latent is not None:
        autoencoder, ae_pickle = _load_autoencoder(src, reader, ae_plan, allow_pickle, notes)
        pickle_loaded = pickle_loaded or ae_pickle
    return _loaded_model(source, src, reader, unet, sched_cfg, schedule_origin, pipeline_class, pickle_loaded, notes,
                         autoencoder)


def _weights_path(src: ResolvedSource, reader: _Reader, folder: str, allow_pickle: bool, notes: list[str]) -> str:
    """The weights file of a component folder, downloaded (Hub) now that the configs passed the gate."""
    name = _find_weights(_list_folder(src, folder), reader.rel(folder) if folder != src.root else "", notes)
    path = os.path.join(folder, name)
    if src.fetch is not None:
        rel = reader.rel(path)
        if not allow_pickle and name.lower().endswith(safety.PICKLE_SUFFIXES):
            raise UnsafeFileError(f"{rel} is a pickle, which can run code when loaded (not downloaded); "
                                  f"{safety.PICKLE_REFUSAL_FIX}")
        path = src.fetch(rel)
    return path


def _read_weights(reader: _Reader, meta_model, weights_path: str, expected: dict, allow_pickle: bool,
                  notes: list[str], what: str) -> tuple[dict, bool]:
    """Read, gate and check one component's weights against its meta-built model: (fp32 state dict,
    whether a pickle was loaded)."""
    rel_w = reader.rel(weights_path)
    rf, fmt = reader.weights(weights_path)
    pickle_loaded = False
    if fmt == "safetensors":
        rename = safety.legacy_key_map(meta_model, safety.safetensors_header(rf.data, rf.path))
        sd = safety.load_safetensors_bytes(rf, expected, rename, what)
    else:
        if not allow_pickle:
            safety.refuse_pickle(rf, rel_w)
        sd = safety.load_pickle_bytes(rf, rel_w)
        pickle_loaded = True
        notes.append(f"{rel_w} is a pickle: loaded with torch.load(weights_only=True) because --allow-pickle was given")
        rename = safety.legacy_key_map(meta_model, sd)
    reader.record_weights(weights_path, rf, fmt)
    del rf
    if rename:
        sd = {rename.get(k, k): v for k, v in sd.items()}
        notes.append(f"{rel_w}: {len(rename)} legacy attention weight names (query/key/value/proj_attn) mapped to "
                     "to_q/to_k/to_v/to_out.0, as diffusers does on load")
    return safety.check_state_dict(sd, expected, rel_w, what), pickle_loaded


def _plan_autoencoder(reader: _Reader, latent: tuple[str, str, str], unet_cfg: dict, unet_where: str) -> dict:
    """Check the LDM autoencoder's config against the UNet and build it on the meta device."""
    key, cls, folder = latent
    cfg_path = os.path.join(folder, "config.json")
    where = reader.rel(cfg_path)
    cfg = reader.json(cfg_path, "config", f"{cls} config")
    safety.check_autoencoder_config(cfg, cls, where)
    c_lat = cfg.get("latent_channels", 3 if cls == "VQModel" else 4)
    c_unet = unet_cfg.get("in_channels", 3)
    if c_lat != c_unet:
        raise ScanError(f"latent channels do not match: {where} encodes {c_lat} channels but the UNet ({unet_where}) "
                        f"takes {c_unet}; the autoencoder and the UNet come from different models")
    if cls == "AutoencoderKL" and (cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None):
        raise UnsupportedModelError(f"not supported yet: per-channel latents_mean/latents_std in {where}; terd-scan "
                                    "decodes with a single scaling_factor (and shift_factor)")
    meta = _build_model(cls, cfg, meta=True, where=where)
    n_params = sum(p.numel() for p in meta.parameters())
    if n_params > safety.MAX_PARAMS:
        raise ScanError(f"{where} describes a {cls} of {n_params:.2e} parameters (limit {safety.MAX_PARAMS:.0e}); "
                        "refusing to allocate it")
    return {"key": key, "cls": cls, "folder": folder, "cfg": cfg, "where": where, "meta": meta,
            "expected": {k: tuple(v.shape) for k, v in meta.state_dict().items()}}


def _load_autoencoder(src: ResolvedSource, reader: _Reader, plan: dict, allow_pickle: bool,
                      notes: list[str]) -> tuple[LoadedAutoencoder, bool]:
    """The LDM autoencoder's weights, through the same gate as the UNet's (keys, shapes, dtypes, NaN checked
    before they are assigned to the meta-built model)."""
    key, cls, folder, cfg, where, meta = (plan[k] for k in ("key", "cls", "folder", "cfg", "where", "meta"))
    weights_path = _weights_path(src, reader, folder, allow_pickle, notes)
    sd, pickle_loaded = _read_weights(reader, meta, weights_path, plan["expected"], allow_pickle, notes, cls)
    model = _assign(meta, sd, reader.rel(weights_path), cls)
    if cls == "VQModel":
        # LDM's VQ latents are used unscaled (the VQ space has about unit variance); diffusers' LDMPipeline
        # divides by the config default 0.18215, which breaks CompVis/ldm-celebahq-256 (diffusers issue 6725)
        sf, shift = 1.0, 0.0
        if "scaling_factor" in cfg and cfg["scaling_factor"] != 1.0:
            notes.append(f"{where}: scaling_factor {cfg['scaling_factor']} ignored: VQModel latents are decoded "
                         "unscaled, as in latent diffusion")
    else:
        sf, shift = float(cfg.get("scaling_factor", 0.18215)), float(cfg.get("shift_factor") or 0.0)
    n_down = len(cfg.get("block_out_channels", [64])) - 1
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items()
              if k != "_use_default_values"}
    return LoadedAutoencoder(model=model, class_name=cls, component=key, config=config, scaling_factor=sf,
                             shift_factor=shift, downsample=2 ** n_down), pickle_loaded


def _scheduler_config(reader: _Reader, sched: str | None, unet_cfg: dict, cfg_where: str, notes: list[str],
                      default_note: str = DEFAULT_SCHEDULE_NOTE) -> tuple[dict, str]:
    """The scheduler config (checked) and where it came from; the DDPM default when there is none."""
    if sched is not None:
        sched_cfg = reader.json(sched, "scheduler", "scheduler config")
        safety.check_scheduler_config(sched_cfg, reader.rel(sched))
        sched_cfg = dict(sched_cfg)
        sched_cfg.setdefault("_class_name", "DDPMScheduler")
        schedule_origin = f"{reader.rel(sched)} ({sched_cfg['_class_name']})"
        if "prediction_type" not in sched_cfg and sched_cfg["_class_name"] not in (safety.VE_SCHEDULERS
                                                                                  | safety.CM_SCHEDULERS):
            notes.append("scheduler config has no prediction_type: diffusers' default 'epsilon' applies")
        return sched_cfg, schedule_origin
    if unet_cfg.get("time_embedding_type") == "fourier":
        raise UnsupportedModelError(f"not supported: {cfg_where} is a score-SDE (NCSN++-style, Fourier time embedding) "
                                    "UNet but no scheduler config gives its sigma range; add the model's "
                                    "scheduler_config.json (ScoreSdeVeScheduler: sigma_min, sigma_max)")
    notes.append(default_note)
    return dict(DEFAULT_SCHEDULER_CONFIG), DEFAULT_SCHEDULE_ORIGIN


def _check_family(pipeline_class: str | None, sched_cfg: dict, unet_cfg: dict, where: str) -> None:
    """The UNet, the scheduler and the pipeline must describe the same model family."""
    ve = sched_cfg.get("_class_name") in safety.VE_SCHEDULERS
    fourier = unet_cfg.get("time_embedding_type") == "fourier"
    cm = sched_cfg.get("_class_name") in safety.CM_SCHEDULERS
    if pipeline_class in safety.CM_PIPELINES and not cm:
        raise UnsupportedModelError(f"not supported yet: {pipeline_class} with a {sched_cfg.get('_class_name')} "
                                    "(terd-scan scans consistency models with CMStochasticIterativeScheduler only); "
                                    "fix model_index.json or the scheduler config")
    if cm and pipeline_class not in (None, *safety.CM_PIPELINES):
        raise UnsupportedModelError(f"not supported: {pipeline_class} with a CMStochasticIterativeScheduler ({where}); "
                                    "consistency models are scanned as ConsistencyModelPipeline: fix model_index.json "
                                    "or the scheduler config")
    if cm and fourier:
        raise UnsupportedModelError(f"not supported: CMStochasticIterativeScheduler with a Fourier-embedding UNet "
                                    f"({where}); diffusers' consistency pipeline calls the UNet with 250 ln sigma, "
                                    "which needs a positional time embedding: fix the UNet or the scheduler config")
    if pipeline_class in safety.LATENT_PIPELINES and (ve or fourier):
        raise UnsupportedModelError(f"not supported: {pipeline_class} with a score-SDE VE UNet or scheduler ({where}); "
                                    "terd-scan scans latent models with a DDPM/DDIM beta schedule")
    if ve and not fourier:
        raise UnsupportedModelError(f"not supported: ScoreSdeVeScheduler with a UNet without a Fourier time embedding "
                                    f"({where}); score-SDE VE UNets (NCSN++) are called with sigma, this one expects "
                                    "timestep indices: fix the scheduler config or the UNet config")
    if fourier and not ve:
        raise UnsupportedModelError(f"not supported: {where} is a score-SDE (Fourier time embedding) UNet with a "
                                    f"{sched_cfg.get('_class_name')} beta schedule; it needs a ScoreSdeVeScheduler "
                                    "config (sigma_min, sigma_max)")
    if pipeline_class == "ScoreSdeVePipeline" and not ve:
        raise UnsupportedModelError(f"not supported: ScoreSdeVePipeline with a {sched_cfg.get('_class_name')} "
                                    "(expected ScoreSdeVeScheduler); fix model_index.json or the scheduler config")


DDIM_REPO_NAMES = ("ckpt.pth",)


def _ddim_repo_file_in_folder(root: str) -> str | None:
    """ckpt.pth in a folder with no diffusers files (a DDIM-repo / TrojDiff log folder)."""
    if any(os.path.exists(os.path.join(root, n)) for n in ("model_index.json", "config.json",
                                                            os.path.join("unet", "config.json"))):
        return None
    for name in DDIM_REPO_NAMES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def _sniff_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(9)
    except OSError:
        return b""  # the full read reports the problem


def _load_ddim_repo(source: str, src: ResolvedSource, reader: _Reader, *, allow_pickle: bool, config: str | None,
                    notes: list[str]) -> LoadedModel | None:
    """A single pickle file holding a DDIM-repo (ermongroup/ddim, TrojDiff) checkpoint; None for anything
    else (the caller's single-file path handles it). Pickles are refused unless allow_pickle."""
    from . import ddim_repo

    head = _sniff_file(src.weights_file)
    if not head or not (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"):
        return None  # safetensors, garbage, unreadable: the regular path reports it
    rf, fmt = reader.weights(src.weights_file)
    rel_w = reader.rel(src.weights_file)
    if fmt != "pickle":
        return None
    if not allow_pickle:
        safety.refuse_pickle(rf, rel_w)
    obj = safety.torch_load_weights_only(rf, rel_w)
    if not ddim_repo.is_ddim_checkpoint(obj):
        return None
    sd, more = ddim_repo.select_state_dict(obj, rel_w)
    notes.extend(more)
    del obj
    levels = ddim_repo.count_levels(sd, rel_w)
    yml = os.path.join(os.path.dirname(src.weights_file), ddim_repo.TRAINING_CONFIG_NAME)  # the DDIM repo's
    training_sched = None
    if config:
        unet_cfg = reader.json(os.path.abspath(config), "config", "UNet config")
        safety.check_unet_config(unet_cfg, config)
        notes.append(f"UNet config from {config} (--config)")
        if os.path.isfile(yml):
            notes.append(f"{reader.rel(yml)} not read: --config was given")
        cfg_where = config
    elif os.path.isfile(yml):
        unet_cfg, training_sched, cfg_where = _ddim_training_config(reader, yml, sd, rel_w, notes)
        safety.check_unet_config(unet_cfg, cfg_where)
    else:
        unet_cfg, more = ddim_repo.infer_config(sd, rel_w)
        notes.extend(more)
        safety.check_unet_config(unet_cfg, rel_w)
        cfg_where = rel_w
    sched = os.path.join(src.root, "scheduler_config.json")
    if training_sched is not None and not os.path.isfile(sched):
        sched_cfg = safety.check_scheduler_config(training_sched, cfg_where)
        schedule_origin = f"{cfg_where} (the DDIM repo's training config)"
    else:
        sched_cfg, schedule_origin = _scheduler_config(reader, sched if os.path.isfile(sched) else None, unet_cfg,
                                                       cfg_where, notes, ddim_repo.DDIM_REPO_SCHEDULE_NOTE)
    if sched_cfg is not None and schedule_origin == DEFAULT_SCHEDULE_ORIGIN:
        schedule_origin = "default: the DDIM repo's DDPM linear 1e-4..0.02, 1000 steps (no scheduler config found)"
    _check_family(None, sched_cfg, unet_cfg, cfg_where)
    meta_unet = _build_unet(unet_cfg, meta=True, where=cfg_where)
    n_params = sum(p.numel() for p in meta_unet.parameters())
    if n_params > safety.MAX_PARAMS:
        raise ScanError(f"{cfg_where} describes a UNet of {n_params:.2e} parameters (limit {safety.MAX_PARAMS:.0e}); "
                        "refusing to allocate it")
    expected = {k: tuple(v.shape) for k, v in meta_unet.state_dict().items()}
    sd = ddim_repo.to_diffusers(sd, levels, rel_w)
    sd = safety.check_state_dict(sd, expected, rel_w)
    reader.record_weights(src.weights_file, rf, fmt)
    del rf
    notes.append(f"{rel_w} is a pickle: loaded with torch.load(weights_only=True) because --allow-pickle was given")
    unet = _assign(meta_unet, sd, rel_w)
    return _loaded_model(source, src, reader, unet, sched_cfg, schedule_origin, None, True, notes)


def _ddim_training_config(reader: _Reader, path: str, sd: dict, rel_w: str,
                          notes: list[str]) -> tuple[dict, dict, str]:
    """(UNet config, scheduler config, its path) from the config.yml the DDIM repo writes beside ckpt.pth,
    read as YAML data and checked against the weights."""
    from . import ddim_repo

    cfg, rf = safety.read_ddim_yaml_config(path, "DDIM-repo training config", allowed_root=reader._allowed(path))
    rel = reader.rel(path)
    reader.files.append(FileRecord(rel, rf.sha256, rf.size, "config", "yaml"))
    inferred, _ = ddim_repo.infer_config(sd, rel_w)
    unet_cfg, sched_cfg, more = ddim_repo.from_training_config(cfg, inferred, rel)
    notes.extend(more)
    return unet_cfg, sched_cfg, rel


def _loaded_model(source, src, reader, unet, sched_cfg, schedule_origin, pipeline_class, pickle_loaded,
                  notes, autoencoder: LoadedAutoencoder | None = None) -> LoadedModel:
    """The LoadedModel and its provenance, the same for every layout."""
    prov = Provenance(source=source, kind=src.kind, root=src.root, repo_id=src.repo_id,
                      requested_revision=src.requested_revision, resolved_commit=src.resolved_commit,
                      files=reader.files, pickle_loaded=pickle_loaded, notes=notes)
    unet_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items()
                   if k != "_use_default_values"}
    return LoadedModel(name=src.name, unet=unet, unet_config=unet_config, scheduler_config=sched_cfg,
                       schedule_origin=schedule_origin, pipeline_class=pipeline_class, provenance=prov,
                       autoencoder=autoencoder)


def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()


def _build_unet(cfg: dict, *, meta: bool, where: str):
    return _build_model("UNet2DModel", cfg, meta=meta, where=where)


def _build_model(class_name: str, cfg: dict, *, meta: bool, where: str):
    """A diffusers model class (UNet2DModel, VQModel, AutoencoderKL: fixed names, never from the source)
    built from a checked config; on the meta device nothing is allocated."""
    import inspect

    import torch
    import diffusers

    _quiet_diffusers()
    cls = {"UNet2DModel": diffusers.UNet2DModel, "VQModel": diffusers.VQModel,
           "AutoencoderKL": diffusers.AutoencoderKL}[class_name]
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in params}
    try:
        if meta:
            with torch.device("meta"):
                return cls(**kwargs)
        return cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/TypeError/AssertionError for bad configs
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ScanError(f"invalid {class_name} config {where}: {msg}; fix or regenerate the config") from None


def _assign(meta_unet, sd: dict, rel_w: str, what: str = "UNet"):
    """Put the checked fp32 tensors into the meta-built model (strict: every key, every shape)."""
    try:
        missing, unexpected = meta_unet.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise ScanError(f"weights in {rel_w} do not fit the {what}: {str(exc).splitlines()[0][:160]}; the config and "
                        "the weights come from different models") from None
    leftover = [n for n, t in list(meta_unet.named_parameters()) + list(meta_unet.named_buffers()) if t.is_meta]
    if leftover:
        raise ScanError(f"weights in {rel_w} leave {len(leftover)} {what} tensors unset (e.g. {leftover[0]}); "
                        "the config and the weights come from different models")
    meta_unet.to("cpu", dtype=__import__("torch").float32)
    meta_unet.eval()
    meta_unet.requires_grad_(False)
    return meta_unet
