"""Benchmark of ``cross_entropy`` over given logits.

Providers: our backends, the reference eager and under ``torch.compile``, and the peers when installed:
NVIDIA apex's ``apex.contrib.xentropy`` (CUDA; detected by that import, since PyPI's unrelated ``apex`` has no
such module) and liger-kernel's ``LigerCrossEntropyLoss`` (CUDA; it overwrites the logits with their gradient
in place, which changes the values of later calls, not their cost).
Shapes: the decoder's ``B x 77`` caption tokens over V = 32000, swept in B. Derived: GB/s against the floor of
reading the logits once (and writing their gradient once with a backward); ``work(config, mode)`` is that
floor with no FLOPs counted (memory-bound). No GPU goal is set for this op.
``python bench/bench_cross_entropy.py [--device cpu|cuda] [--quick]`` is ``bench/run.py --op cross_entropy``.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

import aimv2_kernels as K
from aimv2_kernels.reference import cross_entropy_reference

OP = "cross_entropy"
CAPTION_TOKENS = 77


@dataclass(frozen=True)
class Config:
    """``logits`` ``(tokens, vocab)``, int64 ``targets`` ``(tokens,)``."""
    tokens: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    series: str = "tokens (B x 77)"

    @property
    def name(self) -> str:
        return f"N={self.tokens} V={self.vocab} {str(self.dtype).replace('torch.', '')}"

    @property
    def size(self) -> float:
        return self.tokens

    def min_bytes(self, mode: str) -> int:
        """Read the logits once (and write their gradient once with a backward); the int64 targets (8 bytes a
        row against ``2 V`` for the logits) are not counted."""
        return (1 if mode == "fwd" else 2) * self.tokens * self.vocab * torch.finfo(self.dtype).bits // 8


# The CPU shape of the pytest-benchmark microbenchmarks (bench/test_microbench.py).
MICRO = Config(8 * CAPTION_TOKENS, 32000, torch.float32)

def configs(device: torch.device, quick: bool = False) -> list[Config]:
    if quick:
        return [Config(b * 7, 301, torch.float32) for b in (2, 4)]
    if device.type == "cuda":
        return [Config(b * CAPTION_TOKENS, 32000) for b in (32, 128, 256)]
    return [Config(b * CAPTION_TOKENS, 32000, torch.float32) for b in (8, 16, 32)]


def _apex_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "apex xentropy runs on CUDA only"
    try:
        spec = importlib.util.find_spec("apex.contrib.xentropy")
    except ModuleNotFoundError:
        spec = None
    return None if spec is not None else "NVIDIA apex with its xentropy extension is not installed"


def providers(device: torch.device) -> dict[str, str | None]:
    """provider -> None when it can run here, else why not."""
    liger = ("liger-kernel runs on CUDA only" if device.type != "cuda" else
             None if importlib.util.find_spec("liger_kernel") else "liger_kernel is not installed")
    return {**harness.our_backends(OP, device), "reference": None, "reference-compiled": None,
            "apex-xentropy": _apex_reason(device), "liger": liger}


def setup(config: Config, provider: str, mode: str = "fwd+bwd", device: torch.device | str = "cpu"):
    """One call of ``provider`` on fresh random logits of ``config`` in ``mode`` (fwd, bwd or fwd+bwd)."""
    device = torch.device(device)
    c = config
    logits = (3 * torch.randn(c.tokens, c.vocab, device=device)).to(c.dtype).requires_grad_()
    targets = torch.randint(0, c.vocab, (c.tokens,), device=device)
    if provider == "reference-compiled":
        fn = harness.compiled(cross_entropy_reference)
    elif provider == "apex-xentropy":
        from apex.contrib.xentropy import SoftmaxCrossEntropyLoss
        # (logits, labels, smoothing, padding_idx, half_to_float): per-row losses; no row is padding here.
        fn = lambda x, t: SoftmaxCrossEntropyLoss.apply(x, t, 0.0, -100, x.dtype != torch.float32).mean()
    elif provider == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss
        fn = LigerCrossEntropyLoss()
    elif provider in K.BACKENDS:
        fn = functools.partial(K.cross_entropy, backend=provider)
    else:
        raise ValueError(f"no provider {provider!r} for {OP}")
    return harness.make_step(lambda: fn(logits, targets), [logits], mode)


def work(config: Config, mode: str) -> dict:
    """Bytes that must move (:meth:`Config.min_bytes`); FLOPs (a few per logit) not counted: memory-bound."""
    return {"bytes": config.min_bytes(mode), "flops": 0, "dtype": harness.dtype_name(config.dtype)}


def derived(config: Config, mode: str, median_ms: float) -> dict:
    return {"GB/s": work(config, mode)["bytes"] / median_ms / 1e6}


def goals(config: Config, mode: str, rows: dict, ours, ceilings: dict) -> list:
    """No GPU goal is set for the plain cross-entropy."""
    return []


if __name__ == "__main__":
    import run
    sys.exit(run.main(["--op", OP, *sys.argv[1:]]))
