"""``aimv2-train``: pre-train AIMv2 (encoder + decoder) on one device, with exact resume.

Example: ``aimv2-train --preset aimv2-demo --out runs/demo`` trains on the bundled shapes data on a CPU.
Writes ``OUT/metrics.jsonl`` (one JSON object per logged step), ``OUT/checkpoints/step_*`` and, at the end,
``OUT/loss.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aimv2_kernels import BACKENDS

from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import PRESETS, AIMv2Config
from .model import AIMv2


@dataclass
class TrainConfig:
    """One training run. ``None`` fields take the preset's recipe value."""
    preset: str = "aimv2-demo"
    out: str = "runs/demo"
    steps: int = 300
    batch_size: int = 32
    lr: float | None = None  # peak LR; None: the preset's (1e-3 L, 8e-4 H/1B, 4e-4 3B)
    warmup_steps: int | None = None  # None: 10% of steps (the paper: 12.5k of 1.5M)
    init_lr: float = 1e-6  # warm-up starts here
    min_lr: float = 1e-5  # cosine ends here
    weight_decay: float = 1e-4  # "fully decoupled": torch AdamW gets weight_decay / peak_lr
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    device: str | None = None  # None: cuda when available, else cpu
    backend: str = "auto"
    data: str = "shapes"
    tokenizer: str = "bytes"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" (the newest checkpoint under out) or a path
    progress: bool = True


def lr_at(step: int, cfg: TrainConfig, peak: float) -> float:
    """Linear warm-up from ``init_lr`` to ``peak`` over ``warmup`` steps, then cosine down to ``min_lr``."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 10)
    if step < warmup:
        return cfg.init_lr + (peak - cfg.init_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, position embeddings and the start token; decay on everything else."""
    no_decay_keys = ("norm", "bias", "pos_embed", "start_token")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(key in name for key in no_decay_keys) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class UsageError(ValueError):
    """A bad flag value found while setting up the run (printed as one line, exit code 2)."""


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


class Trainer:
    """Builds the model, data, optimizer and schedule from a :class:`TrainConfig`, and runs steps."""

    def __init__(self, cfg: TrainConfig):
        from .data import BatchLoader, build_dataset
        from .tokenizer import build_tokenizer

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = _resolve_device(cfg.device)
        self.model_cfg = AIMv2Config.from_name(cfg.preset, backend=cfg.backend)
        dec = self.model_cfg.decoder
        self.tokenizer = build_tokenizer(cfg.tokenizer, context_length=dec.context_length)
        if self.tokenizer.vocab_size > dec.vocab_size:
            raise ValueError(f"--tokenizer {cfg.tokenizer} has {self.tokenizer.vocab_size} tokens but preset "
                             f"{cfg.preset} has a vocabulary of {dec.vocab_size}")
        if self.tokenizer.pad_id != dec.pad_id:
            self.model_cfg.decoder.pad_id = self.tokenizer.pad_id
        torch.manual_seed(cfg.seed)
        self.model = AIMv2(self.model_cfg).to(self.device)
        self.peak_lr = cfg.lr if cfg.lr is not None else self.model_cfg.peak_lr
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay / self.peak_lr),
                                           lr=self.peak_lr, betas=cfg.betas, eps=1e-8)
        dataset = build_dataset(cfg.data, split="train", image_size=self.model_cfg.encoder.image_size,
                                seed=cfg.seed)
        self.loader = BatchLoader(dataset, self.tokenizer, cfg.batch_size, seed=cfg.seed)
        self.batches = iter(self.loader)
        self.step = 0  # completed optimizer steps

    # -- state -----------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "loader": self.loader.state_dict(),
                "rng": rng_state(), "train_config": dataclasses.asdict(self.cfg),
                "model_config": self.model_cfg.to_dict()}

    def save(self) -> Path:
        return save_checkpoint(self.out / "checkpoints", self.step, self.model, self.state(),
                               keep=self.cfg.keep_checkpoints)

    def resume(self, where: str) -> Path:
        path = find_checkpoint(self.out if where == "latest" else Path(where))
        state = load_checkpoint(path, self.model)
        saved = state.get("model_config", {})
        if saved.get("name") != self.model_cfg.name:
            raise CheckpointError(f"checkpoint {path} is from preset {saved.get('name')!r}, "
                                  f"not {self.model_cfg.name!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.batches = iter(self.loader)
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        return path

    # -- training --------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step on the next batch; returns the step's metrics (host-side floats)."""
        batch = next(self.batches)
        images = batch.images.to(self.device, non_blocking=True)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        lr = lr_at(self.step, self.cfg, self.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(images, tokens)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": out.loss.item(), "loss_img": out.loss_img.item(),
                "loss_txt": out.loss_txt.item(), "lr": lr, "grad_norm": float(grad_norm)}


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop logged steps after the checkpoint so the file holds one record per step."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss curves (total, image, text) and the learning rate against the step, as a PNG."""
    import matplotlib
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


def run(cfg: TrainConfig) -> dict:
    """Train for ``cfg.steps`` steps (continuing from a checkpoint when ``cfg.resume``); return a summary."""
    from tqdm.auto import tqdm

    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise UsageError(str(exc)) from exc
    trainer.out.mkdir(parents=True, exist_ok=True)
    metrics_path = trainer.out / "metrics.jsonl"
    if cfg.resume:
        path = trainer.resume(cfg.resume)
        _trim_metrics(metrics_path, trainer.step)
        print(f"resumed from {path} at step {trainer.step}", file=sys.stderr)
    elif metrics_path.exists():
        metrics_path.unlink()
    (trainer.out / "config.json").write_text(json.dumps(
        {"train": dataclasses.asdict(cfg), "model": trainer.model_cfg.to_dict()}, indent=2))

    first = last = None
    # disable=None: no bar when stderr is not a terminal (CI logs); --no-progress turns it off everywhere.
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=None if cfg.progress else True, unit="step",
               dynamic_ncols=True)
    window_start, window_images = time.perf_counter(), 0
    with open(metrics_path, "a") as log:
        while trainer.step < cfg.steps:
            m = trainer.train_step()
            window_images += cfg.batch_size
            if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                now = time.perf_counter()
                m["images_per_s"] = window_images / max(now - window_start, 1e-9)
                window_start, window_images = now, 0
                log.write(json.dumps(m) + "\n")
                log.flush()
                first = first or m
                last = m
                bar.set_postfix(loss=f"{m['loss']:.3f}", img=f"{m['loss_img']:.3f}", txt=f"{m['loss_txt']:.3f}",
                                ips=f"{m['images_per_s']:.0f}")
                if bar.disable and cfg.progress:  # not a terminal: one plain line per logged step instead
                    print(f"step {m['step']}/{cfg.steps}  loss {m['loss']:.4f}  img {m['loss_img']:.4f}  "
                          f"txt {m['loss_txt']:.4f}  lr {m['lr']:.2e}  {m['images_per_s']:.1f} img/s",
                          file=sys.stderr, flush=True)
            if trainer.step % cfg.ckpt_every == 0 or trainer.step == cfg.steps:
                trainer.save()
            bar.update(1)
    bar.close()
    checkpoint = find_checkpoint(trainer.out) if (trainer.out / "checkpoints").is_dir() else None
    plot = plot_metrics(metrics_path, trainer.out / "loss.png")
    return {"first": first, "last": last, "metrics": metrics_path, "checkpoint": checkpoint, "plot": plot}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="aimv2-train", description="Pre-train AIMv2 (encoder + causal multimodal decoder).")
    p.add_argument("--preset", default=d.preset, help=f"model preset, one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--out", default=d.out, help="run folder: metrics.jsonl, checkpoints/, loss.png")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS, help="op backend for the whole model")
    p.add_argument("--data", default=d.data, help="dataset (bundled: shapes)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="'bytes' or a SentencePiece .model file")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --out, or from the given checkpoint path")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    for name in ("steps", "batch_size", "log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = run(cfg)
    except (UsageError, CheckpointError) as exc:
        print(f"aimv2-train: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
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
