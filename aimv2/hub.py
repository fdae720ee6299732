"""Hugging Face hub ids (``apple/aimv2-large-patch14-224``, optionally ``@revision``) wherever a weights path is
accepted: :func:`is_hub_id` tells an id from a local path, :func:`resolve` turns it into a local folder.

:func:`aimv2.weights.read_pretrained` (hence ``AIMv2Encoder.from_pretrained``, ``load_pretrained_encoder``,
``init_from`` and ``aimv2-probe --pretrained``) calls :func:`resolve` for a string that names no local file or
folder and has the shape of a hub id. Only what loading needs is fetched (``config.json``, the weights in one
format: safetensors when the repo has them, else ``pytorch_model.bin``; ``preprocessor_config.json`` and a LiT
checkpoint's tokenizer files), into huggingface_hub's shared cache (``HF_HUB_CACHE`` / ``HF_HOME``); with
``HF_HUB_OFFLINE=1``, or when the hub cannot be reached, the cache alone is used. Nothing from the hub is
executed: no remote code is fetched, and ``.bin`` files go through ``torch.load(weights_only=True)``.

``huggingface_hub`` is optional (``pip install huggingface_hub``); local paths never need it.

Errors (every message one line): :class:`HubNotFoundError` (no such repo or revision on the hub),
:class:`HubCacheMissError` (offline or unreachable, and not in the cache: names the cache and ``hf download``),
:class:`HubError` (their base, also for a gated repo or a repo without weights). All are
:class:`~aimv2.layouts.WeightsError` (a ``ValueError``); the first two are also ``FileNotFoundError``, as a
missing local path is.
"""
from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from .layouts import WeightsError

__all__ = ["HubError", "HubNotFoundError", "HubCacheMissError", "is_hub_id", "split_hub_id", "resolve",
           "allow_patterns", "CONFIG_FILES", "SAFETENSORS_FILES", "TORCH_FILES"]

# What loading reads (config and weights) and what a LiT checkpoint's text side needs (preprocessor, tokenizer).
CONFIG_FILES = ("config.json", "preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.json")
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
TORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin")

INSTALL = "pip install huggingface_hub"

# Hub naming rules (huggingface_hub.utils.validate_repo_id): letters, digits, '-', '_', '.', at most 96
# characters, no '--' or '..'. We also ask each part to start and end with a letter or digit, and refuse names
# that end like a weights or config file, so that a mistyped local file is reported as a missing file.
_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_TIMEOUT = 10.0  # seconds for the listing request
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".msgpack", ".h5", ".git")


class HubError(WeightsError):
    """A hub id could not be turned into local files: no such repo or revision, a gated repo, no weights in the
    repo, or (offline / unreachable) not in the cache. One line, naming the id."""


class HubNotFoundError(HubError, FileNotFoundError):
    """The hub has no such repo (or it is private without access), or no such revision of it."""


class HubCacheMissError(HubError, FileNotFoundError):
    """Offline (``HF_HUB_OFFLINE=1``) or the hub unreachable, and the repo (revision) is not in the local cache."""


def split_hub_id(s: object) -> tuple[str, str | None] | None:
    """``"owner/name[@revision]"`` -> ``("owner/name", revision or None)``; None when ``s`` is not a hub id
    (see :func:`is_hub_id`)."""
    if not isinstance(s, str) or not s or s != s.strip() or os.path.lexists(s):
        return None
    repo_id, at, revision = s.partition("@")
    if at and (not _REVISION.fullmatch(revision) or ".." in revision):
        return None
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts):
        return None
    if parts[1].lower().endswith(_FILE_SUFFIXES):
        return None
    return repo_id, (revision if at else None)


def is_hub_id(s: object) -> bool:
    """Whether ``s`` is a Hugging Face hub model id: a ``str`` ``owner/name`` with an optional ``@revision``
    (branch, tag or commit), that names no existing local path.

    Strict: exactly two parts of letters, digits, ``-``, ``_`` and ``.``, each starting and ending with a letter
    or digit (so ``./x/y``, ``~/x``, absolute paths, ``C:/x``, backslashes, ``a/b/c`` and ``x/model.safetensors``
    are not ids); an ``os.PathLike`` is always a local path."""
    return split_hub_id(s) is not None


def allow_patterns(files: Iterable[str] | None = None) -> list[str]:
    """The ``allow_patterns`` of a download: the config and tokenizer files, plus the safetensors weights when
    ``files`` (the repo's file list) has any, else the ``pytorch_model.bin`` ones. ``files=None`` (unknown): both
    formats (the loader then prefers safetensors)."""
    names = None if files is None else list(files)
    has_safetensors = names is None or any(fnmatch.fnmatch(f, p) for f in names for p in SAFETENSORS_FILES)
    has_torch = names is not None and any(fnmatch.fnmatch(f, p) for f in names for p in TORCH_FILES)
    weights = list(SAFETENSORS_FILES) if has_safetensors else []
    if names is None or (has_torch and not has_safetensors):
        weights += list(TORCH_FILES)
    return list(CONFIG_FILES) + weights


def _import_hub(source: str) -> ModuleType:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ImportError(f"{source!r} is not a local file or folder, and loading it as a Hugging Face hub id "
                          f"needs huggingface_hub: {INSTALL} (or pip install 'aimv2-kernels[hub]'); a local "
                          f"folder or weights file loads without it", name="huggingface_hub") from exc
    return huggingface_hub


def _constants() -> ModuleType:
    import importlib

    return importlib.import_module("huggingface_hub.constants")  # not an attribute until something imports it


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import), else huggingface_hub's value."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None and value.strip():
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(getattr(_constants(), "HF_HUB_OFFLINE", False))


def _errors() -> dict[str, type[BaseException]]:
    """The hub's error classes by name (``huggingface_hub.errors``, or ``.utils`` in older releases)."""
    import importlib

    try:
        mod = importlib.import_module("huggingface_hub.errors")
    except ImportError:
        mod = importlib.import_module("huggingface_hub.utils")

    class _Never(Exception):
        pass

    return {n: getattr(mod, n, _Never) for n in ("GatedRepoError", "RepositoryNotFoundError",
                                                  "RevisionNotFoundError", "LocalEntryNotFoundError",
                                                  "IncompleteSnapshotError", "HFValidationError")}


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _hub_failure(exc: BaseException, errs: dict[str, type[BaseException]], label: str, repo_id: str,
                 revision: str | None) -> HubError | None:
    """The one-line HubError for a repo / revision / access error of the hub, else None."""
    if isinstance(exc, errs["GatedRepoError"]):  # before RepositoryNotFoundError, its base class
        return HubError(f"hub repo {label} is gated: accept its terms on https://huggingface.co/{repo_id} and "
                        f"log in (hf auth login, or set HF_TOKEN)")
    if isinstance(exc, errs["RepositoryNotFoundError"]):
        return HubNotFoundError(f"{label!r} is not a local file or folder, and the Hugging Face hub has no model "
                                f"repo {repo_id} (or it is private and no token gives access: hf auth login)")
    if isinstance(exc, errs["RevisionNotFoundError"]):
        return HubNotFoundError(f"hub repo {repo_id} has no revision {revision!r} (a branch, tag or commit)")
    if isinstance(exc, errs["HFValidationError"]):
        return HubNotFoundError(f"{label!r} is neither a local path nor a valid hub id ({_short(exc)})")
    return None


def _cache_miss(label: str, repo_id: str, revision: str | None, reason: str,
                detail: str = "") -> HubCacheMissError:
    cache = getattr(_constants(), "HF_HUB_CACHE", "the Hugging Face cache")
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    what = f"hub repo {repo_id}" + (f" at revision {revision!r}" if revision else "")
    return HubCacheMissError(f"{label!r} is not a local file or folder, and {what} is not in the Hugging Face "
                             f"cache {cache}{detail} ({reason}): fetch it with `{fetch}` where there is network "
                             f"(set HF_HUB_OFFLINE=0 / connect), or pass a local folder")


def _cached_files(hf: ModuleType, repo_id: str, revision: str | None) -> list[str] | None:
    """The repo's file list from the cache's tree listing (written by an online snapshot download), or None."""
    get_tree = getattr(hf, "get_cached_repo_tree", None)
    if get_tree is None:
        return None
    try:
        return [f.path for f in get_tree(repo_id, revision=revision)]
    except Exception:  # noqa: BLE001 - no listing cached (or an older layout): the download then checks nothing
        return None


def resolve(source: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """The local file or folder ``source`` names: a local path as it is, a hub id (``owner/name[@revision]``)
    as the folder of its snapshot in huggingface_hub's cache, downloaded when needed.

    Args:
        source: a local file or folder, or a hub id (:func:`is_hub_id`).
        revision: a branch, tag or commit of a hub id (instead of ``@revision``; not both).

    Returns:
        The path: for a hub id the snapshot folder (``config.json`` + the weights in one format + preprocessor
        and tokenizer files when the repo has them).

    Raises:
        FileNotFoundError: ``source`` is neither an existing local path nor a hub id.
        ImportError: a hub id without huggingface_hub installed (``pip install huggingface_hub``).
        HubNotFoundError: no such repo or revision on the hub.
        HubCacheMissError: offline (``HF_HUB_OFFLINE=1``) or the hub unreachable, and not in the cache.
        HubError: a gated repo, or a repo without weights (``model.safetensors`` / ``pytorch_model.bin``).
        ValueError: ``revision`` given both ways, or for a local path.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a str or os.PathLike, got {type(source).__name__}")
    if revision is not None and (not isinstance(revision, str) or not _REVISION.fullmatch(revision)
                                 or ".." in revision):
        raise ValueError(f"revision must be a branch, tag or commit name, got {revision!r}")
    parsed = split_hub_id(source)
    if parsed is None:
        if revision is not None:
            raise ValueError(f"revision= applies to a hub id (owner/name), not to the local path {str(source)!r}")
        p = Path(source)
        if not p.exists():
            raise FileNotFoundError(f"{str(source)!r} does not exist (and is not a hub id owner/name[@revision])")
        return p
    repo_id, at_revision = parsed
    if revision is not None and at_revision is not None and revision != at_revision:
        raise ValueError(f"{source!r} pins revision {at_revision!r}, but revision={revision!r} was given")
    revision = revision if revision is not None else at_revision
    label = str(source)

    hf = _import_hub(label)
    errs = _errors()
    files: list[str] | None = None
    reason = "HF_HUB_OFFLINE=1"
    online = not _offline()
    if online:  # list the repo first: only the weights format it has is fetched
        try:
            # model_info (one request, no retries: a machine without network fails at once) lists the files
            siblings = hf.model_info(repo_id, revision=revision, timeout=_TIMEOUT).siblings
            files = None if siblings is None else [s.rfilename for s in siblings]
        except Exception as exc:  # noqa: BLE001 - repo errors are reported; anything else: try the cache
            failure = _hub_failure(exc, errs, label, repo_id, revision)
            if failure is not None:
                raise failure from None
            online, reason = False, f"the hub could not be reached: {_short(exc)}"
    if files is not None and not any(fnmatch.fnmatch(f, p) for f in files
                                     for p in SAFETENSORS_FILES + TORCH_FILES):
        shown = ", ".join(sorted(files)[:8]) + (", ..." if len(files) > 8 else "")
        raise HubError(f"hub repo {label} has no weights this loader reads (model.safetensors, a model-*.safetensors "
                       f"shard index, or pytorch_model.bin); its files: {shown or 'none'}")
    if not online:
        files = _cached_files(hf, repo_id, revision)
    patterns = allow_patterns(files)
    try:
        folder = hf.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=not online)
    except errs["IncompleteSnapshotError"] as exc:
        raise _cache_miss(label, repo_id, revision, reason if not online else _short(exc),
                          detail=" completely (an interrupted download)") from None
    except errs["LocalEntryNotFoundError"] as exc:
        raise _cache_miss(label, repo_id, revision, reason if not online else _short(exc)) from None
    except Exception as exc:  # noqa: BLE001 - repo errors become one line; anything else keeps its type
        failure = _hub_failure(exc, errs, label, repo_id, revision)
        if failure is None:
            raise
        raise failure from None
    return Path(folder)
