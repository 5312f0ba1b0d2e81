"""The serialization gate: every byte terd-scan reads from a model source passes through here.

- The format of a weight file is decided from its bytes, never its name: safetensors (8-byte
  little-endian header length + JSON header), pickle (0x80 protocol marker) or a torch zip
  archive (which holds a pickle). Anything else is refused.
- safetensors is preferred; pickles are refused unless the user opts in, and then they are read
  only with torch.load(weights_only=True), which cannot run code.
- Config files are JSON data with a size limit and type checks; absurd model sizes are refused
  before anything is allocated.
- Each file is read once into memory, hashed, and parsed from those same bytes, so the sha256
  recorded in the provenance is the hash of exactly what was loaded.
- Weights must match the model exactly (keys, shapes), be floating point and finite.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from dataclasses import dataclass

from .errors import ScanError, UnsafeFileError, UnsupportedModelError

MAX_CONFIG_BYTES = 1_000_000  # a real UNet/scheduler config is < 2 KB
MAX_WEIGHT_BYTES = 8 * 1024**3  # 8 GiB: far above any unconditional pixel-space UNet
MAX_HEADER_BYTES = 100 * 1024**2  # same limit as the safetensors library
MAX_PARAMS = 2_000_000_000
MAX_CHANNELS = 100_000
MAX_BLOCKS = 16
MAX_LAYERS_PER_BLOCK = 64
MAX_SAMPLE_SIZE = 4096
MAX_IO_CHANNELS = 64

KNOWN_LIBRARIES = ("diffusers", "transformers", None)  # the libraries diffusers itself loads components from
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_REFUSAL_FIX = "convert to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"

# diffusers model_index classes
SUPPORTED_PIPELINES = {"DDPMPipeline", "DDIMPipeline", "PNDMPipeline", "ScoreSdeVePipeline", "LDMPipeline",
                       "ConsistencyModelPipeline"}
NOT_YET_PIPELINES = {"KarrasVePipeline",
                     "LatentDiffusionUncondPipeline", "DanceDiffusionPipeline", "DiTPipeline"}
# latent diffusion: the autoencoder of an LDMPipeline (CompVis/ldm-* name it "vqvae"; "vae" is accepted too)
LATENT_PIPELINES = {"LDMPipeline"}
AUTOENCODER_KEYS = ("vqvae", "vae")
AUTOENCODER_CLASSES = {"VQModel", "AutoencoderKL"}
SCANNED_PIPELINES = ("DDPMPipeline, DDIMPipeline, PNDMPipeline, ScoreSdeVePipeline, LDMPipeline and "
                     "ConsistencyModelPipeline")
# consistency models: the pipeline and the only scheduler it is scanned with (denoisers.ConsistencyDenoiser)
CM_PIPELINES = {"ConsistencyModelPipeline"}
# schedulers whose config is a DDPM-style beta schedule (the DDIM-compatible family)
SUPPORTED_SCHEDULERS = {
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
    "UniPCMultistepScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
}
# score-SDE VE: a sigma schedule, scanned through its variance-preserving view (denoisers.VEDenoiser)
VE_SCHEDULERS = {"ScoreSdeVeScheduler"}
# consistency models: a Karras sigma grid and the consistency function's scalings (denoisers.ConsistencyDenoiser)
CM_SCHEDULERS = {"CMStochasticIterativeScheduler"}
CM_MIN_STEPS = 20
NOT_YET_SCHEDULERS = {"KarrasVeScheduler",
                      "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "ScoreSdeVpScheduler"}
TEXT_TO_IMAGE_MARKERS = ("StableDiffusion", "Kandinsky", "Text2", "Txt2", "Flux", "PixArt", "Sana",
                         "Wuerstchen", "LatentConsistency", "ControlNet", "UnCLIP", "Versatile", "AudioLDM")
TEXT_COMPONENTS = {"text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                   "tokenizer_3", "feature_extractor", "image_encoder", "safety_checker", "transformer"}
CAPTION_MSG = ("not covered: caption-trigger backdoors are outside TERD's noise-space threat model ({what} is a "
               "text-conditioned model); terd-scan scans unconditional UNet2DModel pipelines (DDPM, DDIM, PNDM, "
               "score-SDE VE, latent diffusion, consistency models): check this model with a text-trigger backdoor "
               "defense instead")


def _fmt_path(path: str) -> str:
    return path.replace("\n", "\\n")


# ---------------------------------------------------------------- reading files


@dataclass
class ReadFile:
    path: str  # absolute path that was read
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


def check_inside(path: str, allowed_root: str) -> str:
    """Resolve symlinks and refuse a file that lands outside allowed_root (a symlink escape)."""
    real = os.path.realpath(path)
    base = os.path.realpath(allowed_root)
    if os.path.commonpath([real, base]) != base:
        raise UnsafeFileError(f"{_fmt_path(path)} is a link to {_fmt_path(real)}, outside the model folder "
                              f"{_fmt_path(base)}; copy the real file into the folder")
    return real


def read_bytes(path: str, *, limit: int, what: str, allowed_root: str | None = None) -> ReadFile:
    """Read a whole file once (size-limited), hash it, return the bytes."""
    if allowed_root is not None:
        check_inside(path, allowed_root)
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise ScanError(f"{what} {_fmt_path(path)} is {size} bytes, over the {limit}-byte limit; "
                            "this is not a model file terd-scan can scan")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except PermissionError:
        raise ScanError(f"cannot read {what} {_fmt_path(path)}: permission denied; "
                        "fix the file permissions or run as a user who can read it") from None
    except IsADirectoryError:
        raise ScanError(f"{what} {_fmt_path(path)} is a directory, expected a file") from None
    except FileNotFoundError:
        raise ScanError(f"{what} not found: {_fmt_path(path)}") from None
    except OSError as exc:
        raise ScanError(f"cannot read {what} {_fmt_path(path)}: {exc.strerror or exc}; check the file") from None
    if len(data) > limit:
        raise ScanError(f"{what} {_fmt_path(path)} grew past the {limit}-byte limit while reading; retry")
    return ReadFile(path=path, data=data, sha256=hashlib.sha256(data).hexdigest())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- JSON configs


def _config_text(rf: ReadFile, what: str, expected: str) -> str:
    try:
        return rf.data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScanError(f"{what} {_fmt_path(rf.path)} is not UTF-8 text; expected {expected}") from None


def parse_json_config(rf: ReadFile, what: str) -> dict:
    """Parse JSON data (never code) and require a JSON object."""
    text = _config_text(rf, what, "a JSON config file")
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except _NonFinite as exc:
        raise ScanError(f"{what} {_fmt_path(rf.path)} contains the non-JSON number {exc.args[0]}; replace it "
                        "with a finite number or regenerate the file with save_pretrained") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ScanError(f"{what} {_fmt_path(rf.path)} is not valid JSON: {msg}{where}; "
                        "fix or regenerate the file with save_pretrained") from None
    if not isinstance(obj, dict):
        raise ScanError(f"{what} {_fmt_path(rf.path)} holds a JSON {type(obj).__name__}, expected an object "
                        "of config fields; fix or regenerate the file with save_pretrained")
    return obj


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NonFinite(name)


def read_json_config(path: str, what: str, *, allowed_root: str | None = None) -> tuple[dict, ReadFile]:
    rf = read_bytes(path, limit=MAX_CONFIG_BYTES, what=what, allowed_root=allowed_root)
    return parse_json_config(rf, what), rf


# ---------------------------------------------------------------- DDIM-repo config.yml


def _ddim_config_loader():
    """A YAML loader for data only. The DDIM repo (and TrojDiff, built on it) writes config.yml with
    yaml.dump of nested argparse.Namespace objects; that one tag is read as a plain mapping (no object is
    built, nothing is imported or called). Every other python/ tag is refused, as yaml.SafeLoader does."""
    import yaml

    class DDIMConfigLoader(yaml.SafeLoader):
        pass

    DDIMConfigLoader.add_constructor("tag:yaml.org,2002:python/object:argparse.Namespace",
                                     lambda loader, node: loader.construct_mapping(node, deep=True))
    return DDIMConfigLoader


def parse_ddim_yaml_config(rf: ReadFile, what: str) -> dict:
    """Parse a DDIM-repo config.yml as YAML data (never code) and require a mapping."""
    import yaml

    text = _config_text(rf, what, "the DDIM repo's YAML config")
    try:
        obj = yaml.load(text, Loader=_ddim_config_loader())  # noqa: S506 - a SafeLoader subclass, data only
    except yaml.constructor.ConstructorError as exc:
        raise UnsafeFileError(f"{what} {_fmt_path(rf.path)} asks YAML to build Python objects ({_yaml_problem(exc)}); "
                              "terd-scan reads configs as data only: remove the tag or pass --config") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ScanError(f"{what} {_fmt_path(rf.path)} is not valid YAML ({_yaml_problem(exc)}); fix the file or "
                        "pass --config with a UNet config.json") from None
    if not isinstance(obj, dict):
        raise ScanError(f"{what} {_fmt_path(rf.path)} holds a YAML {type(obj).__name__}, expected the DDIM repo's "
                        "mapping of data/model/diffusion sections; fix the file or pass --config")
    return obj


def _yaml_problem(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    mark = getattr(exc, "problem_mark", None)
    return f"{problem[:120]}" + (f", line {mark.line + 1}" if mark is not None else "")


def read_ddim_yaml_config(path: str, what: str, *, allowed_root: str | None = None) -> tuple[dict, ReadFile]:
    rf = read_bytes(path, limit=MAX_CONFIG_BYTES, what=what, allowed_root=allowed_root)
    return parse_ddim_yaml_config(rf, what), rf


# ---------------------------------------------------------------- model_index.json


def _is_custom_code_entry(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and value[0] not in KNOWN_LIBRARIES


def check_model_index(index: dict, where: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """Allow-list the pipeline and its components; return (pipeline class, {name: (lib, class)})."""
    cls = index.get("_class_name")
    if isinstance(cls, (list, tuple)):
        raise UnsafeFileError(f"{where} names custom pipeline code {list(cls)!r}; terd-scan never runs code from a "
                              "model repo: use a standard diffusers pipeline (DDPMPipeline, DDIMPipeline)")
    if not isinstance(cls, str) or not cls:
        raise ScanError(f"{where} has no pipeline class (_class_name); expected e.g. \"DDPMPipeline\"; "
                        "regenerate it with DDPMPipeline.save_pretrained")
    components: dict[str, tuple[str, str]] = {}
    for key, value in index.items():
        if key.startswith("_"):
            continue
        if _is_custom_code_entry(value):
            raise UnsafeFileError(f"{where} loads component '{key}' from custom code {list(value)!r}; terd-scan never "
                                  "runs code from a model repo: use diffusers classes only")
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            # plain metadata such as "_diffusers_version" handled above; other shapes are odd
            raise ScanError(f"{where} has a malformed entry '{key}': {value!r:.80}; expected "
                            "[\"diffusers\", \"<ClassName>\"]")
        lib, comp_cls = value
        if lib is None and comp_cls is None:
            continue  # optional component not present
        if not isinstance(comp_cls, str):
            raise ScanError(f"{where} has a malformed entry '{key}': {value!r:.80}; expected "
                            "[\"diffusers\", \"<ClassName>\"]")
        components[key] = (lib, comp_cls)

    unet_cls = components.get("unet", components.get("model", (None, None)))[1]
    if cls in NOT_YET_PIPELINES:
        raise UnsupportedModelError(f"not supported yet: {cls} ({where}); terd-scan currently scans "
                                    f"{SCANNED_PIPELINES} with a UNet2DModel")
    if (unet_cls == "UNet2DConditionModel" or any(k in TEXT_COMPONENTS for k in components)
            or cls == "IFPipeline" or any(m in cls for m in TEXT_TO_IMAGE_MARKERS)):
        what = f"{cls} with a UNet2DConditionModel" if unet_cls == "UNet2DConditionModel" else cls
        raise UnsupportedModelError(CAPTION_MSG.format(what=f"{what} ({where})"))
    if cls not in SUPPORTED_PIPELINES:
        raise UnsupportedModelError(f"unknown pipeline class {cls!r:.80} in {where}; terd-scan scans "
                                    f"{SCANNED_PIPELINES} with a UNet2DModel")
    unet_key = "unet" if "unet" in components else ("model" if "model" in components else None)
    if unet_key is None:
        raise ScanError(f"{where} names no 'unet' component; expected \"unet\": [\"diffusers\", \"UNet2DModel\"]")
    for key, (lib, comp_cls) in components.items():
        if key in (unet_key, "scheduler") and lib != "diffusers":
            raise UnsupportedModelError(f"{where}: component '{key}' comes from {lib!r}, not diffusers; terd-scan "
                                        "loads only diffusers' own UNet2DModel and schedulers")
        if key == unet_key:
            if comp_cls == "UNet2DConditionModel":
                raise UnsupportedModelError(CAPTION_MSG.format(what=f"the UNet2DConditionModel in {where}"))
            if comp_cls != "UNet2DModel":
                raise UnsupportedModelError(f"not supported yet: unet class {comp_cls!r:.60} in {where}; "
                                            "terd-scan scans UNet2DModel denoisers")
        elif key == "scheduler":
            check_scheduler_class(comp_cls, where)
        elif key in AUTOENCODER_KEYS and cls in LATENT_PIPELINES:
            check_autoencoder_class(lib, comp_cls, f"{where} ('{key}')")
        else:
            raise UnsupportedModelError(f"not supported yet: component '{key}' ({comp_cls}) in {where}; "
                                        "terd-scan scans pipelines made of a UNet2DModel and a scheduler")
    if cls in LATENT_PIPELINES:
        found = [k for k in AUTOENCODER_KEYS if k in components]
        if len(found) != 1:
            what = "no autoencoder" if not found else f"two autoencoders ({', '.join(found)})"
            raise ScanError(f"{where} is an {cls} with {what}; expected one \"vqvae\": [\"diffusers\", \"VQModel\"] "
                            "(or \"vae\": [\"diffusers\", \"AutoencoderKL\"]) beside the unet")
    return cls, components


def check_autoencoder_class(lib, cls, where: str) -> str:
    if lib != "diffusers":
        raise UnsupportedModelError(f"{where}: the autoencoder comes from {lib!r}, not diffusers; terd-scan loads only "
                                    "diffusers' VQModel and AutoencoderKL")
    if cls not in AUTOENCODER_CLASSES:
        raise UnsupportedModelError(f"not supported: autoencoder class {cls!r:.60} in {where}; terd-scan decodes "
                                    f"latent models with {' or '.join(sorted(AUTOENCODER_CLASSES))}")
    return cls


def check_scheduler_class(cls, where: str) -> str:
    if isinstance(cls, (list, tuple)):
        raise UnsafeFileError(f"{where} names custom scheduler code {list(cls)!r}; use a diffusers scheduler")
    if not isinstance(cls, str):
        raise ScanError(f"{where}: scheduler _class_name must be a string, got {type(cls).__name__}; "
                        "expected e.g. \"DDPMScheduler\"")
    if cls in VE_SCHEDULERS or cls in CM_SCHEDULERS:
        return cls
    if cls in NOT_YET_SCHEDULERS:
        raise UnsupportedModelError(f"not supported yet: {cls} ({where}) has no DDPM beta schedule; "
                                    "terd-scan scans DDPM/DDIM-family (variance-preserving) models")
    if cls not in SUPPORTED_SCHEDULERS:
        raise UnsupportedModelError(f"unknown scheduler class {cls!r:.80} in {where}; terd-scan scans "
                                    "DDPM/DDIM-family schedulers (e.g. DDPMScheduler, DDIMScheduler)")
    return cls


def check_scheduler_config(cfg: dict, where: str) -> dict:
    cls = cfg.get("_class_name", "DDPMScheduler")
    check_scheduler_class(cls, where)
    n = cfg.get("num_train_timesteps", 1000)
    if not _is_int(n) or not 1 <= n <= 100_000:
        raise ScanError(f"{where}: num_train_timesteps must be an integer in 1..100000, got {n!r:.40}; "
                        "fix the scheduler config")
    if cls in VE_SCHEDULERS:
        for k in ("sigma_min", "sigma_max", "snr", "sampling_eps"):
            v = cfg.get(k)
            if v is not None and (not _is_number(v) or not 0.0 < float(v) < 1e8):
                raise ScanError(f"{where}: {k} must be a positive finite number, got {v!r:.40}; fix the scheduler config")
        if float(cfg.get("sigma_min", 0.01)) >= float(cfg.get("sigma_max", 1348.0)):
            raise ScanError(f"{where}: sigma_min must be below sigma_max; fix the scheduler config")
        if n < 2:
            raise ScanError(f"{where}: num_train_timesteps must be at least 2 for a VE sigma grid; fix the scheduler config")
    if cls in CM_SCHEDULERS:
        for k in ("sigma_min", "sigma_max", "sigma_data", "rho"):
            v = cfg.get(k)
            if v is not None and (not _is_number(v) or not 0.0 < float(v) < 1e8):
                raise ScanError(f"{where}: {k} must be a positive finite number, got {v!r:.40}; fix the scheduler config")
        v = cfg.get("s_noise")
        if v is not None and (not _is_number(v) or not 0.0 <= float(v) < 1e3):
            raise ScanError(f"{where}: s_noise must be a finite number >= 0, got {v!r:.40}; fix the scheduler config")
        v = cfg.get("clip_denoised")
        if v is not None and not isinstance(v, bool):
            raise ScanError(f"{where}: clip_denoised must be true or false, got {v!r:.40}; fix the scheduler config")
        if float(cfg.get("sigma_min", 0.002)) >= float(cfg.get("sigma_max", 80.0)):
            raise ScanError(f"{where}: sigma_min must be below sigma_max; fix the scheduler config")
        if cfg.get("num_train_timesteps", 40) < CM_MIN_STEPS:
            raise ScanError(f"{where}: num_train_timesteps must be at least {CM_MIN_STEPS} for a consistency model's "
                            "sigma grid (the reversion probes its 10 largest and 10 smallest sigmas); fix the "
                            "scheduler config (diffusers' default is 40)")
    for k in ("beta_start", "beta_end"):
        v = cfg.get(k)
        if v is not None and (not _is_number(v) or not 0.0 < float(v) < 1.0):
            raise ScanError(f"{where}: {k} must be a number in (0, 1), got {v!r:.40}; fix the scheduler config")
    tb = cfg.get("trained_betas")
    if tb is not None:
        if not isinstance(tb, list) or len(tb) > 100_000 or not all(_is_number(b) and 0 < b < 1 for b in tb):
            raise ScanError(f"{where}: trained_betas must be a list of numbers in (0, 1); fix the scheduler config")
    for k in ("beta_schedule", "prediction_type", "timestep_spacing", "variance_type"):
        v = cfg.get(k)
        if v is not None and not isinstance(v, str):
            raise ScanError(f"{where}: {k} must be a string, got {type(v).__name__}; fix the scheduler config")
    return cfg


# ---------------------------------------------------------------- UNet config


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_unet_config(cfg: dict, where: str, pipeline_class: str | None = None) -> dict:
    """Type- and range-check a UNet2DModel config before anything is built (pipeline_class: the
    model_index.json class, for family-specific messages)."""
    cls = cfg.get("_class_name")
    if cls == "UNet2DConditionModel" or "cross_attention_dim" in cfg or "encoder_hid_dim" in cfg:
        raise UnsupportedModelError(CAPTION_MSG.format(what=f"the UNet2DConditionModel in {where}"))
    if cls is None and "block_out_channels" not in cfg:
        raise ScanError(f"{where} is not a UNet2DModel config (no _class_name, no block_out_channels; it may hold "
                        "training arguments); point terd-scan at the folder holding the UNet's config.json")
    if cls is not None and cls != "UNet2DModel":
        if isinstance(cls, str):
            raise UnsupportedModelError(f"not supported yet: model class {cls!r:.60} in {where}; "
                                        "terd-scan scans UNet2DModel denoisers")
        raise UnsafeFileError(f"{where}: _class_name {cls!r:.60} is not a diffusers class name; "
                              "terd-scan never runs code from a model repo")
    if (cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None) \
            and pipeline_class in CM_PIPELINES:
        raise UnsupportedModelError(f"not supported: class-conditional consistency model in {where} (num_class_embeds="
                                    f"{cfg.get('num_class_embeds')!r:.20}); TERD's threat model is the starting noise of "
                                    "an unconditional sampler and terd-scan never invents class labels: scan an "
                                    "unconditional consistency model (num_class_embeds null, e.g. "
                                    "openai/diffusers-cd_bedroom256_lpips)")
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        raise UnsupportedModelError(f"not supported yet: class-conditional UNet in {where} (num_class_embeds/"
                                    "class_embed_type set); terd-scan scans unconditional models")

    def bad(field, value, expect):
        raise ScanError(f"{where}: {field} must be {expect}, got {value!r:.60}; fix or regenerate the config")

    boc = cfg.get("block_out_channels", (224, 448, 672, 896))
    if not isinstance(boc, list) and not isinstance(boc, tuple):
        bad("block_out_channels", boc, "a list of positive integers")
    if not 1 <= len(boc) <= MAX_BLOCKS:
        bad("block_out_channels", boc, f"a list of 1..{MAX_BLOCKS} channel counts")
    for c in boc:
        if not _is_int(c) or not 1 <= c <= MAX_CHANNELS:
            bad("block_out_channels", boc, f"a list of integers in 1..{MAX_CHANNELS}")
    for key, default in (("down_block_types", None), ("up_block_types", None)):
        v = cfg.get(key, default)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and len(s) < 64 for s in v):
            bad(key, v, "a list of block type names")
        if len(v) != len(boc):
            bad(key, v, f"a list of {len(boc)} block names (one per block_out_channels entry)")
    ints = {"layers_per_block": (1, MAX_LAYERS_PER_BLOCK), "in_channels": (1, MAX_IO_CHANNELS),
            "out_channels": (1, MAX_IO_CHANNELS), "norm_num_groups": (1, MAX_CHANNELS),
            "attention_head_dim": (1, MAX_CHANNELS), "time_embedding_dim": (1, 4 * MAX_CHANNELS),
            "downsample_padding": (0, 16), "attn_norm_num_groups": (1, MAX_CHANNELS),
            "num_train_timesteps": (1, 100_000)}
    for key, (lo, hi) in ints.items():
        v = cfg.get(key)
        if v is None:
            continue
        if not _is_int(v) or not lo <= v <= hi:
            bad(key, v, f"an integer in {lo}..{hi}")
    ss = cfg.get("sample_size")
    if ss is not None:
        dims = list(ss) if isinstance(ss, (list, tuple)) else [ss]
        if not 1 <= len(dims) <= 2 or not all(_is_int(d) and 1 <= d <= MAX_SAMPLE_SIZE for d in dims):
            bad("sample_size", ss, f"an integer (or [h, w]) in 1..{MAX_SAMPLE_SIZE}")
    for key in ("norm_eps", "freq_shift", "mid_block_scale_factor", "dropout"):
        v = cfg.get(key)
        if v is not None and not _is_number(v):
            bad(key, v, "a finite number")
    for key in ("time_embedding_type", "mid_block_type", "downsample_type", "upsample_type", "act_fn",
                "resnet_time_scale_shift"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str):
            bad(key, v, "a string")
    for key in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, bool):
            bad(key, v, "true or false")
    est = estimate_unet_params(cfg)
    if est > MAX_PARAMS:
        raise ScanError(f"{where} describes a UNet of about {est:.2e} parameters (limit {MAX_PARAMS:.0e}); "
                        "refusing to allocate it: this config is corrupt or not a pixel-space DDPM UNet")
    return cfg


def check_autoencoder_config(cfg: dict, expected_cls: str, where: str) -> dict:
    """Type- and range-check a VQModel / AutoencoderKL config before anything is built."""
    cls = cfg.get("_class_name", expected_cls)
    if cls != expected_cls:
        if not isinstance(cls, str):
            raise UnsafeFileError(f"{where}: _class_name {cls!r:.60} is not a diffusers class name; "
                                  "terd-scan never runs code from a model repo")
        raise ScanError(f"{where} is a {cls!r:.60} config but model_index.json names a {expected_cls}; "
                        "fix model_index.json or the autoencoder's config.json")

    def bad(field, value, expect):
        raise ScanError(f"{where}: {field} must be {expect}, got {value!r:.60}; fix or regenerate the config")

    boc = cfg.get("block_out_channels", [64])
    if not isinstance(boc, (list, tuple)) or not 1 <= len(boc) <= MAX_BLOCKS \
            or not all(_is_int(c) and 1 <= c <= MAX_CHANNELS for c in boc):
        bad("block_out_channels", boc, f"a list of 1..{MAX_BLOCKS} integers in 1..{MAX_CHANNELS}")
    for key in ("down_block_types", "up_block_types"):
        v = cfg.get(key)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and len(s) < 64 for s in v) \
                or len(v) != len(boc):
            bad(key, v, f"a list of {len(boc)} block names (one per block_out_channels entry)")
    ints = {"layers_per_block": (1, MAX_LAYERS_PER_BLOCK), "in_channels": (1, MAX_IO_CHANNELS),
            "out_channels": (1, MAX_IO_CHANNELS), "latent_channels": (1, MAX_IO_CHANNELS),
            "norm_num_groups": (1, MAX_CHANNELS), "num_vq_embeddings": (1, 1_000_000),
            "vq_embed_dim": (1, MAX_IO_CHANNELS), "sample_size": (1, MAX_SAMPLE_SIZE)}
    for key, (lo, hi) in ints.items():
        v = cfg.get(key)
        if v is not None and (not _is_int(v) or not lo <= v <= hi):
            bad(key, v, f"an integer in {lo}..{hi}")
    sf = cfg.get("scaling_factor")
    if sf is not None and (not _is_number(sf) or not 0.0 < float(sf) < 1e6):
        bad("scaling_factor", sf, "a positive finite number")
    sh = cfg.get("shift_factor")
    if sh is not None and not _is_number(sh):
        bad("shift_factor", sh, "a finite number or null")
    for key in ("act_fn", "norm_type"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str):
            bad(key, v, "a string")
    return cfg


def estimate_unet_params(cfg: dict) -> int:
    """Upper-ish estimate of UNet2DModel parameters from its config, without building anything."""
    boc = list(cfg.get("block_out_channels", (224, 448, 672, 896)))
    lpb = int(cfg.get("layers_per_block", 2))
    total = 0
    prev = boc[0]
    for c in boc:
        # down: lpb resnets (two 3x3 convs + time proj) + attention (4 c^2) + downsample (9 c^2)
        total += lpb * (9 * prev * c + 9 * c * c + 4 * c * c + 4 * c * c) + 9 * c * c
        prev = c
    for c in boc:
        # up: lpb + 1 resnets with concatenated inputs (2c -> c) + attention + upsample
        total += (lpb + 1) * (9 * 2 * c * c + 9 * c * c + 4 * c * c + 4 * c * c) + 9 * c * c
    c = boc[-1]
    total += 2 * (18 * c * c) + 4 * c * c  # mid block
    return int(total)


# ---------------------------------------------------------------- weights


def sniff_format(data: bytes, path: str) -> str:
    """'safetensors' | 'pickle' (incl. torch zip archives); decided by bytes, never by name."""
    if len(data) >= 9:
        (n,) = struct.unpack("<Q", data[:8])
        if 2 <= n <= MAX_HEADER_BYTES and data[8:9] == b"{":
            return "safetensors"
    if data[:4] == b"PK\x03\x04":
        return "pickle"  # torch.save zip archive: data.pkl inside
    if data[:1] == b"\x80":
        return "pickle"
    if not data:
        raise ScanError(f"weight file {_fmt_path(path)} is empty; re-download or re-save the model")
    raise ScanError(f"unknown weight format in {_fmt_path(path)} (neither safetensors nor a torch pickle); "
                    "re-download the file or save it with safetensors")


_ST_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
              "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}
_FLOAT_ST = {"F16", "BF16", "F32", "F64"}


def safetensors_header(data: bytes, path: str) -> dict[str, dict]:
    """Parse and check the safetensors header from bytes: dtypes, shapes, offsets inside the file."""
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ScanError(f"truncated safetensors file {_fmt_path(path)}: header says {n} bytes, file has "
                        f"{len(data) - 8}; re-download or re-save the model")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ScanError(f"corrupt safetensors file {_fmt_path(path)}: the header is not valid JSON; "
                        "re-download or re-save the model") from None
    if not isinstance(header, dict):
        raise ScanError(f"corrupt safetensors file {_fmt_path(path)}: the header is not a JSON object")
    body = len(data) - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (dtype in _ST_DTYPES and isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
                  and _is_int(start) and _is_int(end) and 0 <= start <= end <= body
                  and end - start == math.prod(shape) * _ST_DTYPES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            if isinstance(info, dict) and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
                    and _is_int(info["data_offsets"][1]) and info["data_offsets"][1] > body:
                raise ScanError(f"truncated safetensors file {_fmt_path(path)}: tensor {name!r:.60} runs past the end "
                                "of the file; re-download or re-save the model")
            raise ScanError(f"corrupt safetensors file {_fmt_path(path)}: bad entry for tensor {name!r:.60}; "
                            "re-download or re-save the model")
        if dtype not in _FLOAT_ST:
            raise ScanError(f"weight {name!r:.60} in {_fmt_path(path)} has dtype {dtype}, expected floating point; "
                            "quantized or integer checkpoints are not supported, save fp32/fp16 weights")
        tensors[name] = {"dtype": dtype, "shape": tuple(shape)}
    return tensors


def load_safetensors_bytes(rf: ReadFile, expected: dict[str, tuple] | None = None,
                           rename: dict[str, str] | None = None, what: str = "UNet"):
    """Load a state dict from safetensors bytes; check keys and shapes against `expected` first
    (after applying `rename` to the stored names)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    header = safetensors_header(rf.data, rf.path)
    if expected is not None:
        rename = rename or {}
        check_keys_and_shapes({rename.get(k, k): v["shape"] for k, v in header.items()}, expected, rf.path, what)
    try:
        sd = st_load(rf.data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ScanError(f"corrupt safetensors file {_fmt_path(rf.path)}: {str(exc).splitlines()[0][:160]}; "
                        "re-download or re-save the model") from None
    return sd


def pickle_globals(rf: ReadFile) -> list[str]:
    """Names a pickle would import beyond plain tensors (read from the opcodes, never executed)."""
    if rf.data[:4] == b"PK\x03\x04":
        import torch

        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(rf.data)))
        except Exception:  # noqa: BLE001 - best effort, for the message only
            return []
    return _raw_pickle_globals(rf.data)


_TORCH_REBUILD_OK = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "collections.OrderedDict",
                     "torch.FloatStorage", "torch.HalfStorage", "torch.BFloat16Storage", "torch.DoubleStorage",
                     "torch.LongStorage", "torch.IntStorage", "torch.ByteStorage", "torch.BoolStorage"}


def _raw_pickle_globals(data: bytes) -> list[str]:
    import pickletools

    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data[:64 * 1024 * 1024])):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif op.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - truncated or odd pickle: report what was seen
        pass
    return sorted({n for n in names if n not in _TORCH_REBUILD_OK})


def refuse_pickle(rf: ReadFile, rel: str):
    names = pickle_globals(rf)
    extra = f"; it imports {', '.join(names[:4])}" if names else ""
    raise UnsafeFileError(f"{rel} is a pickle, which can run code when loaded{extra}; {PICKLE_REFUSAL_FIX}")


def load_pickle_bytes(rf: ReadFile, rel: str):
    """torch.load with weights_only=True only: tensors and plain containers, never arbitrary objects.
    Returns a flat state dict of tensors."""
    import torch

    obj = torch_load_weights_only(rf, rel)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ScanError(f"{rel} is not a flat state dict of tensors (got {type(obj).__name__}); save the UNet with "
                        "UNet2DModel.save_pretrained")
    return obj


def torch_load_weights_only(rf: ReadFile, rel: str):
    """The object in a torch pickle, read with torch.load(weights_only=True) (tensors and plain containers
    only; anything else is refused unexecuted)."""
    import pickle

    import torch

    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4 ..." and similar
            obj = torch.load(io.BytesIO(rf.data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = pickle_globals(rf)
        if names:
            raise UnsafeFileError(f"{rel} was refused by torch's weights-only loader (it imports {', '.join(names[:4])}); "
                                  "it holds more than tensors and was not executed: convert it to safetensors in a "
                                  "sandbox") from None
        lines = [ln.strip() for ln in str(exc).split("WeightsUnpickler error:")[-1].splitlines() if ln.strip()]
        detail = lines[0][:100] if lines and "WeightsUnpickler error" in str(exc) else "unreadable pickle"
        raise ScanError(f"cannot load pickle checkpoint {rel} with torch's weights-only loader ({detail}); nothing "
                        "was executed: re-download it, or re-save it with safetensors") from None
    except Exception as exc:  # noqa: BLE001 - corrupt archive, truncated pickle, ...
        raise ScanError(f"corrupt pickle checkpoint {rel}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}; re-download or re-save it") from None
    return obj


_LEGACY_ATTN = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))


def legacy_key_map(model, keys) -> dict[str, str]:
    """Old diffusers attention names (query/key/value/proj_attn, e.g. google/ddpm-* checkpoints) -> current
    ones (to_q/to_k/to_v/to_out.0), for the attention blocks diffusers itself converts on load
    (modules flagged _from_deprecated_attn_block). Returns {old: new} for the keys present."""
    paths = [name for name, mod in model.named_modules() if getattr(mod, "_from_deprecated_attn_block", False)]
    keys = set(keys)
    mapping = {}
    for path in paths:
        for old, new in _LEGACY_ATTN:
            for suffix in ("weight", "bias"):
                k = f"{path}.{old}.{suffix}"
                if k in keys:
                    mapping[k] = f"{path}.{new}.{suffix}"
    return mapping


def check_keys_and_shapes(got: dict[str, tuple], expected: dict[str, tuple], path: str, what: str = "UNet") -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ScanError(f"weights in {_fmt_path(path)} do not match the {what} config: {'; '.join(parts)}; "
                        "the config and the weights come from different models")
    for k, shape in expected.items():
        if tuple(got[k]) != tuple(shape):
            raise ScanError(f"weights in {_fmt_path(path)} do not match the {what} config: {k} has shape "
                            f"{list(got[k])}, the config needs {list(shape)}; the config and the weights come "
                            "from different models")


def check_state_dict(sd: dict, expected: dict[str, tuple], path: str, what: str = "UNet") -> dict:
    """Keys, shapes, dtypes, finiteness; returns an fp32 state dict."""
    import torch

    check_keys_and_shapes({k: tuple(v.shape) for k, v in sd.items()}, expected, path, what)
    out = {}
    for k, v in sd.items():
        if not torch.is_floating_point(v):
            raise ScanError(f"weight {k} in {_fmt_path(path)} has dtype {v.dtype}, expected floating point; "
                            "save fp32/fp16 weights")
        v = v.to(torch.float32)
        if not bool(torch.isfinite(v).all()):
            bad = "NaN" if bool(torch.isnan(v).any()) else "Inf"
            raise ScanError(f"weight {k} in {_fmt_path(path)} contains {bad} values; the checkpoint is corrupt "
                            "or diverged: re-download it or use another checkpoint")
        out[k] = v
    return out
