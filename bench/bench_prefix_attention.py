"""Benchmark of ``prefix_attention``: our backends against the reference (eager and compiled) and the peers.

Peers: ``F.scaled_dot_product_attention`` with a dense boolean prefix mask; FlexAttention with a per-sample
prefix block mask (compiled; CUDA only here, its CPU version has no backward); flash-attn as two calls, a
non-causal one over each sample's prefix and a bottom-right causal one for the rest (CUDA, when installed).

Shapes: the AIMv2 encoder (head dim 128, per-sample prefixes drawn uniform in [1, S-1] by a generator seeded
with 0, so every provider, every run and the FLOP count see the same prefixes), swept in S at a constant
32k tokens per call: on a GPU S = 256, 1024 and 4096 (native resolution), on a CPU also 576 and 2048; and the
decoder at S = 334 (256 patches + start token + 77 caption tokens), plainly causal.

``work(config, mode)``: FLOPs ``2 D H sum_b (S^2 + M_b^2)`` forward (the visible (query, key) pairs times 4D;
plainly causal is ``M_b = 0``, half of full attention), 2.5x that backward; bytes: the forward reads q, k, v
and writes o and the fp32 log-sum-exp, the backward reads q, k, v, o, do and the log-sum-exp and writes
dq, dk, dv (fwd+bwd: both). The FLOPs per byte grow with S: on an H200 (about 184 FLOP per byte copied) the
shapes from S = 1024 up are matmul-bound, S = 256 and the decoder's S = 334 memory-bound by this count.
``python bench/bench_prefix_attention.py [--device cpu|cuda] [--quick]`` is
``bench/run.py --op prefix_attention``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

import aimv2_kernels as K
from aimv2_kernels.reference import prefix_attention_reference, prefix_mask

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

    def sum_prefix_squares(self) -> int:
        """``sum_b M_b^2`` of :meth:`prefix_lens` (0 for plainly causal)."""
        lens = self.prefix_lens("cpu")
        return 0 if lens is None else int((lens.long() ** 2).sum())

    def fwd_flops(self) -> int:
        """``2 D H sum_b (S^2 + M_b^2)``: the visible (query, key) pairs times 4D; the backward is 2.5x this."""
        return 2 * self.head_dim * self.heads * (self.batch * self.seq ** 2 + self.sum_prefix_squares())


# The CPU shape of the pytest-benchmark microbenchmarks (bench/test_microbench.py).
MICRO = Config(2, 2, 576, dtype=torch.float32)

def configs(device: torch.device, quick: bool = False) -> list[Config]:
    if quick:
        return [Config(2, 2, 33, 64, torch.float32), Config(2, 2, 65, 64, torch.float32),
                Config(2, 2, 33, 64, torch.float32, prefix="causal", series="")]
    if device.type == "cuda":  # AIMv2-L: 8 heads of 128; 32k tokens per call; the decoder at batch 128
        # Three encoder lengths only (the goals' S): each new S costs FlexAttention and the compiled reference a
        # compile per mode, and the whole GPU op-benchmark stage must fit its 140 s cap.
        return [Config(32768 // s, 8, s) for s in (256, 1024, 4096)] + [
            Config(128, 8, 334, prefix="causal", series="")]
    return [Config(max(1, 2048 // s), 2, s, dtype=torch.float32) for s in (256, 576, 1024, 2048, 4096)] + [
        Config(4, 2, 334, dtype=torch.float32, prefix="causal", series="")]


def _flash_attn_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "flash-attn runs on CUDA only"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    return None


POINTERS_ENV = "AIMV2_BENCH_TRITON_POINTERS"


def _pointers_reason(device: torch.device, ours: dict) -> str | None:
    """Why "triton-pointers" (our Triton kernels with the descriptor loads turned off) does not run here. It is
    opt-in (``AIMV2_BENCH_TRITON_POINTERS=1``, set by bench/gpu_check.sh's tma stage): its autotuning would
    lengthen the main benchmark stage."""
    if device.type != "cuda":
        return "a Hopper GPU only (TMA off vs on)"
    if os.environ.get(POINTERS_ENV) != "1":
        return f"opt-in: {POINTERS_ENV}=1 (bench/gpu_check.sh's tma stage)"
    if ours.get("triton", "no Triton backend") is not None:
        return "the Triton backend does not run here"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        return "below sm_90 the Triton kernels always use pointer loads (the triton row)"
    return None


@contextlib.contextmanager
def _tma_off():
    """``AIMV2_ATTENTION_TMA=0`` for the block (read at every launch), then the caller's value again."""
    from aimv2_kernels.triton.attention_forward import TMA_ENV
    old = os.environ.get(TMA_ENV)
    os.environ[TMA_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[TMA_ENV]
        else:
            os.environ[TMA_ENV] = old


def providers(device: torch.device) -> dict[str, str | None]:
    """provider -> None when it can run here, else why not. "triton-pointers" is the Triton backend with pointer
    loads instead of tensor descriptors (TMA) on a Hopper GPU: the measurement behind the TMA default."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        flex = "this torch has no FlexAttention"
    elif device.type != "cuda":  # torch raises NotImplementedError for inputs that require grad
        flex = "FlexAttention has no backward on a CPU"
    else:
        flex = None
    ours = harness.our_backends(OP, device)
    return {**ours, "triton-pointers": _pointers_reason(device, ours), "reference": None, "reference-compiled": None,
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
            loss = lambda: flash_attn_func(q, k, v, causal=True).float().sum()
        else:
            attend = _flash_attn_two_calls(q, k, v, lens, c.seq)
            loss = lambda: attend().float().sum()
        return harness.make_step(loss, [q, k, v], mode)
    shape = (c.batch, c.heads, c.seq, c.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=c.dtype, requires_grad=True) for _ in range(3))
    if provider == "reference-compiled":
        ref = harness.compiled(prefix_attention_reference)
        loss = lambda: ref(q, k, v, lens).float().sum()
    elif provider == "sdpa-dense-mask":
        mask = prefix_mask(lens, c.batch, c.seq, device=device)
        loss = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum()
    elif provider == "flex-attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        lens_t = lens if lens is not None else torch.zeros(c.batch, dtype=torch.long, device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) | (kv_idx < lens_t[b])
        block_mask = create_block_mask(mask_mod, c.batch, None, c.seq, c.seq, device=device)
        flex = harness.compiled(flex_attention)
        loss = lambda: flex(q, k, v, block_mask=block_mask).float().sum()
    elif provider == "triton-pointers":
        def loss():
            return K.prefix_attention(q, k, v, lens, backend="triton").float().sum()
        with _tma_off():  # the bwd mode runs the forward here
            step = harness.make_step(loss, [q, k, v], mode)

        def run():
            with _tma_off():
                return step()
        return run
    elif provider in K.BACKENDS:
        loss = lambda: K.prefix_attention(q, k, v, lens, backend=provider).float().sum()
    else:
        raise ValueError(f"no provider {provider!r} for {OP}")
    return harness.make_step(loss, [q, k, v], mode)


# Backward FLOPs are 2.5x the forward's (the scores are recomputed in the backward): 5/2, in integers.
BWD_NUM, BWD_DEN = 5, 2


def work(config: Config, mode: str) -> dict:
    """FLOPs and bytes that must be done and moved (see the module doc)."""
    c = config
    elt = torch.finfo(c.dtype).bits // 8
    tensor = c.batch * c.heads * c.seq * c.head_dim * elt  # one of q, k, v, o, do, dq, dk, dv
    lse = c.batch * c.heads * c.seq * 4  # fp32
    fwd_bytes, bwd_bytes = 4 * tensor + lse, 8 * tensor + lse
    fwd = c.fwd_flops()
    bwd = fwd * BWD_NUM // BWD_DEN  # fwd is even: exact
    flops = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[mode]
    return {"bytes": nbytes, "flops": flops, "dtype": harness.dtype_name(c.dtype)}


def derived(config: Config, mode: str, median_ms: float) -> dict:
    return {"TFLOP/s": work(config, mode)["flops"] / median_ms / 1e9}


GOAL_SEQS = (256, 1024, 4096)  # >= 1.3x FlexAttention at these S (head dim 128, random prefixes)


def goals(config: Config, mode: str, rows: dict, ours, ceilings: dict) -> list:
    """GPU goals of the encoder shapes (head dim 128, random prefixes): at least 1.3x FlexAttention at S = 256,
    1024 and 4096, and at least 400 TFLOP/s forward at S = 4096."""
    c = config
    if c.prefix != "random" or c.head_dim != 128 or c.seq not in GOAL_SEQS:
        return []
    out = [harness.speed_goal(">= 1.3x FlexAttention", ours, rows.get("flex-attention"), 1.3)]
    if c.seq == 4096 and mode == "fwd":
        tflops = work(c, mode)["flops"] / ours.median_ms / 1e9 if ours is not None and ours.median_ms else None
        out.append(harness.Goal(">= 400 TFLOP/s forward", tflops is not None and tflops >= 400,
                                "ours not measured" if tflops is None else f"{tflops:.0f} TFLOP/s"))
    return out


if __name__ == "__main__":
    import run
    sys.exit(run.main(["--op", OP, *sys.argv[1:]]))
