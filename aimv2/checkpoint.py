"""Training checkpoints: the model as safetensors plus the optimizer, schedule, RNG and data position.

Layout: ``OUT/checkpoints/step_00000100/{model.safetensors, state.pt}``. Each checkpoint is written into a
temporary folder and renamed into place, so a folder named ``step_*`` is always complete.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d+)$")
MODEL_FILE, STATE_FILE = "model.safetensors", "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message says which and why."""


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, state: dict, *, keep: int = 2) -> Path:
    """Write ``root/step_<step>`` atomically and keep only the ``keep`` newest checkpoints. Returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"step": str(step)})
    torch.save(state, tmp / STATE_FILE)
    for name in (MODEL_FILE, STATE_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: Path) -> Path:
    """``path`` is a run folder, its ``checkpoints`` folder, or one checkpoint; return the newest checkpoint."""
    if not path.exists():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    if _STEP_DIR.match(path.name):
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"cannot resume: no checkpoint (checkpoints/step_*) found under {path}")


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    """Load the model weights (strictly) from checkpoint folder ``path``; return its training state."""
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        tensors = load_file(str(path / MODEL_FILE))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"checkpoint {path / MODEL_FILE} is corrupt or unreadable: {exc}") from None
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path / STATE_FILE} is corrupt or unreadable: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = [f"missing keys {missing[:5]}" if missing else "", f"unexpected keys {unexpected[:5]}"
                 if unexpected else "", f"shape mismatch for {wrong[:5]}" if wrong else ""]
        raise CheckpointError(f"checkpoint {path} does not fit this model ({'; '.join(p for p in parts if p)})")
    model.load_state_dict(tensors, strict=True)
    return state


def load_encoder(path: str | Path, *, backend: str = "auto", preset: str | None = None):
    """The trained encoder of a training checkpoint, in eval mode on the CPU.

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
    state_file = ckpt / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {STATE_FILE} is missing")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    cfg = AIMv2Config.from_dict(state["model_config"])
    if preset is not None and cfg.name != preset:
        raise CheckpointError(f"checkpoint {ckpt} is from preset {cfg.name!r}, not {preset!r}")
    cfg = dataclasses.replace(cfg, backend=backend)
    with torch.device("meta"):
        model = AIMv2(cfg)
    model = model.to_empty(device="cpu")
    load_checkpoint(ckpt, model)
    return model.encoder.eval(), cfg
