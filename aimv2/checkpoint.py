"""Training checkpoints through ``torch.distributed.checkpoint`` (DCP), atomic and resumable on any world size.

Layout of ``OUT/checkpoints/step_00000100/``:
- ``dcp/``: the model and optimizer state, written by every rank (DCP's ``.metadata`` + ``__<rank>_0.distcp``),
  keyed by parameter name, so a run saved on W ranks loads on any other number (DCP reshards);
- ``state.pt``: the step, the data position, the schedule's config and rank 0's RNG states;
- ``rng_rank<r>.pt``: each rank's RNG states (restored when the world size is unchanged).

A checkpoint is written into ``.tmp-step_<step>`` and renamed into place by rank 0 once every file is written
and fsynced, so a folder named ``step_*`` is always complete: a run killed at any moment, even in the middle
of a checkpoint, leaves at worst a ``.tmp-*`` folder, which is never picked and is removed by the next save.
Old checkpoints are first renamed to ``.del-*`` and then deleted, for the same reason.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .config import AIMv2Config
    from .model import AIMv2Encoder

_STEP_DIR = re.compile(r"^step_(\d+)$")
DCP_DIR, STATE_FILE = "dcp", "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unreadable or does not fit; the message says which and why."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, *, keep: int = 2) -> Path:
    """Write ``root/step_<step>`` atomically (a collective when distributed); keep the ``keep`` newest.

    Args:
        root: the run's ``checkpoints`` folder (shared by all ranks).
        step: completed optimizer steps.
        model, optimizer: plain or FSDP2-sharded; saved through DCP, keyed by parameter name.
        state: picklable training state (step, data position, configs), written by rank 0.
    Returns the checkpoint's path.
    """
    import torch.distributed.checkpoint as dcp

    rank, _ = _dist()
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    with _quiet_single_process():
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        torch.save(state, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            doomed = old.with_name(".del-" + old.name)
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    _barrier()
    return final


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
    """The ``state.pt`` of checkpoint folder ``path`` (step, data position, configs)."""
    path = Path(path)
    for name in (STATE_FILE, f"{DCP_DIR}/.metadata"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path / STATE_FILE} is corrupt or unreadable: {exc}") from None


def _check_keys(path: Path, model: torch.nn.Module) -> None:
    """Refuse, naming the keys, a checkpoint whose model tensors do not match ``model`` exactly."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path / DCP_DIR} is corrupt or unreadable: {exc}") from None
    saved = {k[len("model."):]: getattr(v, "size", None) for k, v in meta.items() if k.startswith("model.")}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(expected) & set(saved) if tuple(saved[k]) != expected[k])
    if missing or unexpected or wrong:
        parts = [f"missing keys {missing[:5]} ({len(missing)} in all)" if missing else "",
                 f"unexpected keys {unexpected[:5]} ({len(unexpected)} in all)" if unexpected else "",
                 "shape mismatch for " + ", ".join(f"{k} {tuple(saved[k])} vs {expected[k]}" for k in wrong[:5])
                 if wrong else ""]
        raise CheckpointError(f"checkpoint {path} does not fit this model ({'; '.join(p for p in parts if p)})")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = True) -> dict:
    """Load the model (strictly) and the optimizer from checkpoint folder ``path``; return its training state.

    Works for a plain or an FSDP2-sharded model, on any world size; each rank's RNG state is restored when
    the checkpoint has one for its rank and the world size is unchanged.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    state = read_state(path)
    _check_keys(path, model)
    target = _state_dicts(model, optimizer)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_single_process():
            dcp.load(target, checkpoint_id=str(path / DCP_DIR))
    except (Exception, CheckpointException) as exc:  # DCP's exception derives from BaseException
        raise CheckpointError(f"checkpoint {path / DCP_DIR} is corrupt or unreadable: "
                              f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else exc!r}") from None
    if optimizer is None:
        set_model_state_dict(model, target["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    rank, world = _dist()
    rng_file = path / f"rng_rank{rank}.pt"
    if restore_rng and rng_file.is_file() and state.get("world_size", 1) == world:
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
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
