"""Prefix-causal attention forward in Triton (FlashAttention-2 style online softmax), plus shared helpers.

Key j is visible to query i iff ``not CAUSAL`` or ``j <= i`` or ``j < prefix_lens[b]``. For a query tile
``[m0, m0 + BLOCK_M)`` with prefix M the kernel visits keys ``[0, min(max(m0 + BLOCK_M, M), S))`` only, and
splits them in two loops::

    keys:  [0, full_end)             every query of the tile sees every key: no mask arithmetic
           [full_end, hi)            boundary tiles: mask (causal / prefix / sequence tail)
           [hi, S)                   never visible to this tile: never loaded

with ``full_end = floor(max(M, m0 + 1) / BLOCK_N) * BLOCK_N`` (a key tile ending at or before ``max(M, m0+1)``
lies in the prefix or at or below the tile's first query). The backward kernels reuse :func:`_visible`,
the config helpers and :func:`prepare_inputs` from here.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .tuning import INTERPRET, tuned

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)


def make_configs(tiles):
    """Autotune configs from ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples, in the given order."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


def tile(config) -> tuple:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of an attention config."""
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


# Under TRITON_INTERPRET=1 every attention kernel gets this one config, so tests neither autotune nor wait.
INTERPRET_CONFIGS = make_configs([(16, 16, 4, 1)])


def attention_rule(estimate, fp32_tiles, spills):
    """The pruning rule of an attention kernel (see :mod:`.tuning`). It keeps the configs that

    1. suit the inputs' precision: fp32 (``DOT_PRECISION="ieee"``: FMA products, no tensor cores, many more
       registers per tile) uses ``fp32_tiles`` only, fp16/bf16 every other tile;
    2. do not spill registers on the target: ``spills[(target.hopper, element bytes, 128 if D > 64 else 64)]``
       lists the tiles ptxas spilled for that target family (sm_90 and later; sm_80-89) and head dimension,
       measured with ``tools/triton_compile_check.py --all`` (Triton 3.6 and 3.9, every masking mode). Head
       dimensions 16 and 32 use the D = 64 entry: they need fewer registers per tile, and are not compiled by
       the check;
    3. fit the target's shared memory by ``estimate(config, elt_bytes, head_dim)`` (bytes).

    When none fits, the one with the smallest estimate among those left by 1 and 2 is kept, so that a launch
    always has a config.
    """
    fp32_tiles = set(fp32_tiles)

    def candidates(configs, args):
        """The configs of the inputs' precision (step 1)."""
        fp32 = args["Q"].element_size() == 4
        return [c for c in configs if (tile(c) in fp32_tiles) == fp32] or configs

    def rule(configs, args, target):
        elt, head_dim = args["Q"].element_size(), args["HEAD_DIM"]
        excluded = spills.get((target.hopper, elt, 128 if head_dim > 64 else 64), ())
        ok = candidates(configs, args)
        ok = [c for c in ok if tile(c) not in excluded] or ok
        sizes = [estimate(c, elt, head_dim) for c in ok]
        kept = [c for c, size in zip(ok, sizes) if size <= target.max_shared_memory]
        return kept or [ok[sizes.index(min(sizes))]]
    rule.candidates = candidates  # for tools/triton_compile_check.py --all
    return rule


def dot_args(dtype: torch.dtype) -> dict:
    """The kernels' ``DOT_DTYPE`` (operand type of every ``tl.dot``) and ``DOT_PRECISION``.

    fp32 inputs multiply in true fp32 ("ieee", not TF32) to match the fp32 reference; fp16 and bf16 feed the
    tensor cores directly, and on a GPU every ``.to(DOT_DTYPE)`` is a no-op. Under ``TRITON_INTERPRET=1``
    bf16 is emulated in fp32 (see :func:`_round`): the interpreter does not support bf16 arithmetic (it
    multiplies the raw bit patterns of bf16 ``tl.dot`` operands, triton-lang/triton#11584, and its
    fp32 -> bf16 cast truncates instead of rounding to nearest even).
    """
    if dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16):
        return {"DOT_DTYPE": tl.float32, "DOT_PRECISION": "ieee"}
    return {"DOT_DTYPE": tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, "DOT_PRECISION": "tf32"}


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current device for the launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def prepare_inputs(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Views with a unit stride in the head dimension (copied only when it is not); other strides are kept."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def prefix_arg(prefix_lens: torch.Tensor | None, causal: bool, like: torch.Tensor):
    """``(pointer tensor, HAS_PREFIX)``: int32 prefix lengths, or a dummy pointer when there are none."""
    if prefix_lens is None or not causal:
        return like, False
    return prefix_lens.to(device=like.device, dtype=torch.int32), True


@triton.jit
def _visible(q_idx, k_idx, prefix, seq_len, CAUSAL: tl.constexpr):
    """Broadcast mask: key ``k_idx`` exists and query ``q_idx`` may see it."""
    vis = k_idx < seq_len
    if CAUSAL:
        vis = vis & ((k_idx <= q_idx) | (k_idx < prefix))
    return vis


@triton.jit
def _round(x, DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``DTYPE`` (the inputs' dtype), returned as ``DOT_DTYPE``.

    On a GPU this is ``x.to(DTYPE)``. For bf16 under the interpreter (``DOT_DTYPE`` fp32) it rounds the
    fp32 bits, because the interpreter's cast truncates; the result is exactly representable in bf16.
    """
    if DTYPE == tl.bfloat16 and DOT_DTYPE == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE).to(DOT_DTYPE)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, start, end, offs_m, offs_n, offs_d, prefix, seq_len,
               stride_ks, stride_vs, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update over key tiles ``[start, end)``; scores in log2 units (``qk_scale`` has log2 e).

    ``q`` is already in ``DOT_DTYPE``; ``p`` is rounded to v's dtype before the second product, as in the
    reference and FlashAttention. ``k_base``/``v_base`` point at this (batch, head); the tile addresses are
    formed inside the loop (see :func:`_attn_fwd_kernel`).
    """
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kT_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            kT = tl.load(kT_ptrs, mask=cols[None, :] < seq_len, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < seq_len, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, kT.to(DOT_DTYPE), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(_visible(offs_m[:, None], cols[None, :], prefix, seq_len, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_v = _round(p, v.dtype, DOT_DTYPE)
        acc = tl.dot(p_v, v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _fwd_smem(config, elt, head_dim):
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    return elt * (bm * head_dim + stages * 2 * bn * head_dim + bm * bn)


# Hopper review (Triton 3.6 / 3.9, PTX of tools/triton_compile_check.py):
# * Products: tl.dot. Every fp16/bf16 config below compiles to wgmma on sm_90a (num_warps 4 or 8, and the M of
#   each product, BLOCK_M here and in dQ, BLOCK_N in dK/dV, is >= 64); sm_80 gets mma.sync. fp32 inputs use
#   input_precision "ieee", which no tensor-core instruction offers: FMA, hence the separate small fp32 tiles
#   (tf32 / 3xtf32 would change the results).
# * Loads: pointer tl.load, pipelined by num_stages (cp.async into a shared-memory ring), not tensor descriptors
#   / TMA (tl.make_tensor_descriptor): left to the TMA issue. Known so far: TMA needs a 16-byte aligned base and
#   strides (true for AIMv2's qkv views), descriptors made on the device need a global scratch allocator
#   (triton.set_allocator), Triton lowers descriptors to pointer loads below sm_90 (so one kernel serves both),
#   and its interpreter runs them. TMA would also free the address registers that, with the fp32
#   accumulators, decide which tiles spill below.
# * Tiles at D = 128: 128 x 64 with 8 warps (two warpgroups of 64 query rows) is the usual FlashAttention-2
#   forward tile on Hopper; at D = 64, 128 x 128 with 8 warps and 128 x 64 with 4 also fit. num_stages 2-3:
#   128 x 64 x 3 stages takes 131072 B of the 232448 B of shared memory at D = 128 (bf16).
#
# fp16/bf16 tiles (BLOCK_M, BLOCK_N, num_warps, num_stages), expected best first on an H100/H200 at D = 128
# (not benchmarked here); AIMV2_AUTOTUNE_MAX_CONFIGS=N keeps the first N that the rule keeps. (64, 128, 4, 3),
# formerly listed, is gone: it spilled at D = 128 on both targets (Triton 3.9: 8 B on sm_90a, 60 B on sm_80).
_FWD_TILES = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 32, 4, 3)]
# fp32 ("ieee", FMA): one tile. 32 x 64 with 8 warps and 1 stage stays at 64-195 registers on both targets and
# both versions. Larger fp32 tiles spill kilobytes (64 x 64 with 8 warps: 67760 B on sm_90a at D = 128, Triton
# 3.6); 16 x 64 spilled with Triton 3.9 on sm_80, 32 x 32 on sm_90a, both at D = 128.
_FWD_TILES_FP32 = [(32, 64, 8, 1)]
# Tiles that spill registers, by (sm_90+, element bytes, D class): worst spill stores + loads over the masking
# modes with Triton 3.6 / 3.9, in bytes.
_FWD_SPILLS = {
    (True, 2, 128): {(128, 64, 4, 3)},  # 496 / 776 at 255 registers (8 warps: 176-182 registers, no spill)
    (False, 2, 128): {(128, 64, 4, 3),  # 764 / 860
                      (128, 64, 8, 3),  # 0 / 24 (211-255 registers)
                      (128, 128, 8, 2)},  # 24 / 80 (also above sm_80's shared memory by the estimate)
    (False, 2, 64): {(128, 64, 4, 3)},  # 0 / 32
}
FWD_CONFIGS = make_configs(_FWD_TILES + _FWD_TILES_FP32)


@tuned("attn_fwd", FWD_CONFIGS, attention_rule(_fwd_smem, _FWD_TILES_FP32, _FWD_SPILLS),
       interpret_configs=INTERPRET_CONFIGS,
       key=["S", "HEAD_DIM", "CAUSAL", "HAS_PREFIX"])
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, PREFIX,
                     stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                     H, S, qk_scale,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                     ALL_MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile of one (batch, head): grid ``(cdiv(S, BLOCK_M), B * H)``; writes O and the fp32 LSE."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b).to(tl.int32)
    if CAUSAL:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M, prefix), S)
        full_end = (tl.maximum(m0 + 1, prefix) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full_end = (S // BLOCK_N) * BLOCK_N
    if ALL_MASKED:  # testing aid: send every tile through the masked path
        full_end = 0

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < S, other=0.0).to(DOT_DTYPE)
    # Scalar bases; the loops form each tile's addresses (here and in the backward kernels). Before, tensors of
    # 64-bit pointers ([HEAD_DIM, BLOCK_N] here) were made once and carried through every loop. Same loads, same
    # results, fewer registers: with Triton 3.6 (bf16, worst masking mode) 27 of the 64 (config, target, head
    # dim) cases of the former config lists spill instead of 31, e.g. this kernel's 128x64 tile with 4 warps
    # at D = 128 on sm_90a 496 B instead of 1556, dQ's 128x64/4 warps on sm_80 8540 B instead of 50516, dK/dV's
    # 32x64/4 warps on sm_80 0 instead of 12 (Triton 3.9: 24); a few grow (dK/dV 64x128/4 warps, sm_80, D = 64:
    # 8004 B instead of 4220). tools/triton_compile_check.py measures them.
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Key 0 is visible to every query, so each row has a finite maximum after the first tile.
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, 0, full_end, offs_m, offs_n, offs_d, prefix, S,
                               stride_ks, stride_vs, qk_scale, CAUSAL, False, BLOCK_N, DOT_DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, full_end, hi, offs_m, offs_n, offs_d, prefix, S,
                               stride_ks, stride_vs, qk_scale, CAUSAL, True, BLOCK_N, DOT_DTYPE, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, _round(out, O.dtype.element_ty, DOT_DTYPE), mask=offs_m[:, None] < S)
    lse2 = m_i + tl.math.log2(l_i)  # log2 of the softmax denominator, log2(e) * LSE
    tl.store(LSE + pid_bh * S + offs_m, lse2, mask=offs_m < S)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_lens: torch.Tensor | None, *,
                      causal: bool, scale: float, mask_every_tile: bool = False):
    """Launch the forward kernel (no autograd).

    Args:
        q, k, v: ``(B, H, S, D)``, one dtype among fp32/bf16/fp16, D in (16, 32, 64, 128); any strides
            (a head dimension with a non-unit stride is copied once).
        prefix_lens: None or integer ``(B,)`` in ``[0, S]`` (ignored when ``causal`` is False).
        causal, scale: as in :func:`aimv2_kernels.prefix_attention` (``scale`` already resolved).
        mask_every_tile: testing aid; evaluates the mask on every tile (same result, slower).

    Returns:
        ``(out, lse)``: out ``(B, H, S, D)`` contiguous in q's dtype; lse fp32 ``(B, H, S)``, the log-sum-exp
        of the scaled scores in base 2 (``log2(e) * logsumexp``: the backward subtracts it from the scores in
        log2 units directly, which saves two roundings of a number as large as the logits).
    """
    q, k, v = prepare_inputs(q, k, v)
    batch, heads, seq, head_dim = q.shape
    out = new_output((batch, heads, seq, head_dim), dtype=q.dtype, device=q.device)
    lse = new_output((batch, heads, seq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    prefix, has_prefix = prefix_arg(prefix_lens, causal, q)

    def grid(meta):
        return (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)

    with device_guard(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, prefix, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            heads, seq, scale * LOG2E, HEAD_DIM=head_dim, CAUSAL=causal, HAS_PREFIX=has_prefix,
            ALL_MASKED=mask_every_tile, **dot_args(q.dtype))
    return out, lse
