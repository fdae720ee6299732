"""Benchmark of ``prefix_attention``: our backends against the reference (eager and compiled) and the peers.

Peers (DESIGN.md): ``F.scaled_dot_product_attention`` with a dense boolean prefix mask; FlexAttention with a
per-sample prefix block mask (compiled; CUDA only here, its CPU version has no backward); flash-attn as two
calls, a non-causal one over each sample's prefix and a bottom-right causal one for the rest (CUDA, when
installed).

Shapes: the AIMv2 encoder (head dim 128, random per-sample prefixes uniform in [1, S-1]) at S = 256, 576 and
1024 and at native resolution up to 4096 patches, swept in S at a constant number of tokens per call; the
decoder at S = 334 (256 patches + start token + 77 caption tokens), plainly causal.
``python bench/bench_prefix_attention.py [--device cpu|cuda] [--quick]`` is
``bench/run.py --op prefix_attention``.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import aimv2_kernels as K  # noqa: E402
from aimv2_kernels.reference import prefix_attention_reference, prefix_mask  # noqa: E402

OP = "prefix_attention"
SWEEP = "S (random prefixes, constant tokens per call)"


@dataclass(frozen=True)
class Config:
    """q, k, v ``(batch, heads, seq, head_dim)``; ``prefix``: "random" (per sample in [1, S-1]) or "causal"."""
    batch: int
    heads: int
    seq: int
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    prefix: str = "random"
    series: str = SWEEP

    @property
    def name(self) -> str:
        return (f"B={self.batch} H={self.heads} S={self.seq} D={self.head_dim} {self.prefix} "
                f"{str(self.dtype).replace('torch.', '')}")

    @property
    def size(self) -> float:
        return self.seq

    def prefix_lens(self, device) -> torch.Tensor | None:
        """Seeded, so every provider and every run sees the same prefixes."""
        if self.prefix == "causal":
            return None
        gen = torch.Generator().manual_seed(0)
        return torch.randint(1, self.seq, (self.batch,), generator=gen).to(device)

    def fwd_flops(self) -> float:
        """``2 D H sum_b (S^2 + M_b^2)``: visible pairs times 4D (DESIGN.md); the backward is 2.5x this."""
        lens = self.prefix_lens("cpu")
        m2 = 0.0 if lens is None else float((lens.double() ** 2).sum())
        return 2.0 * self.head_dim * self.heads * (self.batch * self.seq ** 2 + m2)


# The CPU shape of the pytest-benchmark microbenchmarks (bench/test_microbench.py).
MICRO = Config(2, 2, 576, dtype=torch.float32)

def configs(device: torch.device, quick: bool = False) -> list[Config]:
    if quick:
        return [Config(2, 2, 33, 64, torch.float32), Config(2, 2, 65, 64, torch.float32),
                Config(2, 2, 33, 64, torch.float32, prefix="causal", series="")]
    if device.type == "cuda":  # AIMv2-L: 8 heads of 128; 32k tokens per call; the decoder at batch 128
        return [Config(32768 // s, 8, s) for s in (256, 576, 1024, 2048, 4096)] + [
            Config(128, 8, 334, prefix="causal", series="")]
    return [Config(max(1, 2048 // s), 2, s, dtype=torch.float32) for s in (256, 576, 1024, 2048, 4096)] + [
        Config(4, 2, 334, dtype=torch.float32, prefix="causal", series="")]


def _flash_attn_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "flash-attn runs on CUDA only"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    return None


def providers(device: torch.device) -> dict[str, str | None]:
    """provider -> None when it can run here, else why not."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        flex = "this torch has no FlexAttention"
    elif device.type != "cuda":  # torch raises NotImplementedError for inputs that require grad
        flex = "FlexAttention has no backward on a CPU"
    else:
        flex = None
    return {**harness.our_backends(OP, device), "reference": None, "reference-compiled": None,
            "sdpa-dense-mask": None, "flex-attention": flex, "flash-attn": _flash_attn_reason(device)}


def _flash_attn_two_calls(q, k, v, lens, seq):
    """flash-attn on ``(B, S, H, D)`` tensors: the prefix rows of each sample attend to its prefix (non-causal,
    varlen), the other rows attend causally to all keys (varlen, bottom-right aligned: query j of the
    ``S - M_b`` suffix rows sees keys ``<= M_b + j``). The gathers and the scatter are part of the cost."""
    from flash_attn import flash_attn_varlen_func

    b, s, h, d = q.shape
    ar = torch.arange(s, device=q.device)
    is_prefix = (ar[None, :] < lens[:, None]).reshape(-1)
    pre_idx, suf_idx = is_prefix.nonzero().squeeze(1), (~is_prefix).nonzero().squeeze(1)
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    cu_pre = torch.cat([zero, lens.cumsum(0).to(torch.int32)])
    cu_suf = torch.cat([zero, (seq - lens).cumsum(0).to(torch.int32)])
    cu_all = torch.arange(b + 1, dtype=torch.int32, device=q.device) * s
    max_pre, max_suf = int(lens.max()), int((seq - lens).max())

    def attend():
        q2, k2, v2 = (t.reshape(b * s, h, d) for t in (q, k, v))
        out_pre = flash_attn_varlen_func(q2[pre_idx], k2[pre_idx], v2[pre_idx], cu_pre, cu_pre, max_pre, max_pre,
                                         causal=False)
        out_suf = flash_attn_varlen_func(q2[suf_idx], k2, v2, cu_suf, cu_all, max_suf, s, causal=True)
        out = torch.zeros_like(q2).index_copy(0, pre_idx, out_pre).index_copy(0, suf_idx, out_suf)
        return out.reshape(b, s, h, d)
    return attend


def setup(config: Config, provider: str, mode: str = "fwd+bwd", device: torch.device | str = "cpu"):
    """One call of ``provider`` on fresh random q, k, v of ``config`` in ``mode`` (fwd, bwd or fwd+bwd)."""
    device = torch.device(device)
    c = config
    lens = c.prefix_lens(device)
    if provider == "flash-attn":  # its native layout (B, S, H, D)
        from flash_attn import flash_attn_func
        q, k, v = (torch.randn(c.batch, c.seq, c.heads, c.head_dim, device=device, dtype=c.dtype,
                               requires_grad=True) for _ in range(3))
        if lens is None:
            loss = lambda: flash_attn_func(q, k, v, causal=True).float().sum()  # noqa: E731
        else:
            attend = _flash_attn_two_calls(q, k, v, lens, c.seq)
            loss = lambda: attend().float().sum()  # noqa: E731
        return harness.make_step(loss, [q, k, v], mode)
    shape = (c.batch, c.heads, c.seq, c.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=c.dtype, requires_grad=True) for _ in range(3))
    if provider == "reference-compiled":
        ref = harness.compiled(prefix_attention_reference)
        loss = lambda: ref(q, k, v, lens).float().sum()  # noqa: E731
    elif provider == "sdpa-dense-mask":
        mask = prefix_mask(lens, c.batch, c.seq, device=device)
        loss = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum()  # noqa: E731
    elif provider == "flex-attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        lens_t = lens if lens is not None else torch.zeros(c.batch, dtype=torch.long, device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) | (kv_idx < lens_t[b])
        block_mask = create_block_mask(mask_mod, c.batch, None, c.seq, c.seq, device=device)
        flex = harness.compiled(flex_attention)
        loss = lambda: flex(q, k, v, block_mask=block_mask).float().sum()  # noqa: E731
    elif provider in K.BACKENDS:
        loss = lambda: K.prefix_attention(q, k, v, lens, backend=provider).float().sum()  # noqa: E731
    else:
        raise ValueError(f"no provider {provider!r} for {OP}")
    return harness.make_step(loss, [q, k, v], mode)


def derived(config: Config, mode: str, median_ms: float) -> dict:
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    return {"TFLOP/s": factor * config.fwd_flops() / median_ms / 1e9}


if __name__ == "__main__":
    import run
    sys.exit(run.main(["--op", OP, *sys.argv[1:]]))
