"""The Hugging Face Hub side of models: the cache, what is present offline, downloads, and Hub errors.

Nothing here loads weights or imports torch. Downloads take safetensors only: a diffusers pipeline's
configs, tokenizers and component weights; a transformers (eval) model's top-level configs and
``model.safetensors``, from the Hub's safetensors-conversion pull request when ``main`` has only pickles.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.base.fsutil import folder_has_version
from stencil_cli.models.refs import (
    EVAL,
    HUB_ID_PATTERN,
    PRESETS,
    SUBJECT,
    ModelRole,
    ModelSource,
    is_gated_repo,
    local_preset_dir,
    preset_for,
    pull_command,
    resolve_ref,
    split_revision,
    t5_required_error,
)
from stencil_cli.models.tiny import TINY_EVAL_VERSION, ensure_local_preset, local_preset_ready

ModelLayout = Literal["diffusers", "transformers", "tiny"]  # how a pulled model's folder is laid out

# -- what to download -----------------------------------------------------------------------------------

# Files `models pull` fetches: configs, tokenizers and safetensors weights of the components, no pickles,
# no single-file checkpoints, no half-precision variants, no safety checker, and not the SD3.5 repos'
# `text_encoders/` (single-file copies of CLIP-L/G and T5 for ComfyUI, ~15 GB that diffusers never reads).
PULL_ALLOW_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
PULL_IGNORE_PATTERNS = [
    "*.fp16.*",
    "*non_ema*",
    "*.bin",
    "*.ckpt",
    "*.pt",
    "*.pth",
    "*.msgpack",
    "*.onnx*",
    "safety_checker/*",
    "*.emaonly.*",
    "text_encoders/*",
]

# What `models pull --no-t5` leaves out: the SD3 family's T5-XXL encoder (9.5 GB) and its tokenizer.
T5_PATTERNS = ["text_encoder_3/*", "tokenizer_3/*"]

# Files `models pull` fetches for a transformers (eval) model: top-level configs, tokenizer/processor files
# and safetensors weights; no pickles (.bin, .h5, .msgpack), no subfolders (onnx/ ...), no fp16 variants.
TRANSFORMERS_ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "model.safetensors", "model-*-of-*.safetensors"]
TRANSFORMERS_IGNORE_PATTERNS = [
    "*/*",
    "*.fp16.*",
    "*.bin",
    "*.h5",
    "*.msgpack",
    "*.ckpt",
    "*.pt",
    "*.pth",
    "*.onnx*",
]
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# The Hub account that opens the automatic "Adding `safetensors` variant of this model" pull requests.
CONVERSION_BOT = "SFconvertbot"


# -- the cache, offline mode, tokens ---------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline() -> bool:
    """Whether Hugging Face Hub access is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return _truthy(env)
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, read from the environment at call time."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hf_token_present() -> bool:
    """Whether a Hugging Face token is available (HF_TOKEN or `hf auth login`); never returns the token."""
    if os.environ.get("HF_TOKEN"):
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # noqa: BLE001 - a broken token store is the same as no token here
        return False


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hub model if its model_index.json is cached, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=str(hub_cache_dir()))
    except Exception:  # noqa: BLE001 - an invalid id is simply "not cached"
        return None
    if isinstance(found, str):
        return Path(found).parent
    return None


@dataclass(frozen=True)
class CachedModel:
    """A Hub model found in the local cache: the snapshot with the weights and the one with the configs."""

    weights: Path
    files: Path


def _snapshots(repo_id: str, cache_dir: Path) -> list[Path]:
    """The cached snapshot folders of `repo_id`: the one `main` points to first, then newest first."""
    folder = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    if not (folder / "snapshots").is_dir():
        return []
    try:
        main = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        main = None
    found = [snap for snap in (folder / "snapshots").iterdir() if snap.is_dir()]
    return sorted(found, key=lambda snap: (snap.name != main, -snap.stat().st_mtime))


def cached_eval_model(repo_id: str, cache_dir: Path | None = None) -> CachedModel | None:
    """Find a transformers model's safetensors weights and config/processor files in the Hugging Face cache.

    The official DINO and CLIP repos keep their safetensors weights only on the Hub's conversion pull request
    (``refs/pr/N``); online, transformers fetches the weights from there and the configs from ``main``, so
    the two may sit in different snapshots. Offline, both are found here. `cache_dir`: default the HF cache.
    """
    snapshots = _snapshots(repo_id, cache_dir if cache_dir is not None else hub_cache_dir())
    weights = next(
        (s for s in snapshots if any((s / name).is_file() for name in SAFETENSORS_WEIGHTS)),
        None,
    )
    if weights is None:
        return None

    def complete(snap: Path) -> bool:
        return (snap / "config.json").is_file() and (snap / "preprocessor_config.json").is_file()

    files = weights if complete(weights) else next((s for s in snapshots if complete(s)), None)
    return CachedModel(weights, files) if files is not None else None


# -- Hub errors ------------------------------------------------------------------------------------------


def hub_error(error: BaseException, source: ModelSource) -> StencilError | None:
    """Translate a huggingface_hub / network error into one clear StencilError (None if not one of those)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = source.label
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        if isinstance(item, GatedRepoError) or "gated" in str(item).lower() and "access" in str(item).lower():
            how = "accept its licence on huggingface.co and log in with `hf auth login` (or set HF_TOKEN)"
            if hf_token_present():
                how = (
                    f"accept its licence on https://huggingface.co/{source.repo_id} with your token's account"
                )
            return StencilError(f"model {name} is gated", hint=how)
        if isinstance(item, RepositoryNotFoundError):
            return StencilError(
                f"no model {name} on the Hugging Face Hub (check the spelling; private models need "
                "`hf auth login`)"
            )
        if isinstance(item, RevisionNotFoundError):
            return StencilError(f"model {name}: revision not found on the Hub")
        if isinstance(item, HFValidationError):
            return BadInputError(f"invalid model id {name!r}: use owner/name, a preset or a local folder")
        if isinstance(item, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            return StencilError(
                f"model {name} is not (completely) in the Hugging Face cache and the Hub cannot be reached",
                hint=f"run `{pull_command(source)}` while online",
            )
    for item in chain:
        if isinstance(item, (ConnectionError, TimeoutError)) or type(item).__name__ in {
            "ConnectError",
            "ConnectTimeout",
            "ReadTimeout",
            "NetworkError",
        }:
            return StencilError(
                f"cannot reach the Hugging Face Hub to fetch {name}",
                hint=f"check the network, or run `{pull_command(source)}` later and set HF_HUB_OFFLINE=1",
            )
    return None


def gated_without_token(source: ModelSource) -> StencilError | None:
    """The error for a gated Hub model that is not cached while no token is set (None when that is fine)."""
    if source.gated and source.kind != "local" and not hf_token_present() and not is_offline():
        if source.repo_id and cached_snapshot(source.repo_id) is not None:
            return None
        return StencilError(
            f"model {source.label} is gated and no Hugging Face token is set",
            hint=f"accept its licence on https://huggingface.co/{source.repo_id}, then run `hf auth login` "
            "or set HF_TOKEN",
        )
    return None


# -- what is present locally ----------------------------------------------------------------------------


def folder_size(path: Path) -> int:
    """Total size in bytes of the files under `path` (following a top-level symlink)."""
    total = 0
    for root, _dirs, files in os.walk(Path(path), followlinks=True):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def cached_repos() -> dict[str, dict[str, Any]]:
    """Diffusers models in the Hugging Face cache: repo id -> {path, size_bytes, revisions}."""
    from huggingface_hub import scan_cache_dir

    cache = hub_cache_dir()
    if not cache.is_dir():
        return {}
    try:
        info = scan_cache_dir(cache)
    except Exception:  # noqa: BLE001 - an unreadable cache is an empty one here
        return {}
    found: dict[str, dict[str, Any]] = {}
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        snapshots = [rev for rev in repo.revisions if (Path(rev.snapshot_path) / "model_index.json").exists()]
        if not snapshots:
            continue
        latest = max(snapshots, key=lambda rev: rev.last_modified)
        found[repo.repo_id] = {
            "path": str(latest.snapshot_path),
            "size_bytes": int(repo.size_on_disk),
            "revisions": len(repo.revisions),
        }
    return found


def model_status(
    ref: str,
    role: ModelRole = SUBJECT,
    cache: dict[str, dict[str, Any]] | None = None,
    *,
    store_root: Path | None = None,
) -> dict[str, Any]:
    """Where a model reference points and whether it is available offline (no loading, no network)."""
    source = resolve_ref(ref, role, store_root=store_root)
    cache = cached_repos() if cache is None else cache
    row: dict[str, Any] = {
        "ref": ref,
        "kind": source.kind,
        "repo_id": source.repo_id,
        "gated": source.gated,
        "present": False,
        "path": None,
        "size_bytes": None,
    }
    if source.kind == "preset" and source.repo_id is None:
        if role == EVAL and source.path is not None:
            folder = source.path
            ready = folder_has_version(folder, TINY_EVAL_VERSION)
        else:
            folder = local_preset_dir(ref, store_root)
            ready = local_preset_ready(ref, folder)
        row.update(present=ready, path=str(folder))
        if row["present"]:
            row["size_bytes"] = folder_size(folder)
    elif source.kind == "local":
        assert source.path is not None
        marker = "config.json" if role == EVAL else "model_index.json"
        row.update(present=(source.path / marker).is_file(), path=str(source.path))
        row["size_bytes"] = folder_size(source.path) if row["present"] else None
    elif role == EVAL and source.repo_id is not None:
        found = cached_eval_model(source.repo_id)
        if found is not None:
            size = folder_size(found.weights) + (
                folder_size(found.files) if found.files != found.weights else 0
            )
            row.update(present=True, path=str(found.weights), size_bytes=size)
    elif source.repo_id in cache:
        entry = cache[source.repo_id]
        row.update(present=True, path=entry["path"], size_bytes=entry["size_bytes"])
    return row


# -- downloading -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PulledModel:
    """What `pull` downloaded (or built): the local folder, and the Hub id and revision it came from."""

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # None: main; else e.g. ``refs/pr/3`` (the Hub's safetensors conversion)
    layout: ModelLayout = "diffusers"


def pull(
    ref: str,
    role: ModelRole = SUBJECT,
    *,
    progress: bool = True,
    store_root: Path | None = None,
    no_t5: bool = False,
) -> PulledModel:
    """Download a diffusers or transformers (eval) model into the HF cache, safetensors only; tiny: build it.

    ``dino`` / ``clip`` and ``owner/name@revision`` are transformers models; another Hub id is a transformers
    model when its repo has ``config.json`` but no ``model_index.json``, else a diffusers pipeline.
    `no_t5`: leave out an SD3-family pipeline's T5 (``text_encoder_3``, ``tokenizer_3``); refused for FLUX.
    """
    preset = preset_for(ref)
    if no_t5 and preset is not None and preset.draft is not None and preset.draft.t5 == "required":
        raise t5_required_error(ref.strip())
    ref = (ref or "").strip()
    preset = PRESETS.get(ref)
    if preset is not None and preset.role == EVAL:
        assert preset.repo_id is not None
        return _pull_transformers(ref, preset.repo_id, None, progress=progress)
    if "@" in ref:
        repo_id, revision = split_revision(ref)
        if not HUB_ID_PATTERN.match(repo_id) or not revision:
            raise BadInputError(f"bad model reference {ref!r}: use owner/name or owner/name@revision")
        return _pull_transformers(ref, repo_id, revision, progress=progress)
    source = resolve_ref(ref, role, store_root=store_root)
    if source.kind == "preset" and source.repo_id is None:
        return PulledModel(ref, ensure_local_preset(ref, local_preset_dir(ref, store_root)), layout="tiny")
    if source.kind == "local":
        raise BadInputError(f"{ref} is a local folder: there is nothing to download")
    assert source.repo_id is not None
    _check_can_download(source)
    if source.kind == "hub":
        files = _hub_call(source, lambda api: api.list_repo_files(source.repo_id))
        if "model_index.json" not in files and "config.json" in files:
            return _pull_transformers(ref, source.repo_id, None, progress=progress, main_files=files)
    ignore = PULL_IGNORE_PATTERNS + (T5_PATTERNS if no_t5 else [])
    folder = _snapshot(source, None, PULL_ALLOW_PATTERNS, ignore, progress=progress)
    if not (folder / "model_index.json").is_file():
        raise StencilError(
            f"{source.label} is not a diffusers model (no model_index.json)",
            hint="stencil needs a model saved in diffusers layout",
        )
    return PulledModel(ref, folder, source.repo_id)


def _check_can_download(source: ModelSource) -> None:
    if is_offline():
        raise StencilError(
            f"cannot download {source.label}: HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE (or set it to 0) and run the command again",
        )
    gated = gated_without_token(source)
    if gated:
        raise gated


def _hub_call(source: ModelSource, call: Any) -> Any:
    """Run ``call(HfApi())`` with Hub errors turned into one clear line."""
    from huggingface_hub import HfApi

    try:
        return call(HfApi())
    except StencilError:
        raise
    except Exception as error:  # noqa: BLE001 - translated into one line
        translated = hub_error(error, source)
        if translated is not None:
            raise translated from error
        raise StencilError(f"cannot read {source.label} on the Hugging Face Hub: {error}") from error


def _snapshot(
    source: ModelSource,
    revision: str | None,
    allow: list[str],
    ignore: list[str],
    *,
    progress: bool,
) -> Path:
    """snapshot_download into the stencil-wide HF cache with the given patterns; errors made clear."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    assert source.repo_id is not None
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        folder = snapshot_download(
            source.repo_id,
            revision=revision,
            cache_dir=str(hub_cache_dir()),
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except Exception as error:  # noqa: BLE001 - translated into one line
        translated = hub_error(error, source)
        if translated is not None:
            raise translated from error
        raise StencilError(f"download of {source.label} failed: {error}") from error
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    return Path(folder)


def has_safetensors(files: list[str]) -> bool:
    """Whether a repo file listing has top-level transformers safetensors weights (single or sharded)."""
    return any(name in files for name in SAFETENSORS_WEIGHTS)


def _pr_number(ref: str) -> int | None:
    match = re.fullmatch(r"refs/pr/(\d+)", ref)
    return int(match.group(1)) if match else None


def find_safetensors_revision(repo_id: str, main_files: list[str] | None = None) -> str | None:
    """The revision of `repo_id` with safetensors weights: None when ``main`` has them, else a ``refs/pr/N``.

    Official repos such as facebook/dino-vits16 keep only pickles on ``main``; the Hub's conversion bot
    (SFconvertbot) opened a pull request adding ``model.safetensors``. Its PRs are tried first (lowest number
    first), then any other PR. Raises a clear StencilError when no revision has safetensors weights.
    """
    source = ModelSource(repo_id, "hub", repo_id, None)
    files = (
        main_files if main_files is not None else _hub_call(source, lambda api: api.list_repo_files(repo_id))
    )
    if has_safetensors(files):
        return None
    if "config.json" not in files:
        raise StencilError(f"{repo_id} is not a transformers model (no config.json on main)")
    refs = _hub_call(source, lambda api: api.list_repo_refs(repo_id, include_pull_requests=True))
    prs = sorted(
        (number, item.ref)
        for item in (refs.pull_requests or [])
        if (number := _pr_number(item.ref)) is not None
    )
    try:
        discussions = _hub_call(
            source,
            lambda api: list(
                api.get_repo_discussions(repo_id, author=CONVERSION_BOT, discussion_type="pull_request")
            ),
        )
        by_bot = {int(d.num) for d in discussions}
    except StencilError:  # the discussion list is only a preference
        by_bot = set()
    prs.sort(key=lambda pr: (pr[0] not in by_bot, pr[0]))
    for _number, revision in prs:
        if has_safetensors(
            _hub_call(source, lambda api, r=revision: api.list_repo_files(repo_id, revision=r))
        ):
            return revision
    raise StencilError(
        f"{repo_id} has no safetensors weights on main or on any pull request (stencil never loads pickle "
        "files)",
        hint="convert it at https://huggingface.co/spaces/safetensors/convert, or use another model",
    )


def _pull_transformers(
    ref: str,
    repo_id: str,
    revision: str | None,
    *,
    progress: bool,
    main_files: list[str] | None = None,
) -> PulledModel:
    """Pull a transformers model (configs, tokenizer/processor files, safetensors) from the right revision."""
    source = ModelSource(
        ref, "hub", repo_id, None, gated=is_gated_repo(repo_id), revision=revision, role=EVAL
    )
    _check_can_download(source)
    if revision is None:
        revision = find_safetensors_revision(repo_id, main_files)
    else:
        files = _hub_call(source, lambda api: api.list_repo_files(repo_id, revision=revision))
        if not has_safetensors(files):
            raise StencilError(
                f"{repo_id} has no safetensors weights (model.safetensors) at revision {revision}",
                hint=f"run `stencil models pull {repo_id}` to find the revision that has them",
            )
    folder = _snapshot(
        source, revision, TRANSFORMERS_ALLOW_PATTERNS, TRANSFORMERS_IGNORE_PATTERNS, progress=progress
    )
    if not (folder / "config.json").is_file() or not any((folder / n).is_file() for n in SAFETENSORS_WEIGHTS):
        raise StencilError(f"download of {source.label} is incomplete: no config.json or model.safetensors")
    return PulledModel(ref, folder, repo_id, revision, layout="transformers")
