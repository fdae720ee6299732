"""``aimv2-train``: pre-train AIMv2 (encoder + decoder) on one device or many, with exact resume.

One process: ``aimv2-train --preset aimv2-demo --out runs/demo`` trains on the bundled shapes data (CPU works).
Many: ``torchrun --nproc-per-node 8 -m aimv2.train --preset aimv2-large-patch14-224 --data /shards
--batch-size 8192`` shards the model with FSDP2 (bf16 parameters and fp32 gradient reduction on a GPU; gloo
on a CPU) and each rank reads its slice of every global batch. ``--batch-size`` is always the global batch.
Writes ``OUT/metrics.jsonl`` (one JSON object per logged step), ``OUT/checkpoints/step_*`` (DCP, resumable on
any world size), ``OUT/skipped.json`` (unreadable samples, if any) and, at the end, ``OUT/loss.png``.

A run folder belongs to one run: the run holds an OS lock on ``OUT/.lock`` for its whole life (a second trainer
on the same folder is refused at once; the kernel drops the lock when the process dies), a folder that holds
another run is refused unless ``--resume`` continues it or ``--restart`` moves it aside into
``OUT/previous-<UTC time>/`` (nothing is deleted), and ``--resume`` with another ``--steps`` than the
checkpoint's schedule needs ``--new-schedule``. A step whose loss or gradient norm is not finite updates
nothing (it is counted and logged); ``--max-bad-steps`` of them in a row stop the run with exit status 1 and
no checkpoint of the bad state.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from aimv2_kernels import BACKENDS

from ._extras import require
from .checkpoint import (
    CheckpointError,
    clean_leftovers,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .cli import OperationalError, Parser, UsageError, check_backend, one_line, resolve_device, run_main
from .config import PRESETS, AIMv2Config
from .data import NORMALIZATIONS
from .model import AIMv2


@dataclass
class TrainConfig:
    """One training run. ``None`` fields take the preset's recipe value."""
    preset: str = "aimv2-demo"
    out: str = "runs/demo"
    steps: int = 300
    batch_size: int = 32  # the global batch: images per optimizer step over all ranks
    lr: float | None = None  # peak LR; None: the preset's (1e-3 L, 8e-4 H/1B, 4e-4 3B)
    warmup_steps: int | None = None  # None: 10% of steps (the paper: 12.5k of 1.5M)
    init_lr: float = 1e-6  # warm-up starts here
    min_lr: float = 1e-5  # cosine ends here
    weight_decay: float = 1e-4  # "fully decoupled": torch AdamW gets weight_decay / peak_lr
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    device: str | None = None  # None: cuda when available, else cpu
    backend: str = "auto"
    data: str = "shapes"  # "shapes" (bundled) or a path: webdataset shards, a folder, a CSV or a JSONL file
    normalize: str = "imagenet"  # or "clip"
    augment: bool | None = None  # RandomResizedCrop + flip; None: on for real data, off for shapes
    workers: int | None = None  # DataLoader workers per rank; None: 4 on a GPU, 0 on a CPU
    native_resolution: bool = False  # per-batch patch budgets 2^n, sin-cos positions (the paper's section 2.4)
    native_budgets: tuple[int, int] = (7, 12)  # n in [lo, hi]
    tokenizer: str = "bytes"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" (the newest checkpoint under out) or a path
    restart: bool = False  # out holds another run: move it aside into out/previous-<UTC time>/ and start fresh
    new_schedule: bool = False  # resume with another --steps: rebuild the LR schedule for the new total
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run (exit status 1)
    progress: bool = True


def lr_at(step: int, cfg: TrainConfig, peak: float) -> float:
    """Linear warm-up from ``init_lr`` to ``peak`` over ``warmup`` steps, then cosine down to ``min_lr``."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 10)
    if step < warmup:
        return cfg.init_lr + (peak - cfg.init_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * progress))


PROG = "aimv2-train"

# The ops an AIMv2 forward and loss run through aimv2_kernels: --backend must be able to run each of them.
MODEL_OPS = ("prefix_attention", "patch_mse_loss", "linear_cross_entropy")
# Files and folders of a run in OUT: either of the first two means OUT holds a run.
RUN_MARKERS = ("metrics.jsonl", "checkpoints")
LOCK_FILE = ".lock"


class DivergedError(OperationalError):
    """Training stopped: too many consecutive steps with a non-finite loss or gradient norm (exit status 1)."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, position embeddings and the start token; decay on everything else."""
    no_decay_keys = ("norm", "bias", "pos_embed", "start_token")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(key in name for key in no_decay_keys) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``. Under ``torchrun`` with ``WORLD_SIZE > 1`` this initialises the default
    process group (NCCL on GPUs, one per ``LOCAL_RANK``; gloo on CPUs); otherwise it is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_name)
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard_model(model: AIMv2, device: torch.device, world_size: int) -> AIMv2:
    """FSDP2: ``fully_shard`` every encoder and decoder block, then the root (embeddings, heads, norms).

    On a GPU the mixed-precision policy computes in bf16 parameters and reduces gradients in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    kwargs = {"mesh": mesh}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for trunk in (model.encoder.trunk, model.decoder.trunk):
        for block in trunk.blocks:
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _global_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class Trainer:
    """Builds the model, data, optimizer and schedule from a :class:`TrainConfig`, and runs steps.

    Under ``torchrun`` the model is FSDP2-sharded and each rank takes its slice of every global batch. The
    loss each rank back-propagates is its share of the *global* means (its image and text losses weighted by
    its counted patches and tokens over the global counts, times the world size, which FSDP's mean reduction
    divides out), so W ranks compute the same update as one process with the whole batch.
    """

    def __init__(self, cfg: TrainConfig):
        from .data import Normalize, TrainLoader, build_dataset
        from .tokenizer import build_tokenizer

        self.cfg = cfg
        self.out = Path(cfg.out)
        if cfg.normalize not in NORMALIZATIONS:
            raise UsageError(f"--normalize must be one of {tuple(NORMALIZATIONS)}, got {cfg.normalize!r}")
        self.rank, self.world_size, self.device = init_distributed(cfg.device)
        check_backend(cfg.backend, self.device, MODEL_OPS)
        if cfg.batch_size % self.world_size:
            raise UsageError(f"--batch-size {cfg.batch_size} is not a multiple of the world size {self.world_size}")
        self.model_cfg = AIMv2Config.from_name(cfg.preset, backend=cfg.backend)
        if cfg.native_resolution and self.model_cfg.encoder.pos_embed != "sincos":
            self.model_cfg.encoder = dataclasses.replace(self.model_cfg.encoder, pos_embed="sincos")
        dec = self.model_cfg.decoder
        try:  # 'bytes' or a SentencePiece file: anything else, a missing file or no sentencepiece is a bad flag
            self.tokenizer = build_tokenizer(cfg.tokenizer, context_length=dec.context_length)
        except (ValueError, FileNotFoundError, ImportError) as exc:
            raise UsageError(f"--tokenizer {cfg.tokenizer}: {one_line(exc)}") from exc
        if self.tokenizer.vocab_size > dec.vocab_size:
            raise UsageError(f"--tokenizer {cfg.tokenizer} has {self.tokenizer.vocab_size} tokens but preset "
                             f"{cfg.preset} has a vocabulary of {dec.vocab_size}")
        if self.tokenizer.pad_id != dec.pad_id:
            self.model_cfg.decoder.pad_id = self.tokenizer.pad_id
        enc = self.model_cfg.encoder
        if cfg.data == "shapes":
            source = build_dataset("shapes", split="train", image_size=enc.image_size, seed=cfg.seed)
            augment = bool(cfg.augment)  # the captions name positions: a flip or a crop would make them wrong
        else:
            from .data import open_source
            try:  # a path that does not exist, or holds no samples of a kind aimv2 reads: a bad --data
                source = open_source(cfg.data)
            except (ValueError, FileNotFoundError) as exc:
                raise UsageError(one_line(exc)) from exc
            except OSError as exc:  # it exists but cannot be read
                raise OperationalError(one_line(exc)) from exc
            augment = cfg.augment is None or cfg.augment
        transform = None
        if hasattr(source, "raw") and not augment:
            from .data import EvalTransform
            transform = EvalTransform(enc.image_size)  # called as transform(image, rng): the rng goes unused
        workers = cfg.workers if cfg.workers is not None else (4 if self.device.type == "cuda" else 0)
        self.loader = TrainLoader(source, self.tokenizer, cfg.batch_size, image_size=enc.image_size,
                                  patch_size=enc.patch_size, seed=cfg.seed, rank=self.rank,
                                  world_size=self.world_size, num_workers=workers,
                                  normalize=Normalize(*NORMALIZATIONS[cfg.normalize]), transform=transform,
                                  native_budgets=tuple(cfg.native_budgets) if cfg.native_resolution else None)
        self.batches = self.loader
        torch.manual_seed(cfg.seed)
        self.model = AIMv2(self.model_cfg).to(self.device)
        if self.world_size > 1:
            self.model = shard_model(self.model, self.device, self.world_size)
        self.peak_lr = cfg.lr if cfg.lr is not None else self.model_cfg.peak_lr
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay / self.peak_lr),
                                           lr=self.peak_lr, betas=cfg.betas, eps=1e-8)
        self.step = 0  # completed optimizer steps (a skipped non-finite step counts: its batch is consumed)
        self.bad_steps = 0  # steps skipped for a non-finite loss or gradient norm, in all
        self.bad_streak = 0  # ... in a row, up to the last step
        self.schedule_change: tuple[int, int] | None = None  # (checkpoint's --steps, this run's) after resume

    # -- state -----------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "bad_steps": self.bad_steps, "loader": self.loader.state_dict(),
                "world_size": self.world_size, "train_config": dataclasses.asdict(self.cfg),
                "model_config": self.model_cfg.to_dict()}

    def save(self) -> Path:
        return save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer, self.state(),
                               keep=self.cfg.keep_checkpoints)

    def resume(self, where: str) -> Path:
        from .checkpoint import read_state

        path = find_checkpoint(self.out if where == "latest" else Path(where))
        saved = read_state(path).get("model_config", {})
        if saved.get("name") != self.model_cfg.name:
            raise CheckpointError(f"checkpoint {path} is from preset {saved.get('name')!r}, "
                                  f"not {self.model_cfg.name!r}")
        mine = self.model_cfg.to_dict()
        differ = [f"{part}.{k}: {saved[part][k]!r} in the checkpoint vs {mine[part][k]!r}"
                  for part in ("encoder", "decoder") for k in mine[part]
                  if k in saved.get(part, {}) and saved[part][k] != mine[part][k]]
        if differ:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {'; '.join(differ)}")
        state = load_checkpoint(path, self.model, self.optimizer)  # a corrupt checkpoint is reported first
        self._check_schedule(path, state)
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        return path

    def _check_schedule(self, path: Path, state: dict) -> None:
        """The LR schedule is a function of --steps: resuming with another total needs --new-schedule."""
        train_config = state.get("train_config")
        saved_steps = train_config.get("steps") if isinstance(train_config, dict) else None
        step = state.get("step")
        if isinstance(step, int) and step > self.cfg.steps:
            raise UsageError(f"--steps {self.cfg.steps} is below the step of checkpoint {path} ({step})")
        if not isinstance(saved_steps, int) or saved_steps == self.cfg.steps:
            return
        if not self.cfg.new_schedule:
            raise UsageError(f"--steps {self.cfg.steps} differs from the {saved_steps} steps of the schedule of "
                             f"checkpoint {path}; pass --new-schedule to rebuild the schedule for {self.cfg.steps} "
                             f"steps, or --steps {saved_steps} to continue it")
        self.schedule_change = (saved_steps, self.cfg.steps)

    # -- training --------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step on the next batch; returns the step's metrics (host-side floats, global means)."""
        batch = next(self.batches)
        images = batch.images.to(self.device, non_blocking=True)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        prefix = getattr(batch, "prefix_lens", None)
        prefix = prefix.to(self.device, non_blocking=True) if prefix is not None else None
        lr = lr_at(self.step, self.cfg, self.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(images, tokens, prefix)
        if self.world_size > 1:
            p = self.model_cfg.encoder.patch_size
            n = (images.shape[-2] // p) * (images.shape[-1] // p)
            local = torch.stack([(n - out.prefix_lens.clamp(min=1)).sum().double(),
                                 (tokens != self.model_cfg.decoder.pad_id).sum().double()])
            total = _global_sum(local.clone())
            share_img, share_txt = (local[0] / total[0]).float(), (local[1] / total[1]).float()
            loss_img, loss_txt = out.loss_img * share_img, out.loss_txt * share_txt
            loss = (loss_txt + self.model_cfg.img_loss_weight * loss_img) * self.world_size
            logged = _global_sum(torch.stack([loss_img.detach(), loss_txt.detach()]).float())
            loss_img_v, loss_txt_v = logged[0].item(), logged[1].item()
            loss_v = loss_txt_v + self.model_cfg.img_loss_weight * loss_img_v
        else:
            loss = out.loss
            loss_v, loss_img_v, loss_txt_v = out.loss.item(), out.loss_img.item(), out.loss_txt.item()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm_v = float(grad_norm)
        # Global values (every rank sees the same), so all ranks skip the same steps.
        finite = math.isfinite(loss_v) and math.isfinite(grad_norm_v)
        if finite:
            self.optimizer.step()
            self.bad_streak = 0
        else:  # no update: the parameters and the optimizer state stay those of the last finite step
            self.bad_steps += 1
            self.bad_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        m = {"step": self.step, "loss": loss_v, "loss_img": loss_img_v, "loss_txt": loss_txt_v, "lr": lr,
             "grad_norm": grad_norm_v, "images": int(getattr(batch, "global_size", images.shape[0])),
             "patches": int(images.shape[-2] * images.shape[-1] // self.model_cfg.encoder.patch_size ** 2),
             "bad_steps": self.bad_steps}
        if not finite:
            m["skipped_update"] = True
        return m

    def parameters_finite(self) -> bool:
        """Whether every parameter is finite on every rank (a collective when distributed)."""
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for p in self.model.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                bad += (~torch.isfinite(local)).sum()
        return float(_global_sum(bad)) == 0

    def skipped_report(self) -> list[tuple[str, str]]:
        """Every (key, reason) skipped by the data on all ranks (a collective when distributed)."""
        mine = list(getattr(self.loader, "skipped", []))
        if self.world_size > 1:
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
            return [item for part in gathered for item in part]
        return mine


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, keep one record per step up to the checkpoint's; drop later steps and any line cut short
    by a kill in the middle of a write."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss curves (total, image, text) and the learning rate against the step, as a PNG."""
    matplotlib = require("matplotlib", "aimv2-train's loss plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total: L_text + 0.4 L_img"), ("loss_txt", "text (CE)"), ("loss_img", "image (MSE)")):
        ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title("AIMv2 training losses"), ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:gray")
    ax_lr.set_xlabel("step"), ax_lr.set_ylabel("learning rate"), ax_lr.set_title("schedule")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


class RunFolder:
    """``--out``, claimed for one run (rank 0 only): writable, locked, and not holding another run.

    :meth:`claim` creates the folder, proves it writable with a probe file, takes an exclusive ``flock`` on
    ``OUT/.lock`` (held until :meth:`release` or the process's death, so a SIGKILL leaves no stale lock) and
    refuses a folder that holds another run unless the run resumes or restarts. :meth:`move_aside` renames the
    old run's files into ``OUT/previous-<UTC time>/`` for ``--restart``.
    """

    def __init__(self, out: Path):
        self.out = out
        self._fd: int | None = None

    def claim(self, *, resume: bool, restart: bool) -> None:
        out = self.out
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OperationalError(f"--out {out}: exists and is not a folder") from None
        except OSError as exc:
            raise OperationalError(f"--out {out}: cannot create the run folder: {one_line(exc)}") from None
        if not out.is_dir():
            raise OperationalError(f"--out {out}: exists and is not a folder")
        probe = out / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OperationalError(f"--out {out}: the run folder is not writable: {one_line(exc)}") from None
        self._lock()
        if not resume and not restart and self.holds_run():
            raise UsageError(f"--out {out} holds another run ({', '.join(self._markers())}); pass --resume to "
                             f"continue it or --restart to move it aside and start afresh")

    def _lock(self) -> None:
        import fcntl

        path = self.out / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OperationalError(f"--out {self.out}: cannot open the lock file {path}: {one_line(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: another process holds it
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                pid = int(os.read(fd, 32).decode().strip())
                holder = f" (pid {pid})"
            os.close(fd)
            raise OperationalError(f"--out {self.out} is in use by another aimv2-train{holder}, which holds "
                                   f"{path}; wait for it to end or choose another --out") from None
        with contextlib.suppress(OSError):  # the holder's pid, for the message above; informative only
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _markers(self) -> list[str]:
        return [name for name in RUN_MARKERS if (self.out / name).exists()]

    def holds_run(self) -> bool:
        """Whether the folder holds a run (metrics or checkpoints)."""
        return bool(self._markers())

    def move_aside(self) -> Path | None:
        """Rename every entry of the folder but the lock and earlier ``previous-*`` folders into a new
        ``previous-<UTC time>`` folder; return it, or None when there was nothing to move."""
        entries = [p for p in self.out.iterdir() if p.name != LOCK_FILE and not p.name.startswith("previous-")]
        if not entries:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest, n = self.out / f"previous-{stamp}", 1
        while dest.exists():
            dest, n = self.out / f"previous-{stamp}-{n}", n + 1
        try:
            dest.mkdir()
            for entry in entries:
                os.rename(entry, dest / entry.name)
        except OSError as exc:
            raise OperationalError(f"--restart: cannot move the previous run in {self.out} aside into {dest}: "
                                   f"{one_line(exc)}") from None
        return dest

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _on_lead(rank: int, world_size: int, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 and raise its UsageError or OperationalError on every rank (so no rank waits in
    a collective for a rank 0 that has stopped)."""
    error: Exception | None = None
    if rank == 0:
        try:
            fn()
        except (UsageError, OperationalError) as exc:
            error = exc
    if world_size > 1:
        box = [None if error is None else (isinstance(error, UsageError), str(error))]
        dist.broadcast_object_list(box, src=0)
        if error is None and box[0] is not None:
            usage, message = box[0]
            error = UsageError(message) if usage else OperationalError(message)
    if error is not None:
        raise error


def run(cfg: TrainConfig) -> dict:
    """Train for ``cfg.steps`` steps (continuing from a checkpoint when ``cfg.resume``); return a summary.

    Under ``torchrun`` every rank calls this; only rank 0 claims the run folder and writes metrics, plots and
    prints. Raises UsageError or OperationalError (a :class:`DivergedError` when the run diverges).
    """
    tqdm = require("tqdm.auto", "aimv2-train's progress bar").tqdm

    rank, world_size, device = init_distributed(cfg.device)
    check_backend(cfg.backend, device, MODEL_OPS)  # before the run folder is touched
    folder = RunFolder(Path(cfg.out))
    try:
        _on_lead(rank, world_size, lambda: folder.claim(resume=bool(cfg.resume), restart=cfg.restart))
        return _run(cfg, folder, tqdm)
    finally:
        folder.release()


def _run(cfg: TrainConfig, folder: RunFolder, tqdm: Callable) -> dict:
    trainer = Trainer(cfg)  # a bad flag value raises UsageError
    lead = trainer.rank == 0
    metrics_path = trainer.out / "metrics.jsonl"
    # Leftovers of a save or a pruning cut short (.tmp-*, .del-*): removed before anything is read or written, so
    # that a resume after a full disk starts with the space they held. The folder is ours: claimed above.
    clean_leftovers(trainer.out / "checkpoints")
    if cfg.resume:
        path = trainer.resume(cfg.resume)
        if lead:
            _trim_metrics(metrics_path, trainer.step)
            print(f"resumed from {path} at step {trainer.step}", file=sys.stderr)
            if trainer.schedule_change:
                old, new = trainer.schedule_change
                print(f"--new-schedule: the learning-rate schedule of {old} steps is rebuilt for {new} steps "
                      f"(continuing at step {trainer.step})", file=sys.stderr)
    elif cfg.restart and lead:
        moved = folder.move_aside()
        if moved is not None:
            print(f"--restart: moved the previous run in {trainer.out} aside into {moved}", file=sys.stderr)
    if lead:
        (trainer.out / "config.json").write_text(json.dumps(
            {"train": dataclasses.asdict(cfg), "model": trainer.model_cfg.to_dict(),
             "world_size": trainer.world_size}, indent=2))

    first = last = None
    # disable=None: no bar when stderr is not a terminal (CI logs); --no-progress turns it off everywhere.
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=None if cfg.progress and lead else True,
               unit="step", dynamic_ncols=True)
    window_start, window_images = time.perf_counter(), 0
    save_pending = False  # a checkpoint fell due during a streak of non-finite steps: write it after the streak
    log = open(metrics_path, "a") if lead else None
    try:
        while trainer.step < cfg.steps:
            m = trainer.train_step()
            window_images += m["images"]
            bad = m.get("skipped_update", False)
            if bad or trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                now = time.perf_counter()
                m["images_per_s"] = window_images / max(now - window_start, 1e-9)
                window_start, window_images = now, 0
                if lead:
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                if not bad:
                    first = first or m
                    last = m
                bar.set_postfix(loss=f"{m['loss']:.3f}", img=f"{m['loss_img']:.3f}", txt=f"{m['loss_txt']:.3f}",
                                ips=f"{m['images_per_s']:.0f}")
                if lead and bar.disable and cfg.progress:  # not a terminal: one plain line per logged step
                    print(f"step {m['step']}/{cfg.steps}  loss {m['loss']:.4f}  img {m['loss_img']:.4f}  "
                          f"txt {m['loss_txt']:.4f}  lr {m['lr']:.2e}  {m['images_per_s']:.1f} img/s"
                          + ("  (non-finite: update skipped)" if bad else ""), file=sys.stderr, flush=True)
            if trainer.bad_streak >= cfg.max_bad_steps:
                _diverged(trainer, m)
            if trainer.step % cfg.ckpt_every == 0 or trainer.step == cfg.steps:
                save_pending = True
            if save_pending and trainer.bad_streak == 0:
                _save_finite(trainer, m)
                save_pending = False
            bar.update(1)
        if save_pending:  # the run ended inside a (short) streak: the state is the last finite step's
            _save_finite(trainer, m)
    finally:
        bar.close()
        if log is not None:
            log.close()
        trainer.loader.close()
    skipped = trainer.skipped_report()
    skipped_path = None
    if lead and skipped:
        skipped_path = trainer.out / "skipped.json"
        skipped_path.write_text(json.dumps([{"key": k, "reason": r} for k, r in skipped], indent=1))
        distinct = len({k for k, _ in skipped})
        examples = "; ".join(f"{k}: {r}" for k, r in skipped[:3])
        print(f"data: skipped {len(skipped)} unreadable samples ({distinct} distinct), replaced by others; "
              f"e.g. {examples}; all in {skipped_path}", file=sys.stderr)
    if lead and trainer.bad_steps:
        print(f"warning: {trainer.bad_steps} steps had a non-finite loss or gradient norm and updated nothing "
              f"(see 'skipped_update' in {metrics_path})", file=sys.stderr)
    checkpoint = find_checkpoint(trainer.out) if (trainer.out / "checkpoints").is_dir() else None
    plot = plot_metrics(metrics_path, trainer.out / "loss.png") if lead else None
    return {"first": first, "last": last, "metrics": metrics_path, "checkpoint": checkpoint, "plot": plot,
            "skipped": skipped, "skipped_file": skipped_path, "rank": trainer.rank,
            "world_size": trainer.world_size, "bad_steps": trainer.bad_steps}


def _last_good(trainer: Trainer) -> str:
    found = list_checkpoints(trainer.out / "checkpoints")
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"


def _diverged(trainer: Trainer, m: dict) -> None:
    n = trainer.bad_streak
    raise DivergedError(f"training diverged: {n} consecutive steps ({trainer.step - n + 1}-{trainer.step}) had a "
                        f"non-finite loss or gradient norm (last: loss {m['loss']}, grad_norm {m['grad_norm']}) "
                        f"and updated nothing; stopped without a checkpoint of them; {_last_good(trainer)} "
                        f"(lower --lr, or raise --max-bad-steps {trainer.cfg.max_bad_steps})")


def _save_finite(trainer: Trainer, m: dict) -> None:
    """Checkpoint, unless a finite step has left a non-finite parameter (an overflow): then stop the run."""
    if not trainer.parameters_finite():
        raise DivergedError(f"training diverged: after step {trainer.step} (loss {m['loss']}) a parameter is no "
                            f"longer finite; stopped without a checkpoint of it; {_last_good(trainer)} "
                            f"(lower --lr)")
    trainer.save()


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = Parser(prog=PROG, description="Pre-train AIMv2 (encoder + causal multimodal decoder).")
    p.add_argument("--preset", default=d.preset, help=f"model preset, one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--out", default=d.out,
                   help="run folder: metrics.jsonl, checkpoints/, loss.png (one run at a time: OUT/.lock)")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch: images per step over all ranks (a multiple of the world size)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS, help="op backend for the whole model")
    p.add_argument("--data", default=d.data,
                   help="'shapes' (bundled) or a path: webdataset .tar shards (a folder, a file, a glob or "
                        "'shard-{000..009}.tar'), a folder of images with .txt captions, a .csv or a .jsonl")
    p.add_argument("--normalize", default=d.normalize, choices=tuple(NORMALIZATIONS),
                   help="image statistics: imagenet (the training recipe) or clip (the released processors)")
    p.add_argument("--augment", dest="augment", action="store_true", default=None,
                   help="RandomResizedCrop(scale 0.4-1, bicubic) + flip (default: on for real data, off for shapes)")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per rank (default: 4 GPU, 0 CPU)")
    p.add_argument("--native-resolution", action="store_true",
                   help="per-batch patch budget 2^n, aspect-preserving resize + zero pad, sin-cos positions")
    p.add_argument("--native-budgets", default="7,12", metavar="LO,HI",
                   help="range of n for --native-resolution (default 7,12: 128 to 4096 patches)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="'bytes' or a SentencePiece .model file")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="continue from the newest checkpoint in --out, or from the given checkpoint path")
    again.add_argument("--restart", action="store_true",
                       help="--out holds another run: move its files aside into OUT/previous-<UTC time>/ "
                            "(nothing is deleted) and start afresh")
    p.add_argument("--new-schedule", action="store_true",
                   help="with --resume and another --steps than the checkpoint's: rebuild the learning-rate "
                        "schedule for the new total (refused without this flag)")
    p.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                   help="a step with a non-finite loss or gradient norm updates nothing; this many in a row "
                        "stop the run with exit status 1 (default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "max_bad_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and args.batch_size % int(world):
        parser.error(f"--batch-size {args.batch_size} is not a multiple of the world size {world}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps <= args.steps:
        parser.error(f"--warmup-steps must be in [0, --steps {args.steps}], got {args.warmup_steps}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.new_schedule and not args.resume:
        parser.error("--new-schedule applies only with --resume")
    if not args.out:
        parser.error("--out must name a folder")
    try:
        lo, hi = (int(v) for v in args.native_budgets.split(","))
        if not 1 <= lo <= hi <= 14:
            raise ValueError
    except ValueError:
        parser.error(f"--native-budgets must be LO,HI with 1 <= LO <= HI <= 14, got {args.native_budgets!r}")
    args.native_budgets = (lo, hi)
    if args.data != "shapes" and not any(c in args.data for c in "*{"):
        if not os.path.exists(args.data):
            parser.error(f"--data {args.data}: no such file or folder")
        if not (os.path.isfile(args.data) or os.path.isdir(args.data)):
            parser.error(f"--data {args.data}: neither a file nor a folder (give 'shapes', a folder, a .tar, "
                         f".csv or .jsonl file, a glob or a brace pattern)")
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    """``aimv2-train``: exit status 0; 2 after a usage error, 1 after an operational error such as a checkpoint
    that is missing or corrupt (see aimv2.cli)."""
    cfg = parse_args(argv)
    return run_main(PROG, _main, cfg)


def _main(cfg: TrainConfig) -> int:
    try:
        summary = run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary["rank"] != 0:
        return 0
    first, last = summary["first"], summary["last"]
    if first and last:
        print(f"loss {first['loss']:.4f} -> {last['loss']:.4f}  (image {first['loss_img']:.4f} -> "
              f"{last['loss_img']:.4f}, text {first['loss_txt']:.4f} -> {last['loss_txt']:.4f})")
    print(f"metrics:    {summary['metrics']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"plot:       {summary['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
