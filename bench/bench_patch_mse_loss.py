"""Benchmark of ``patch_mse_loss``: our backends against the eager reference and the reference under torch.compile.

``setup(config, provider, mode, device) -> callable`` builds one timed call; ``configs(device, quick)`` lists the
shapes AIMv2 runs (the pixel loss of a 224, 336 and 448 px image batch, patch 14, the target shifted by one);
``python bench/bench_patch_mse_loss.py [--device cpu|cuda] [--quick]`` is ``bench/run.py --op patch_mse_loss``.
There is no installed peer for this loss: the reference under ``torch.compile`` is the strongest baseline.
``work(config, mode)``: memory-bound, the bytes of :meth:`Config.min_bytes` and no FLOPs counted.
``goals``: on a GPU at least 80% of the copy bandwidth and at least 1.5x the compiled reference.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

import aimv2_kernels as K
from aimv2_kernels.reference import patch_mse_loss_reference

OP = "patch_mse_loss"
PEERS: dict[str, str] = {}


@dataclass(frozen=True)
class Config:
    """``pred`` ``(batch, N - 1, 3 * patch**2)`` against the patches of ``images`` ``(batch, 3, side, side)``."""
    batch: int
    image_size: int
    patch: int = 14
    dtype: torch.dtype = torch.bfloat16
    series: str = "image side (px)"

    @property
    def name(self) -> str:
        return f"B={self.batch} {self.image_size}px p={self.patch} {str(self.dtype).replace('torch.', '')}"

    @property
    def size(self) -> float:
        return self.image_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    def min_bytes(self, mode: str = "fwd+bwd") -> int:
        """The floor: read ``pred`` and ``images`` once (and write ``grad_pred`` once with a backward). The int64
        prefix lengths (8 bytes per image) are not counted."""
        pred = self.batch * (self.num_patches - 1) * 3 * self.patch ** 2
        images = self.batch * 3 * self.image_size ** 2
        return (pred * (1 if mode == "fwd" else 2) + images) * torch.finfo(self.dtype).bits // 8


# The CPU shape of the pytest-benchmark microbenchmarks (bench/test_microbench.py).
MICRO = Config(16, 224, dtype=torch.float32)

def configs(device: torch.device, quick: bool = False) -> list[Config]:
    if quick:
        return [Config(2, side, dtype=torch.float32) for side in (28, 56)]
    if device.type == "cuda":  # AIMv2-L's per-GPU batch
        return [Config(128, side) for side in (224, 336, 448)]
    return [Config(16, side, dtype=torch.float32) for side in (224, 336, 448)]


def providers(device: torch.device) -> dict[str, str | None]:
    """provider -> None when it can run here, else why not."""
    return {**harness.our_backends(OP, device), "reference": None, "reference-compiled": None}


def setup(config: Config, provider: str, mode: str = "fwd+bwd", device: torch.device | str = "cpu"):
    """One call of ``provider`` on fresh random inputs of ``config`` in ``mode`` (fwd, bwd or fwd+bwd)."""
    device = torch.device(device)
    images = torch.randn(config.batch, 3, config.image_size, config.image_size, device=device, dtype=config.dtype)
    pred = torch.randn(config.batch, config.num_patches - 1, 3 * config.patch ** 2, device=device,
                       dtype=config.dtype, requires_grad=True)
    lens = torch.randint(1, config.num_patches, (config.batch,), device=device)
    if provider == "reference-compiled":
        fn = harness.compiled(patch_mse_loss_reference)
    elif provider in K.BACKENDS:
        fn = functools.partial(K.patch_mse_loss, backend=provider)
    else:
        raise ValueError(f"no provider {provider!r} for {OP}")
    return harness.make_step(lambda: fn(pred, images, config.patch, lens, target_offset=1), [pred], mode)


def work(config: Config, mode: str) -> dict:
    """Bytes that must move (:meth:`Config.min_bytes`) and FLOPs (a few per element: not counted, memory-bound)."""
    return {"bytes": config.min_bytes(mode), "flops": 0, "dtype": harness.dtype_name(config.dtype)}


def derived(config: Config, mode: str, median_ms: float) -> dict:
    return {"GB/s": work(config, mode)["bytes"] / median_ms / 1e6}


def goals(config: Config, mode: str, rows: dict, ours, ceilings: dict) -> list:
    """GPU goals: at least 80% of the measured copy bandwidth and at least 1.5x the compiled reference."""
    copy = (ceilings or {}).get("copy_GBps")
    fraction = (work(config, mode)["bytes"] / ours.median_ms / 1e6 / copy
                if copy and ours is not None and ours.median_ms else None)
    return [harness.fraction_goal(">= 80% of copy bandwidth", fraction, 0.8),
            harness.speed_goal(">= 1.5x reference-compiled", ours, rows.get("reference-compiled"), 1.5)]


if __name__ == "__main__":
    import run
    sys.exit(run.main(["--op", OP, *sys.argv[1:]]))
