"""Benchmark of ``linear_cross_entropy`` (the text head's projection fused with the cross-entropy).

Providers: our backends, the reference (builds the ``(tokens, V)`` logits) eager and under ``torch.compile``,
and the peers when installed: liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA), cut-cross-entropy
with its default kernel (CUDA) and with ``impl="torch_compile"`` (also on a CPU).
Shapes: the AIMv2 decoder's caption tokens, ``B x 77`` tokens with D = 1024 and V = 32000, swept in B (on a GPU
B = 32, 128 (AIMv2-L's batch per GPU) and 256).
``work(config, mode)``: FLOPs ``2 N D V`` (fwd), ``4 N D V`` (bwd), ``6 N D V`` (fwd+bwd); bytes: read ``hidden``
and ``weight`` (and, with a backward, write their gradients); the int64 targets are not counted. Matmul-bound.
Derived: TFLOP/s from those FLOPs; the size the logits would have had ("logits MB"); the extra memory, the
measured peak less the gradients that the op must return ("extra MB"), and that as a share of the logits.
``python bench/bench_linear_cross_entropy.py [--device cpu|cuda] [--quick]`` is ``bench/run.py --op ...``.
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
from aimv2_kernels.reference import linear_cross_entropy_reference

OP = "linear_cross_entropy"
CAPTION_TOKENS = 77


@dataclass(frozen=True)
class Config:
    """``hidden`` ``(tokens, dim)``, ``weight`` ``(vocab, dim)``, int64 ``targets`` ``(tokens,)``."""
    tokens: int
    dim: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    series: str = "tokens (B x 77)"

    @property
    def name(self) -> str:
        return f"N={self.tokens} D={self.dim} V={self.vocab} {str(self.dtype).replace('torch.', '')}"

    @property
    def size(self) -> float:
        return self.tokens

    def flops(self, mode: str) -> float:
        return {"fwd": 2.0, "bwd": 4.0, "fwd+bwd": 6.0}[mode] * self.tokens * self.dim * self.vocab

    def logits_mb(self) -> float:
        return self.tokens * self.vocab * torch.finfo(self.dtype).bits / 8 / 2**20

    def grads_mb(self, mode: str) -> float:
        """The gradients of ``hidden`` and ``weight`` that a backward must return (none in fwd)."""
        if mode == "fwd":
            return 0.0
        return (self.tokens + self.vocab) * self.dim * torch.finfo(self.dtype).bits / 8 / 2**20


# The CPU shape of the pytest-benchmark microbenchmarks (bench/test_microbench.py).
MICRO = Config(2 * CAPTION_TOKENS, 1024, 32000, torch.float32)

def configs(device: torch.device, quick: bool = False) -> list[Config]:
    if quick:
        return [Config(b * 7, 32, 301, torch.float32) for b in (2, 4)]
    if device.type == "cuda":  # 128 images per GPU is AIMv2-L's batch
        return [Config(b * CAPTION_TOKENS, 1024, 32000) for b in (32, 128, 256)]
    return [Config(b * CAPTION_TOKENS, 1024, 32000, torch.float32) for b in (2, 4, 8)]


def _peer_reason(module: str, device: torch.device, cuda_only: bool) -> str | None:
    if cuda_only and device.type != "cuda":
        return f"{module} runs on CUDA only"
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def providers(device: torch.device) -> dict[str, str | None]:
    """provider -> None when it can run here, else why not."""
    return {**harness.our_backends(OP, device), "reference": None, "reference-compiled": None,
            "liger": _peer_reason("liger_kernel", device, cuda_only=True),
            "cut-cross-entropy": _peer_reason("cut_cross_entropy", device, cuda_only=True),
            "cce-torch_compile": _peer_reason("cut_cross_entropy", device, cuda_only=False)}


def setup(config: Config, provider: str, mode: str = "fwd+bwd", device: torch.device | str = "cpu"):
    """One call of ``provider`` on fresh random inputs of ``config`` in ``mode`` (fwd, bwd or fwd+bwd)."""
    device = torch.device(device)
    c = config
    hidden = torch.randn(c.tokens, c.dim, device=device, dtype=c.dtype, requires_grad=True)
    weight = (torch.randn(c.vocab, c.dim, device=device) / c.dim ** 0.5).to(c.dtype).requires_grad_()
    targets = torch.randint(0, c.vocab, (c.tokens,), device=device)
    if provider == "reference-compiled":
        fn = harness.compiled(linear_cross_entropy_reference)
    elif provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        fn = lambda h, w, t: liger(w, h, t)
    elif provider in ("cut-cross-entropy", "cce-torch_compile"):
        from cut_cross_entropy import linear_cross_entropy as cce
        fn = functools.partial(cce, impl="torch_compile") if provider == "cce-torch_compile" else cce
    elif provider in K.BACKENDS:
        fn = functools.partial(K.linear_cross_entropy, backend=provider)
    else:
        raise ValueError(f"no provider {provider!r} for {OP}")
    return harness.make_step(lambda: fn(hidden, weight, targets), [hidden, weight], mode)


def work(config: Config, mode: str) -> dict:
    """FLOPs and bytes that must be done and moved (see the module doc)."""
    c = config
    elt = torch.finfo(c.dtype).bits // 8
    inputs = (c.tokens + c.vocab) * c.dim * elt  # hidden and weight; their gradients have the same size
    return {"bytes": inputs * (1 if mode == "fwd" else 2),
            "flops": {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * c.tokens * c.dim * c.vocab,
            "dtype": harness.dtype_name(c.dtype)}


def derived(config: Config, mode: str, median_ms: float) -> dict:
    return {"TFLOP/s": work(config, mode)["flops"] / median_ms / 1e9, "logits MB": config.logits_mb()}


def memory_derived(config: Config, mode: str, peak_mb: float) -> dict:
    """The extra memory: the measured peak less the gradients the op returns, in MB and in % of the logits."""
    extra = max(0.0, peak_mb - config.grads_mb(mode))
    return {"extra MB": extra, "extra % logits": 100 * extra / config.logits_mb()}


def goals(config: Config, mode: str, rows: dict, ours, ceilings: dict) -> list:
    """GPU goals: at least 55% of the measured bf16 matmul rate, extra memory at most 5% of the logits, and no
    slower than cut-cross-entropy (its default kernel) or Liger."""
    w = work(config, mode)
    rate = (ceilings or {}).get(harness.MATMUL_RATE_KEYS.get(w["dtype"], ""))
    measured = ours is not None and ours.median_ms
    fraction = w["flops"] / ours.median_ms / 1e9 / rate if rate and measured else None
    extra = ours.derived.get("extra % logits") if measured else None
    return [harness.fraction_goal(">= 55% of matmul rate", fraction, 0.55, "no matmul rate for " + w["dtype"]),
            harness.Goal("extra memory <= 5% of logits", None if extra is None else extra <= 5.0,
                         "not measured" if extra is None else f"{extra:.1f}%"),
            harness.speed_goal(">= 1.0x cut-cross-entropy", ours, rows.get("cut-cross-entropy"), 1.0),
            harness.speed_goal(">= 1.0x liger", ours, rows.get("liger"), 1.0)]


if __name__ == "__main__":
    import run
    sys.exit(run.main(["--op", OP, *sys.argv[1:]]))
