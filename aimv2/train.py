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
from .layers import ACTIVATION_CHECKPOINTING, set_activation_checkpointing
from .model import AIMv2, count_parameters


@dataclass
class TrainConfig:
    """One training run: every field is a flag of ``aimv2-train`` and a key of its ``--config`` file.
    ``None`` fields take the preset's recipe value."""
    preset: str = "aimv2-demo"
    out: str = "runs/demo"
    config: str | None = None  # the TOML file the values came from (recorded; flags typed override it)
    steps: int = 300
    batch_size: int = 32  # the global batch: images per optimizer step over all ranks
    micro_batch_size: int | None = None  # images per forward/backward on one rank; None: the rank's whole slice
    image_size: int | None = None  # None: the preset's; else this square resolution (a learned grid to match)
    lr: float | None = None  # peak LR; None: the preset's (1e-3 L, 8e-4 H/1B, 4e-4 3B)
    warmup_steps: int | None = None  # None: the preset's (12,500 released sizes), at most 10% of steps
    init_lr: float = 1e-6  # warm-up starts here
    min_lr: float = 1e-5  # cosine ends here
    weight_decay: float = 1e-4  # "fully decoupled": torch AdamW gets weight_decay / peak_lr
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    device: str | None = None  # None: cuda when available, else cpu
    backend: str = "auto"
    compile: bool = False  # torch.compile every block (after activation checkpointing, before FSDP2)
    activation_checkpointing: str = "none"  # per block: none, full or selective (aimv2.layers)
    init_from: str | None = None  # start from a run folder, checkpoint or released weights (fresh optimizer)
    init_decoder: str = "load"  # with init_from: "load" the source's decoder (when it has one) or keep a "fresh" one
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
    tensorboard: bool | None = None  # None: event files in OUT/tensorboard when tensorboard is installed
    wandb: bool = False  # Weights & Biases (offline when the service cannot be reached)
    wandb_project: str | None = None
    progress: bool = True


def warmup_steps(cfg: TrainConfig, recipe: int | None) -> int:
    """The warm-up length: ``--warmup-steps`` when given; else the preset's recipe (``recipe``, 12,500 steps for
    the released sizes as in the paper), capped at 10% of ``--steps`` so that a shorter run (under 125,000 steps)
    still spends 90% of its steps at and after the peak; else 10% of ``--steps``."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    tenth = max(1, cfg.steps // 10)
    return min(recipe, tenth) if recipe is not None else tenth


def lr_at(step: int, cfg: TrainConfig, peak: float, warmup: int | None = None) -> float:
    """Linear warm-up from ``init_lr`` to ``peak`` over ``warmup`` steps (default: :func:`warmup_steps` without a
    recipe), then cosine down to ``min_lr``."""
    if warmup is None:
        warmup = warmup_steps(cfg, None)
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


def check_tokenizer(cfg: TrainConfig) -> None:
    """Refuse (UsageError) the byte tokenizer for a preset with a larger vocabulary (the 32k released presets):
    most of its text embedding and head would never see a token. (A :class:`Trainer` built directly, as the
    benchmarks build one for synthetic batches, is not checked.)"""
    from .tokenizer import ByteTokenizer

    if cfg.tokenizer != "bytes" or cfg.preset not in PRESETS:
        return
    vocab_size, byte_vocab = AIMv2Config.from_name(cfg.preset).decoder.vocab_size, ByteTokenizer().vocab_size
    if vocab_size <= byte_vocab:
        return
    raise UsageError(f"preset {cfg.preset} has a vocabulary of {vocab_size} (the paper's SigLIP SentencePiece "
                     f"tokenizer), but --tokenizer is 'bytes' ({byte_vocab} symbols): {vocab_size - byte_vocab} rows "
                     f"of the text embedding and head would never be trained. Pass --tokenizer PATH.model: SigLIP's "
                     f"spiece.model (hf download google/siglip-base-patch16-224 spiece.model --local-dir DIR) or one "
                     f"trained on your captions with 'aimv2-tokenizer train --data DATA --out tokenizer.model' "
                     f"(32k by default)")


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
        self.local_batch = cfg.batch_size // self.world_size
        self.micro_batch = min(cfg.micro_batch_size or self.local_batch, self.local_batch)
        self.micro_batches = -(-self.local_batch // self.micro_batch)  # the last one smaller when it does not divide
        self.model_cfg = AIMv2Config.from_name(cfg.preset, backend=cfg.backend)
        if cfg.native_resolution and self.model_cfg.encoder.pos_embed != "sincos":
            self.model_cfg.encoder = dataclasses.replace(self.model_cfg.encoder, pos_embed="sincos")
        if cfg.image_size is not None and cfg.image_size != self.model_cfg.encoder.image_size:
            try:
                self.model_cfg.encoder = dataclasses.replace(self.model_cfg.encoder, image_size=cfg.image_size)
            except ValueError as exc:
                raise UsageError(f"--image-size {cfg.image_size}: {one_line(exc)}") from None
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
        model = AIMv2(self.model_cfg)
        self.init_report = None
        # --init-from starts a run; a resumed run's checkpoint already holds what it loaded (and more), so a
        # stage's config file can be resumed as it is: the source is not read again.
        if cfg.init_from and not cfg.resume:  # before sharding: the source's tensors go into the whole model
            from .hub import HubNotFoundError
            from .init_from import init_from
            from .layouts import WeightsError
            try:
                self.init_report = init_from(cfg.init_from, model, decoder=cfg.init_decoder)
            except HubNotFoundError as exc:  # no such hub repo or revision: a bad flag
                raise UsageError(f"--init-from {cfg.init_from}: {one_line(exc)}") from None
            except ImportError as exc:  # a hub id without huggingface_hub installed
                raise OperationalError(f"--init-from {cfg.init_from}: {one_line(exc)}") from None
            except WeightsError as exc:  # unreadable or unknown released weights, a hub repo not in the cache
                raise OperationalError(f"--init-from {cfg.init_from}: {one_line(exc)}") from None
            except ValueError as exc:  # another architecture or vocabulary: a bad --init-from for this run
                raise UsageError(f"--init-from {cfg.init_from}: {one_line(exc)}") from None
        self.param_counts = (count_parameters(model.encoder), count_parameters(model.decoder))
        self.model = model.to(self.device)
        # torchtitan's order: activation checkpointing, then compile, then FSDP2, all per block.
        set_activation_checkpointing(self.model, cfg.activation_checkpointing)
        if cfg.compile:
            for trunk in (self.model.encoder.trunk, self.model.decoder.trunk):
                for block in trunk.blocks:
                    block.compile()
        if self.world_size > 1:
            self.model = shard_model(self.model, self.device, self.world_size)
        self.peak_lr = cfg.lr if cfg.lr is not None else self.model_cfg.peak_lr
        self.warmup = warmup_steps(cfg, self.model_cfg.warmup_steps)
        self._flops_per_step: float | None = None
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
        """One optimizer step on the next batch; returns the step's metrics (host-side floats, global means).

        The rank's slice of the global batch runs as ``micro_batches`` forward/backward passes of
        ``micro_batch`` images each. Every pass back-propagates its share of the *global* means: its image and
        text losses weighted by its counted patches and tokens over the counts of the whole global batch (times
        the world size, which FSDP's mean reduction divides out), so the accumulated gradient is that of the
        whole batch at once, on any number of ranks and micro-batches. Prefix lengths are drawn once for the
        rank's whole slice, as a single pass would draw them. At native resolution a micro-batch holds the
        patches of ``micro_batch`` images at the preset's resolution (more, smaller images at a small patch
        budget). Under FSDP2 the gradients are reduce-scattered
        once per step, after the last micro-batch.
        """
        start = time.perf_counter()
        batch = next(self.batches)
        images = batch.images.to(self.device, non_blocking=True)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        prefix = getattr(batch, "prefix_lens", None)
        p = self.model_cfg.encoder.patch_size
        n = (images.shape[-2] // p) * (images.shape[-1] // p)
        if prefix is None:  # the draw the model makes for a whole batch in training mode
            prefix = self.model.sample_prefix_lens(images.shape[0], images.device, num_patches=n)
        else:
            prefix = prefix.to(self.device, non_blocking=True)
        lr = lr_at(self.step, self.cfg, self.peak_lr, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        pad = self.model_cfg.decoder.pad_id
        # Counted image targets and caption tokens of this rank, and of the global batch.
        local = torch.stack([(n - prefix.clamp(min=1)).sum().double(), (tokens != pad).sum().double()])
        total = _global_sum(local.clone())
        logged = torch.zeros(2, dtype=torch.float32, device=self.device)  # image, text: shares of global means
        sync = getattr(self.model, "set_requires_gradient_sync", None)  # FSDP2
        m_size = self.micro_batch
        if n != self.model_cfg.encoder.num_patches:  # native resolution: the same patches per micro-batch
            m_size = max(1, self.micro_batch * self.model_cfg.encoder.num_patches // n)
        k = -(-images.shape[0] // m_size)  # the last micro-batch may be smaller: the shares weight it exactly
        for i in range(k):
            sl = slice(i * m_size, (i + 1) * m_size)
            img, tok, pre = images[sl], tokens[sl], prefix[sl]
            if sync is not None:
                sync(i == k - 1)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out = self.model(img, tok, pre)
            if k == 1 and self.world_size == 1:  # the whole batch in one pass: the model's own means
                loss_img, loss_txt = out.loss_img, out.loss_txt
            else:
                counts = torch.stack([(n - pre.clamp(min=1)).sum().double(), (tok != pad).sum().double()])
                share = (counts / total).float()
                loss_img, loss_txt = out.loss_img * share[0], out.loss_txt * share[1]
            loss = (loss_txt + self.model_cfg.img_loss_weight * loss_img) * self.world_size
            loss.backward()
            logged += torch.stack([loss_img.detach(), loss_txt.detach()]).float()
        skipped_now = len(getattr(self.loader, "skipped", ()))
        logged = _global_sum(torch.cat([logged, torch.tensor([float(skipped_now)], device=self.device)]))
        # one host sync for the logged values and the global token count (exact in fp32 below 2^24 tokens)
        values = torch.cat([logged, total[1:].float()]).tolist()
        loss_img_v, loss_txt_v, skipped_v, tokens_v = values
        loss_v = loss_txt_v + self.model_cfg.img_loss_weight * loss_img_v
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
             "patches": n, "tokens": int(tokens_v), "bad_steps": self.bad_steps,
             "skipped_samples": int(skipped_v), "micro_batches": k,
             "step_time_s": time.perf_counter() - start}
        if not finite:
            m["skipped_update"] = True
        return m

    def mfu(self, step_seconds: float) -> float | None:
        """Model FLOPs utilisation of a step of ``step_seconds``: the model's FLOPs per step
        (:func:`aimv2.flops.model_flops_per_step`, global batch) over the peak of all ranks' devices; None where
        the device's peak is unknown (a CPU, an unlisted GPU: set ``AIMV2_PEAK_TFLOPS``) and at native
        resolution (the patches per image vary)."""
        from .flops import model_flops_per_step, peak_flops

        if self.cfg.native_resolution:
            return None
        peak = peak_flops(self.device)
        if peak is None or step_seconds <= 0:
            return None
        if self._flops_per_step is None:
            self._flops_per_step = model_flops_per_step(self.model_cfg, self.cfg.batch_size)
        return self._flops_per_step / (step_seconds * peak * self.world_size)

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

    check_tokenizer(cfg)
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
        (trainer.out / "config.toml").write_text(resolved_toml(cfg))
        print(banner(trainer), file=sys.stderr, flush=True)

    first = last = None
    # disable=None: no bar when stderr is not a terminal (CI logs); --no-progress turns it off everywhere.
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=None if cfg.progress and lead else True,
               unit="step", dynamic_ncols=True)
    window = _Window()
    save_pending = False  # a checkpoint fell due during a streak of non-finite steps: write it after the streak
    log = _metrics_logger(trainer) if lead else None
    try:
        while trainer.step < cfg.steps:
            m = trainer.train_step()
            window.add(m)
            bad = m.get("skipped_update", False)
            if bad or trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                m.update(window.rates(trainer))
                if log is not None:
                    log.log(m)
                if not bad:
                    first = first or m
                    last = m
                bar.set_postfix(loss=f"{m['loss']:.3f}", img=f"{m['loss_img']:.3f}", txt=f"{m['loss_txt']:.3f}",
                                ips=f"{m['images_per_s']:.0f}")
                if lead and bar.disable and cfg.progress:  # not a terminal: one plain line per logged step
                    mfu = f"  MFU {m['mfu']:.1%}" if m.get("mfu") is not None else ""
                    print(f"step {m['step']}/{cfg.steps}  loss {m['loss']:.4f}  img {m['loss_img']:.4f}  "
                          f"txt {m['loss_txt']:.4f}  lr {m['lr']:.2e}  {m['images_per_s']:.1f} img/s{mfu}"
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


class _Window:
    """Throughput over the steps since the last logged one: images/s, caption tokens/s and MFU."""

    def __init__(self) -> None:
        self.start, self.images, self.tokens, self.steps = time.perf_counter(), 0, 0, 0

    def add(self, m: dict) -> None:
        self.images += m["images"]
        self.tokens += m["tokens"]
        self.steps += 1

    def rates(self, trainer: Trainer) -> dict:
        now = time.perf_counter()
        seconds = max(now - self.start, 1e-9)
        out = {"images_per_s": self.images / seconds, "tokens_per_s": self.tokens / seconds,
               "mfu": trainer.mfu(seconds / max(self.steps, 1))}
        out.update(_peak_memory(trainer.device))
        self.start, self.images, self.tokens, self.steps = now, 0, 0, 0
        return out


def _peak_memory(device: torch.device) -> dict:
    """``peak_mem_gib``: the most GPU memory allocated (None on a CPU); ``peak_rss_gib``: this process's peak
    resident memory (Linux and macOS)."""
    out: dict = {"peak_mem_gib": None}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["peak_rss_gib"] = rss / (2**30 if sys.platform == "darwin" else 2**20)
    return out


def _metrics_logger(trainer: Trainer):
    """Rank 0's sinks: OUT/metrics.jsonl (the record), TensorBoard and W&B as asked (aimv2.metrics)."""
    from .metrics import MetricsLogger

    cfg = trainer.cfg
    try:
        return MetricsLogger(trainer.out, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                             wandb_project=cfg.wandb_project, wandb_name=trainer.out.name,
                             run_config={"train": dataclasses.asdict(cfg), "model": trainer.model_cfg.to_dict(),
                                         "world_size": trainer.world_size},
                             start_step=trainer.step)
    except ImportError as exc:
        raise UsageError(one_line(exc)) from None


def resolved_toml(cfg: TrainConfig) -> str:
    """The run's resolved configuration as a ``--config`` file (what OUT/config.toml holds)."""
    from .run_config import dump_toml

    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
              if k not in ("config", "resume", "restart", "new_schedule")}
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (f"aimv2-train's resolved configuration of this run (written {written})"
              f"{f', read from {cfg.config} and the flags typed' if cfg.config else ''}.\n"
              f"Run it again with: aimv2-train --config {Path(cfg.out) / 'config.toml'} --out NEW_FOLDER")
    return dump_toml(values, header=header)


def banner(trainer: Trainer) -> str:
    """The start-of-run summary: preset and parameters, device and dtype, the backend each op resolved to, the
    world size, the batch (global, per rank, micro-batches), patches and tokens per step, and the schedule."""
    from aimv2_kernels._backend import resolve_backend

    cfg, mc, enc = trainer.cfg, trainer.model_cfg, trainer.model_cfg.encoder
    dev = trainer.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cuda":
        precision = ("bf16 parameters and fp32 gradient reduction (FSDP2)" if trainer.world_size > 1
                     else "bf16 autocast over fp32 parameters")
    else:
        precision = "fp32"
    resolved = []
    for op in MODEL_OPS:
        try:
            resolved.append(f"{op}={resolve_backend(op, cfg.backend, dev, dtype)}")
        except Exception as exc:  # reported, not fatal: the first forward raises with the full reason
            resolved.append(f"{op}=unavailable ({one_line(exc)})")
    n = enc.num_patches
    res = (f"native resolution (2^{cfg.native_budgets[0]}-2^{cfg.native_budgets[1]} patches per image)"
           if cfg.native_resolution else f"{enc.image_size} px ({n} patches of {enc.patch_size}x{enc.patch_size})")
    enc_p, dec_p = trainer.param_counts
    recipe = mc.warmup_steps
    if cfg.warmup_steps is not None:
        why = "--warmup-steps"
    elif recipe is not None and trainer.warmup < recipe:
        why = f"10% of the run: the recipe's {recipe:,} is capped for runs under {10 * recipe:,} steps"
    elif recipe is not None:
        why = "the paper's"
    else:
        why = "10% of the run"
    lines = [
        f"aimv2-train: preset {mc.name}: {(enc_p + dec_p) / 1e6:,.1f}M parameters (encoder {enc_p / 1e6:,.1f}M, "
        f"decoder {dec_p / 1e6:,.1f}M), {res}, tokenizer {cfg.tokenizer} ({trainer.tokenizer.vocab_size} tokens)",
        f"  device {dev} ({name}), {precision}; world size {trainer.world_size}",
        f"  backends ({cfg.backend}): {', '.join(resolved)}",
        f"  batch {cfg.batch_size} global = {trainer.world_size} x {trainer.local_batch} per rank = "
        f"{trainer.micro_batches} micro-batch(es) of up to {trainer.micro_batch} per rank",
        f"  per step: {cfg.batch_size:,} images"
        + ("" if cfg.native_resolution else f", {cfg.batch_size * n:,} patches")
        + f", up to {cfg.batch_size * mc.decoder.context_length:,} caption tokens",
        f"  schedule: {cfg.steps:,} steps, peak lr {trainer.peak_lr:g}, warm-up {trainer.warmup:,} ({why}), "
        f"weight decay {cfg.weight_decay:g}, compile {'on' if cfg.compile else 'off'}, activation checkpointing "
        f"{cfg.activation_checkpointing}",
    ]
    if trainer.init_report is not None:
        lines.append(f"  init from: {trainer.init_report.summary()}")
    elif cfg.init_from and cfg.resume:
        lines.append(f"  init from: {cfg.init_from} not read again (--resume: the checkpoint holds the weights)")
    return "\n".join(lines)


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
    p = Parser(prog=PROG, description="Pre-train AIMv2 (encoder + causal multimodal decoder).",
               epilog="Every flag is also a key of a --config TOML file (without the dashes); flags typed on the "
                      "command line override the file.")
    p.add_argument("--config", default=None, metavar="FILE.toml",
                   help="read flags from a TOML file (keys: the flags without dashes, e.g. batch-size = 8192); "
                        "OUT/config.toml of a run is one")
    p.add_argument("--preset", default=d.preset, help=f"model preset, one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--out", default=d.out,
                   help="run folder: metrics.jsonl, checkpoints/, config.toml, loss.png, tensorboard/ "
                        "(one run at a time: OUT/.lock)")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch: images per step over all ranks (a multiple of the world size)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="images per forward/backward on one rank: gradient accumulation within the global batch "
                        "(the last micro-batch is smaller when it does not divide the per-rank batch; at native "
                        "resolution, the patches of this many images at the preset's size); default: the whole "
                        "per-rank batch")
    p.add_argument("--image-size", type=int, default=None,
                   help="train at this square resolution instead of the preset's (a multiple of the patch size)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: the paper's 12,500 for the released presets, capped at 10%% "
                        "of --steps; 10%% of --steps for the small presets)")
    p.add_argument("--init-lr", type=float, default=d.init_lr, help="learning rate at step 0 (default %(default)g)")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="the cosine's final rate (default %(default)g)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="fully decoupled weight decay (scaled by lr/peak lr; default %(default)g; the paper's "
                        "high-resolution stage uses 0)")
    p.add_argument("--betas", default="0.9,0.95", metavar="B1,B2", help="AdamW betas (default 0.9,0.95)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip (default %(default)g)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS, help="op backend for the whole model")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--activation-checkpointing", default=d.activation_checkpointing, choices=ACTIVATION_CHECKPOINTING,
                   help="per block: none, full (recompute the block in the backward) or selective (keep matmul and "
                        "attention outputs, recompute the rest)")
    p.add_argument("--init-from", default=None, metavar="SOURCE",
                   help="start a new run from a run folder, a checkpoint or released weights (a path or a Hugging "
                        "Face hub id such as apple/aimv2-large-patch14-224): the encoder (its "
                        "learned position embedding resized) and the decoder when SOURCE has one; fresh optimizer "
                        "and schedule (with --resume it is not read again: the checkpoint holds the weights)")
    p.add_argument("--init-decoder", default=d.init_decoder, choices=("load", "fresh"),
                   help="with --init-from: load SOURCE's decoder (default; it must have this run's vocabulary) or "
                        "start a fresh one (e.g. after changing --tokenizer)")
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
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="keep the newest N checkpoints (default %(default)s)")
    p.add_argument("--tensorboard", dest="tensorboard", action="store_true", default=None,
                   help="write TensorBoard event files to OUT/tensorboard (default: when tensorboard is installed)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    p.add_argument("--wandb", action="store_true",
                   help="log to Weights & Biases (offline, to OUT/wandb, when the service cannot be reached)")
    p.add_argument("--no-wandb", dest="wandb", action="store_false")
    p.add_argument("--wandb-project", default=None, help="W&B project (default: aimv2)")
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
    """The run's configuration from ``argv`` (default ``sys.argv[1:]``): a ``--config`` file's keys first, then the
    typed flags over them. A bad flag or key exits with status 2 and one line."""
    from .run_config import ConfigFileError, config_argv

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        try:
            argv = config_argv(first.config, parser) + argv
        except ConfigFileError as exc:
            parser.error(str(exc))
    args = parser.parse_args(argv)
    world = os.environ.get("WORLD_SIZE", "1")
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "max_bad_steps", "keep_checkpoints",
                 "micro_batch_size", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name, low_ok in (("init_lr", False), ("min_lr", True), ("weight_decay", True), ("grad_clip", False)):
        v = getattr(args, name)
        if not (math.isfinite(v) and (v > 0 or (low_ok and v == 0))):
            parser.error(f"--{name.replace('_', '-')} must be a finite number {'>=' if low_ok else '>'} 0, got {v}")
    try:
        b1, b2 = (float(v) for v in args.betas.split(","))
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError
    except ValueError:
        parser.error(f"--betas must be B1,B2 with 0 <= B < 1, got {args.betas!r}")
    args.betas = (b1, b2)
    if args.init_from is not None and not args.resume and not os.path.exists(args.init_from):
        from .hub import is_hub_id
        if not is_hub_id(args.init_from):
            parser.error(f"--init-from {args.init_from}: no such file or folder (nor a Hugging Face hub id "
                         f"owner/name[@revision])")
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
