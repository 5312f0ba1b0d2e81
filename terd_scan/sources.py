"""Where a model comes from: a local folder, a single weights file, or a Hub repo id[@revision].

A Hub source is resolved to one commit sha once, and exactly that commit is downloaded (only
JSON configs and safetensors, plus pickles when the user allowed them), so a branch that moves
during a scan cannot change what is scanned. The Hub is reached only through huggingface_hub.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from .errors import ScanError

REPO_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
                        r"(?:@(?P<rev>[^\s@]{1,200}))?$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")

# first download: the JSON configs only; weights are fetched one file at a time once the configs pass
CONFIG_PATTERNS = ["model_index.json", "config.json", "*/config.json", "scheduler_config.json",
                   "*/scheduler_config.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_DOWNLOAD_BYTES = 8 * 1024**3  # = safety.MAX_WEIGHT_BYTES


@dataclass
class ResolvedSource:
    source: str  # what the user typed
    kind: str  # "local" | "hub"
    root: str  # local folder the files are read from
    allowed_root: str  # files (after following links) must lie inside this folder
    weights_file: str | None = None  # single-file source: absolute path of the weights
    repo_id: str | None = None
    requested_revision: str | None = None
    resolved_commit: str | None = None
    name: str = "model"
    notes: list[str] = field(default_factory=list)
    # Hub sources: every file of the resolved commit (None: list the local folder) and a function that
    # downloads one of them (relative path) and returns its local path
    remote_files: list[str] | None = None
    fetch: Callable[[str], str] | None = None


def sanitize_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return name[:80] or "model"


def parse_repo_id(source: str) -> tuple[str, str | None] | None:
    """'org/name' or 'org/name@rev' -> (repo_id, rev); None when it is not shaped like a repo id."""
    m = REPO_ID_RE.match(source)
    if not m:
        return None
    repo = m.group("repo")
    if ".." in repo or "--" in repo or repo.endswith(".") or repo.endswith("-"):
        return None
    return repo, m.group("rev")


_HUB_URL_RE = re.compile(r"^(?:hf://|https?://(?:www\.)?huggingface\.co/)(?P<repo>[^/@\s]+/[^/@\s]+)"
                         r"(?:(?:/tree/|@)(?P<rev>[^\s]+?))?/?$")


def _strip_hub_prefix(source: str) -> str:
    """hf://org/name[@rev] and https://huggingface.co/org/name[/tree/rev] -> org/name[@rev]."""
    m = _HUB_URL_RE.match(source)
    if not m:
        return source
    return m.group("repo") + (f"@{m.group('rev')}" if m.group("rev") else "")


def resolve_source(source: str, *, revision: str | None = None, token: str | None = None,
                   cache_dir: str | None = None, allow_pickle: bool = False,
                   progress: bool | None = None) -> ResolvedSource:
    if not isinstance(source, str) or not source.strip():
        raise ScanError("no model given; pass a local folder, a .safetensors file or a Hub repo id like org/name")
    expanded = os.path.expanduser(source)
    if os.path.lexists(expanded):
        if revision is not None:
            raise ScanError(f"--revision applies to Hub repos, but {source} is a local path; drop --revision")
        return _resolve_local(source, expanded)
    parsed = parse_repo_id(_strip_hub_prefix(source))
    if parsed is None:
        raise ScanError(f"path not found: {source} (not a local file or folder, and not a Hub repo id like "
                        "org/name[@revision]); check the path")
    repo_id, at_rev = parsed
    if at_rev and revision and at_rev != revision:
        raise ScanError(f"two revisions given for {repo_id}: @{at_rev} and --revision {revision}; pass only one")
    return resolve_hub(source, repo_id, revision or at_rev, token=token, cache_dir=cache_dir,
                       allow_pickle=allow_pickle, progress=progress)


def _snapshot_repo_folder(path: str) -> str | None:
    """If `path` lies in a Hugging Face cache snapshot (models--org--name/snapshots/<sha>/...), the
    models--org--name folder; else None."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and re.match(r"^[0-9a-f]{40}$", parts[i + 2]):
            return os.sep.join(parts[: i + 1]) or os.sep
    return None


def _link_boundary(folder: str) -> str:
    """Files must resolve inside this folder. A cache snapshot links into ../../blobs: allow the repo folder."""
    return _snapshot_repo_folder(folder) or folder


def _local_name(folder: str) -> str:
    real = os.path.realpath(folder)
    repo = _snapshot_repo_folder(real)
    if repo is not None:  # .../models--org--name/snapshots/<sha>[/sub] -> name
        return sanitize_name(os.path.basename(repo).split("--", 2)[-1])
    return sanitize_name(os.path.basename(real))


def _resolve_local(source: str, path: str) -> ResolvedSource:
    if os.path.islink(path) and not os.path.exists(path):
        raise ScanError(f"path not found: {source} is a broken link; point it at a model folder or file")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise ScanError(f"cannot read folder {source}: permission denied; fix the permissions")
        return ResolvedSource(source=source, kind="local", root=path, allowed_root=_link_boundary(path),
                              name=_local_name(path))
    if os.path.isfile(path):
        root = os.path.dirname(path)
        if path.lower().endswith(".json"):
            raise ScanError(f"{source} is a config file, not weights; pass the folder holding it "
                            f"({root}) or the .safetensors file with --config")
        base = os.path.basename(path)
        stem = base.split(".")[0] if not base.startswith("diffusion_pytorch_model") else os.path.basename(root)
        return ResolvedSource(source=source, kind="local", root=root, allowed_root=_link_boundary(root),
                              weights_file=path, name=sanitize_name(stem))
    raise ScanError(f"{source} is neither a regular file nor a folder; pass a model folder or a weights file")


# ---------------------------------------------------------------- Hub


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _is_connection_error(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        mod = type(exc).__module__ or ""
        if isinstance(exc, (ConnectionError, TimeoutError)) or name in {
                "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
                "RemoteProtocolError", "ReadError", "WriteError", "PoolTimeout"} or (
                mod.startswith("httpx") and "Timeout" in name):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _translate_hub_error(exc: Exception, repo_id: str, revision: str | None, token_given: bool) -> ScanError:
    from huggingface_hub import errors as e

    rev = revision or "main"
    if isinstance(exc, e.GatedRepoError):
        return ScanError(f"{repo_id} is gated: access needs an accepted license and a token; accept the terms on "
                         "the Hub, then pass --token or set HF_TOKEN")
    if isinstance(exc, e.RevisionNotFoundError):
        return ScanError(f"revision not found: {rev!r} does not exist in {repo_id}; pass an existing branch, tag "
                         "or commit sha")
    if isinstance(exc, e.RepositoryNotFoundError):
        hint = ("check the repo id, or check that the token can read it" if token_given
                else "check the repo id; if it is private or gated, pass --token or set HF_TOKEN")
        return ScanError(f"repo not found on the Hub: {repo_id}; {hint}")
    if isinstance(exc, (e.OfflineModeIsEnabled, e.LocalEntryNotFoundError, e.IncompleteSnapshotError,
                        e.RevisionResolutionError)) and not _is_connection_error(exc):
        return ScanError(f"{repo_id}@{rev} is not in the local Hugging Face cache and offline mode is on "
                         "(HF_HUB_OFFLINE=1); download it once online or unset HF_HUB_OFFLINE")
    if _is_connection_error(exc):
        return ScanError(f"cannot reach the Hugging Face Hub at {_hub_endpoint()}: {_one_line(exc)}; check the "
                         "network or use HF_HUB_OFFLINE=1 with a filled cache")
    if isinstance(exc, e.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return ScanError(f"access to {repo_id} was denied (HTTP {status}); pass --token or set HF_TOKEN with "
                             "a token that can read it")
        return ScanError(f"the Hugging Face Hub at {_hub_endpoint()} answered an error for {repo_id}: "
                         f"{_one_line(exc)}; retry later or use HF_HUB_OFFLINE=1 with a filled cache")
    return ScanError(f"cannot download {repo_id}@{rev}: {type(exc).__name__}: {_one_line(exc)}; check the repo id, "
                     "the revision and the network")


def _remember_ref(repo_id: str, revision: str, sha: str, cache_dir: str | None) -> None:
    """Record revision -> sha in the cache's refs/ (as hf_hub_download does), so that the same
    `org/name@branch` works later with HF_HUB_OFFLINE=1. Best effort; never outside the repo cache."""
    from huggingface_hub import constants

    if revision == sha or not re.match(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", revision) or ".." in revision:
        return
    storage = os.path.join(cache_dir or constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    ref = os.path.join(storage, "refs", *revision.split("/"))
    try:
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        tmp = f"{ref}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(sha)
        os.replace(tmp, ref)
    except OSError:
        pass


@contextlib.contextmanager
def _progress_bars(progress: bool | None):
    """Download bars on stderr only when asked (None: when stderr is a terminal)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if progress is None:
        progress = sys.stderr.isatty()
    was_disabled = are_progress_bars_disabled()
    if not progress and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


def resolve_hub(source: str, repo_id: str, revision: str | None, *, token: str | None = None,
                cache_dir: str | None = None, allow_pickle: bool = False,
                progress: bool | None = None) -> ResolvedSource:
    """Resolve `revision` to one commit sha, then download the JSON configs of exactly that commit.

    Weights are fetched later through `ResolvedSource.fetch`, once the configs passed the gate: an
    unsupported or refused model (a text-to-image pipeline, custom code) costs a few KB, not GBs.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    token = token or None  # None lets huggingface_hub use HF_TOKEN / the saved token
    token_given = bool(token or os.environ.get("HF_TOKEN"))
    offline = bool(constants.HF_HUB_OFFLINE)
    remote_files = None
    sizes: dict[str, int] = {}
    with _hub_errors(repo_id, revision, token_given):
        if offline:
            from huggingface_hub import resolve_revision

            sha = str(resolve_revision(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True).resolved)
        else:
            api = HfApi(endpoint=constants.ENDPOINT)
            sha = api.model_info(repo_id, revision=revision, token=token).sha
        if not isinstance(sha, str) or not SHA_RE.match(sha):
            raise ScanError(f"the Hub returned no commit sha for {repo_id}@{revision or 'main'}; retry, or pass "
                            "--revision <40-hex commit>")
        if not offline:
            # the file list with sizes of exactly that commit: nothing oversized is ever downloaded
            sizes = {f.path: int(getattr(f, "size", 0) or 0)
                     for f in api.list_repo_tree(repo_id, revision=sha, recursive=True, token=token)
                     if type(f).__name__ == "RepoFile"}
            remote_files = sorted(sizes)
            _check_config_sizes(repo_id, sizes)
        with _progress_bars(progress):
            path = snapshot_download(repo_id, revision=sha, cache_dir=cache_dir, token=token,
                                     allow_patterns=CONFIG_PATTERNS, local_files_only=offline)
    if offline:
        remote_files = _cached_listing(repo_id, sha, cache_dir)
    else:
        _remember_ref(repo_id, revision or "main", sha, cache_dir)
    path = os.path.abspath(path)
    # the snapshot links into blobs/ of the same repo cache folder: that is the boundary for links
    allowed = os.path.dirname(os.path.dirname(os.path.realpath(path)))
    notes = []
    if offline:
        notes.append(f"offline: {repo_id}@{revision or 'main'} read from the local cache (commit {sha})")

    def fetch(rel_path: str) -> str:
        """Download one file of the resolved commit (or find it in the cache offline); return its path."""
        from huggingface_hub import hf_hub_download

        if not allow_pickle and rel_path.lower().endswith(PICKLE_SUFFIXES):
            return os.path.join(path, rel_path)  # never downloaded: the loader refuses it by name
        size = sizes.get(rel_path, 0)
        if size > MAX_DOWNLOAD_BYTES:
            raise ScanError(f"{repo_id}: {rel_path} is {size / 1024**3:.1f} GiB, over the "
                            f"{MAX_DOWNLOAD_BYTES // 1024**3} GiB limit for one weights file; this is not a pixel-space "
                            "UNet terd-scan can scan")
        with _hub_errors(repo_id, revision, token_given), _progress_bars(progress):
            return hf_hub_download(repo_id, rel_path, revision=sha, cache_dir=cache_dir, token=token,
                                   local_files_only=offline)

    return ResolvedSource(source=source, kind="hub", root=path, allowed_root=allowed, repo_id=repo_id,
                          requested_revision=revision, resolved_commit=sha,
                          name=sanitize_name(repo_id.split("/")[-1]), notes=notes,
                          remote_files=remote_files, fetch=fetch)


def _check_config_sizes(repo_id: str, sizes: dict[str, int]) -> None:
    import fnmatch

    from .safety import MAX_CONFIG_BYTES

    for p, size in sizes.items():
        if size > MAX_CONFIG_BYTES and any(fnmatch.fnmatch(p, pat) for pat in CONFIG_PATTERNS):
            raise ScanError(f"{repo_id}: {p} is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit for a config "
                            "file; not downloaded: this is not a model terd-scan can scan")


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, token_given: bool):
    from huggingface_hub import errors

    try:
        yield
    except ScanError:
        raise
    except (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError,
            errors.IncompleteSnapshotError, errors.RevisionResolutionError, OSError, ValueError) as exc:
        raise _translate_hub_error(exc, repo_id, revision, token_given) from None
    except Exception as exc:  # noqa: BLE001 - httpx2 transport errors and the like
        if _is_connection_error(exc):
            raise _translate_hub_error(exc, repo_id, revision, token_given) from None
        raise


def _cached_listing(repo_id: str, sha: str, cache_dir: str | None) -> list[str] | None:
    """The file list of a cached commit (trees/<sha>.json), when huggingface_hub wrote one."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return sorted(f.path for f in get_cached_repo_tree(repo_id, revision=sha, cache_dir=cache_dir)
                      if getattr(f, "path", None) and type(f).__name__ == "RepoFile")
    except Exception:  # noqa: BLE001 - no tree cached (hand-made cache): the snapshot folder is the listing
        return None
