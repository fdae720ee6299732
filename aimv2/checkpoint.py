"""Training checkpoints through ``torch.distributed.checkpoint`` (DCP): atomic, resumable on any world size, and
safe to load: nothing read from a checkpoint can run code.

Layout of ``OUT/checkpoints/step_00000100/``:
- ``dcp/``: the model and optimizer state, written by every rank (DCP's ``.metadata`` + ``__<rank>_0.distcp``),
  keyed by parameter name, so a run saved on W ranks loads on any other number (DCP reshards). DCP's
  ``.metadata`` is a pickle: it is read by an unpickler that builds only the classes of DCP's metadata
  (:data:`DCP_METADATA_GLOBALS` and torch dtypes) and refuses anything else; tensors and the optimizer's
  non-tensor values (its param groups) are read with ``torch.load(weights_only=True)``;
- ``state.json``: the training state as JSON: the step, the data position, the world size and the configs
  (dataclasses as dicts, tuples as lists);
- ``rng_rank<r>.safetensors``: rank r's RNG states (restored when the world size is unchanged): torch's CPU and
  CUDA generator states as uint8 tensors, Python's ``random`` and numpy's legacy states as JSON in the file's
  metadata.

A checkpoint is written into ``.tmp-step_<step>`` and renamed into place by rank 0 once every file is written
and fsynced, so a folder named ``step_*`` is always complete: a run killed at any moment, even in the middle
of a checkpoint, leaves at worst a ``.tmp-*`` folder, which is never picked. Old checkpoints are first renamed
to ``.del-*`` and then deleted, for the same reason. :func:`clean_leftovers` removes both kinds of leftover;
every save calls it before writing anything, and loading never writes.

Nothing is written when a model or optimizer tensor is not finite (:class:`CheckpointError` names the first);
a write that fails (a full disk: "no space left on device") removes the partial ``.tmp-*`` folder and raises
:class:`CheckpointError` naming the last good checkpoint. Checkpoints of the earlier pickle format
(``state.pt``, ``rng_rank<r>.pt``) are refused with a CheckpointError saying so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .config import AIMv2Config
    from .model import AIMv2Encoder

_STEP_DIR = re.compile(r"^step_(\d+)$")
DCP_DIR, STATE_FILE = "dcp", "state.json"
OLD_STATE_FILE = "state.pt"  # the earlier, pickled format: refused
LEFTOVER_PREFIXES = (".tmp-", ".del-")
_RNG_FORMAT = "aimv2-rng-1"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# Every global the pickled ``dcp/.metadata`` of a model + optimizer checkpoint references (torch 2.11 and 2.13,
# found by saving one and recording the unpickler's ``find_class`` calls); besides these only torch dtypes
# (``torch.float32`` ...) are allowed. ``PosixPath`` is StorageMeta's checkpoint id; building one runs no code.
DCP_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),  # Python 3.13's module of the same class
})


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unreadable, unsafe or does not fit, or could not be written; the
    message (one line) says which and why."""


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else repr(exc)
    return text[:limit]


def _unsafe(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt or unsafe to load: {why}")


# -- RNG states ------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states: ``torch`` (and ``cuda`` once CUDA is initialised), ``python`` and ``numpy``."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states returned by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_bytes(state: dict) -> bytes:
    """``state`` (from :func:`rng_state`) as a safetensors file: no pickle anywhere."""
    from safetensors.torch import save

    tensors = {"torch": state["torch"].contiguous()}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s.cpu().contiguous()
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    meta = {"format": _RNG_FORMAT,
            "python": json.dumps([int(version), [int(x) for x in internal], gauss]),
            "numpy": json.dumps([str(name), [int(x) for x in keys], int(pos), int(has_gauss), float(cached)])}
    return save(tensors, metadata=meta)


def _read_rng(path: Path) -> dict:
    """The RNG states of a ``rng_rank<r>.safetensors`` file, checked; CheckpointError naming the file if bad."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise _unsafe(path, f"not a safetensors file ({_one_line(exc)})") from None
    try:
        if meta.get("format") != _RNG_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {_RNG_FORMAT!r}")
        version, internal, gauss = json.loads(meta["python"])
        if not (isinstance(version, int) and isinstance(internal, list)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in internal)
                and (gauss is None or isinstance(gauss, float))):
            raise ValueError("the Python random state is malformed")
        name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
        if not (isinstance(name, str) and isinstance(keys, list) and all(isinstance(x, int) for x in keys)
                and isinstance(pos, int) and isinstance(has_gauss, int) and isinstance(cached, (int, float))):
            raise ValueError("the numpy random state is malformed")
        cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
        for t in [tensors["torch"], *cuda]:
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise ValueError(f"a generator state is {t.dtype} of shape {tuple(t.shape)}, not a uint8 vector")
        state = {"torch": tensors["torch"], "python": (version, tuple(internal), gauss),
                 "numpy": (name, np.array(keys, dtype=np.uint32), pos, has_gauss, float(cached))}
        if cuda:
            state["cuda"] = cuda
        # Dry run on a scratch generator: a state random/numpy would refuse is reported here, not half-applied.
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(state["numpy"])
        torch.Generator().set_state(state["torch"])
    except Exception as exc:
        raise _unsafe(path, _one_line(exc)) from None
    return state


# -- the JSON state --------------------------------------------------------------------------------------------
def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (dataclasses as dicts, tuples as lists, paths as strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"cannot write the training state: {where} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"cannot write the training state: {where} has the key {k!r}, not a string")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise CheckpointError(f"cannot write the training state: {where} is a {type(value).__name__}, "
                          f"which JSON cannot hold")


def _state_text(state: dict) -> str:
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot write the training state: it is a {type(state).__name__}, not a dict")
    return json.dumps(_jsonable(state, "state"), indent=1, allow_nan=False) + "\n"


# -- DCP metadata without arbitrary pickle ---------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata classes (:data:`DCP_METADATA_GLOBALS`) and torch dtypes."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _unsafe(self.path, f"it references {module}.{name}, which DCP metadata never holds "
                                 f"(refused: loading it could run code)")

    def persistent_load(self, pid: Any) -> Any:
        raise _unsafe(self.path, "it holds a persistent id, which DCP metadata never holds")


def _load_dcp_metadata(path: Path) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise _unsafe(path, _one_line(exc)) from None
    if not isinstance(metadata, Metadata):
        raise _unsafe(path, f"it holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


def _safe_reader(dcp_dir: Path) -> Any:
    """A ``FileSystemReader`` for ``dcp_dir`` whose ``read_metadata`` uses the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            if hasattr(self, "_get_metadata_path"):
                path = Path(self._get_metadata_path(rank))
            else:
                path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            metadata = _load_dcp_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(dcp_dir))


def _safe_planner(dcp_dir: Path) -> Any:
    """DCP's default load planner, except that the non-tensor values (the optimizer's param groups), which
    DCP reads with ``torch.load(weights_only=False)``, are first read with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as exc:
                where = dcp_dir
                with contextlib.suppress(Exception):
                    where = dcp_dir / self.metadata.storage_data[read_item.storage_index].relative_path
                raise _unsafe(where, f"{read_item.dest_index.fqn} is not plain data ({_one_line(exc)})") from None
            plain = io.BytesIO()
            torch.save(obj, plain)  # only what weights_only allowed, re-serialised by us
            plain.seek(0)
            super().load_bytes(read_item, plain)

    return SafeLoadPlanner()


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the per-rank failures DCP's CheckpointException carries."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return seen


# -- processes ----------------------------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(value: int, op: str) -> int:
    """``value`` reduced over all ranks (``"max"`` or ``"min"``); a collective when distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return int(t.item())


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call made without a process group that it assumes one process: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


# -- saving -----------------------------------------------------------------------------------------------------
def _first_nonfinite(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> str | None:
    """The name of the first model or optimizer tensor holding a NaN or an inf (the same on every rank: each
    checks its local shards and the ranks agree on the first), or None."""
    named = [(f"model tensor {k}", v) for k, v in model.state_dict().items()]
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for k, v in optimizer.state.get(p, {}).items():
                    named.append((f"optimizer state {k} of {names.get(id(p), '(unnamed parameter)')}", v))
    tensors = []
    for i, (_, t) in enumerate(named):
        if isinstance(t, torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.is_floating_point() or local.is_complex():
                tensors.append((i, local.detach()))
    bad = len(named)
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, t in tensors:
        by_device.setdefault(t.device, []).append((i, t))
    for group in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in group]).cpu().tolist()
        bad = min([bad] + [i for (i, _), ok in zip(group, finite) if not ok])
    bad = _all_reduce(bad, "min")
    return named[bad][0] if bad < len(named) else None


def _last_good(root: Path) -> str:
    found = list_checkpoints(root)
    return f"the last good checkpoint is {found[-1]}" if found else "there is no earlier checkpoint"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, *, keep: int = 2) -> Path:
    """Write ``root/step_<step>`` atomically (a collective when distributed); keep the ``keep`` newest.

    Args:
        root: the run's ``checkpoints`` folder (shared by all ranks).
        step: completed optimizer steps.
        model, optimizer: plain or FSDP2-sharded; saved through DCP, keyed by parameter name.
        state: the training state (step, data position, configs), written by rank 0 as ``state.json``: plain
            data, dataclasses (as dicts), tuples (as lists) and paths (as strings).
    Returns the checkpoint's path.
    Raises:
        CheckpointError: before writing anything when the state is not JSON data or a model or optimizer
            tensor is not finite (naming the first); when a write fails, after removing the partial folder
            (a full disk: "no space left on device", naming the last good checkpoint).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    rank, _ = _dist()
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    text = _state_text(state)
    bad = _first_nonfinite(model, optimizer)
    if bad is not None:
        raise CheckpointError(f"checkpoint {final} not written: {bad} is not finite (NaN or inf); "
                              f"{_last_good(root)}")
    failure: BaseException | None = None

    def attempt(fn: Any) -> None:
        nonlocal failure
        if failure is None:
            try:
                fn()
            except (OSError, CheckpointException) as exc:  # DCP's exception derives from BaseException
                failure = exc

    def agree() -> None:
        """A barrier on which the ranks share how they fared; on any failure, remove ``tmp`` and raise."""
        full = failure is not None and any(getattr(e, "errno", None) in _DISK_FULL for e in _causes(failure))
        code = _all_reduce(2 if full else 1 if failure is not None else 0, "max")
        if code == 0:
            return
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            detail = "another rank failed to write its part"
        else:
            causes = [e for e in _causes(failure) if isinstance(e, OSError)] or [failure]
            causes = [e for e in causes if getattr(e, "errno", None) in _DISK_FULL] or causes
            detail = _one_line(causes[0])
        what = "no space left on device" if code == 2 else "the write failed"
        raise CheckpointError(f"checkpoint {final} not written: {what} ({detail}); the partial checkpoint was "
                              f"removed; {_last_good(root)}") from None

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        clean_leftovers(root)
        tmp.mkdir()

    def shards() -> None:
        with _quiet_single_process():
            dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))

    def commit() -> None:
        _write_file(tmp / STATE_FILE, text.encode())
        _fsync_tree(tmp)
        replaced = final.with_name(".del-" + final.name)
        if final.exists():  # the same step saved again: the old copy goes only once the new one is in place
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync(root)
        shutil.rmtree(replaced, ignore_errors=True)

    if rank == 0:
        attempt(prepare)
    agree()
    attempt(shards)
    attempt(lambda: _write_file(tmp / f"rng_rank{rank}.safetensors", _rng_bytes(rng_state())))
    agree()
    if rank == 0:
        attempt(commit)
    agree()
    if rank == 0:
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            doomed = old.with_name(".del-" + old.name)
            with contextlib.suppress(OSError):  # a leftover .del-* folder is removed by the next clean
                os.rename(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    _all_reduce(0, "max")  # no rank returns before the old checkpoints are gone
    return final


def clean_leftovers(root: Path) -> list[Path]:
    """Remove what an interrupted save or prune left in the checkpoints folder ``root``: ``.tmp-*`` (a
    checkpoint being written) and ``.del-*`` (one being deleted). Return the paths removed.

    Only rank 0 removes anything (other ranks return ``[]`` at once; not a collective); call it before anything
    new is written, e.g. at the start of a run and of each save. Complete ``step_*`` checkpoints are untouched.
    """
    root = Path(root)
    if _dist()[0] != 0 or not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(LEFTOVER_PREFIXES):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


# -- loading ----------------------------------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: Path) -> Path:
    """``path`` is a run folder, its ``checkpoints`` folder, or one checkpoint; return the newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    if _STEP_DIR.match(path.name):
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"cannot resume: no checkpoint (checkpoints/step_*) found under {path}")


def read_state(path: Path) -> dict:
    """The training state (``state.json``) of checkpoint folder ``path``: step, data position, configs."""
    path = Path(path)
    if not (path / STATE_FILE).is_file() and (path / OLD_STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} has the old format ({OLD_STATE_FILE}, a pickle), which is no "
                              f"longer loaded because loading a pickle can run code; resume from a checkpoint "
                              f"written by this version ({STATE_FILE}) or start the run afresh")
    for name in (STATE_FILE, f"{DCP_DIR}/.metadata"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"checkpoint {file} is unreadable: {_one_line(exc)}") from None
    except ValueError as exc:  # also UnicodeDecodeError: a pickle or other bytes in place of JSON
        raise _unsafe(file, f"not JSON ({_one_line(exc)})") from None
    if not isinstance(state, dict):
        raise _unsafe(file, f"it holds a JSON {type(state).__name__}, not an object")
    return state


def _check_keys(path: Path, model: torch.nn.Module) -> None:
    """Refuse, naming the keys, a checkpoint whose model tensors do not match ``model`` exactly."""
    meta = _load_dcp_metadata(path / DCP_DIR / ".metadata").state_dict_metadata
    saved = {k[len("model."):]: getattr(v, "size", None) for k, v in meta.items() if k.startswith("model.")}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(expected) & set(saved) if tuple(saved[k] or ()) != expected[k])
    if missing or unexpected or wrong:
        parts = [f"missing keys {missing[:5]} ({len(missing)} in all)" if missing else "",
                 f"unexpected keys {unexpected[:5]} ({len(unexpected)} in all)" if unexpected else "",
                 "shape mismatch for " + ", ".join(f"{k} {tuple(saved[k] or ())} vs {expected[k]}"
                                                   for k in wrong[:5]) if wrong else ""]
        raise CheckpointError(f"checkpoint {path} does not fit this model ({'; '.join(p for p in parts if p)})")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = True) -> dict:
    """Load the model (strictly) and the optimizer from checkpoint folder ``path``; return its training state
    (the dict of ``state.json``). Writes nothing.

    Works for a plain or an FSDP2-sharded model, on any world size; each rank's RNG state is restored when
    the checkpoint has one for its rank and the world size is unchanged. Nothing read can run code: a file
    holding anything but plain data raises CheckpointError naming it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    state = read_state(path)
    _check_keys(path, model)
    rank, world = _dist()
    rng_file = path / f"rng_rank{rank}.safetensors"
    rng = None
    if restore_rng and rng_file.is_file() and state.get("world_size", 1) == world:
        rng = _read_rng(rng_file)  # checked before anything is changed
    target = _state_dicts(model, optimizer)
    dcp_dir = path / DCP_DIR
    try:
        with _quiet_single_process():
            dcp.load(target, storage_reader=_safe_reader(dcp_dir), planner=_safe_planner(dcp_dir))
    except (Exception, CheckpointException) as exc:  # DCP's exception derives from BaseException
        ours = [e for e in _causes(exc) if isinstance(e, CheckpointError)]
        if ours:
            raise CheckpointError(str(ours[0])) from None
        raise CheckpointError(f"checkpoint {dcp_dir} is corrupt or unreadable: "
                              f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else exc!r}") from None
    if optimizer is None:
        set_model_state_dict(model, target["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    if rng is not None:
        set_rng_state(rng)
    return state


def load_trained_encoder(path: str | Path, *, backend: str = "auto",
                         preset: str | None = None) -> tuple[AIMv2Encoder, AIMv2Config]:
    """The trained encoder of a training checkpoint, in eval mode on the CPU (released weights:
    :func:`aimv2.pretrained.load_pretrained_encoder`).

    Args:
        path: a run folder, its ``checkpoints`` folder or one ``step_*`` checkpoint (the newest is taken).
        backend: op backend of the returned encoder.
        preset: when given, the checkpoint must be of this preset; otherwise CheckpointError names both.
    Returns:
        ``(encoder, model_config)``: an :class:`aimv2.model.AIMv2Encoder` and the checkpoint's
        :class:`aimv2.config.AIMv2Config`.
    """
    import dataclasses

    from .config import AIMv2Config
    from .model import AIMv2

    ckpt = find_checkpoint(Path(path))
    state = read_state(ckpt)
    cfg = AIMv2Config.from_dict(state["model_config"])
    if preset is not None and cfg.name != preset:
        raise CheckpointError(f"checkpoint {ckpt} is from preset {cfg.name!r}, not {preset!r}")
    cfg = dataclasses.replace(cfg, backend=backend)
    with torch.device("meta"):
        model = AIMv2(cfg)
    model = model.to_empty(device="cpu")
    load_checkpoint(ckpt, model, restore_rng=False)
    return model.encoder.eval(), cfg
