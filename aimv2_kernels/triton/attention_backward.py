"""Prefix-causal attention backward in Triton (FlashAttention-2 style, no atomics).

Three launches: ``delta = rowsum(dO * O)``; one kernel over key tiles that accumulates dK and dV over the
query tiles that can see them; one kernel over query tiles that accumulates dQ (the forward's loop bounds).

For a key tile ``[n0, n0 + BLOCK_N)`` with prefix M, the query tiles are split as::

    queries:  [0, lo)               never see the tile (n0 >= M and i < n0): never loaded
              [lo, mid)             boundary: mask (partly prefix, or straddling the diagonal)
              [mid, S_full)         every query sees every key of the tile: no mask arithmetic
              [S_full, S)           the sequence tail, masked

with ``lo = 0`` if ``n0 < M`` else ``floor(n0 / BLOCK_M) * BLOCK_M``, ``mid = 0`` when the tile lies inside the
prefix, else the first query tile starting at or after the tile's last key, and ``S_full = floor(S / BLOCK_M)
* BLOCK_M``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .attention_forward import (
    LOG2E,
    _load_rows,
    _load_tile_pair,
    _query_tile,
    _round,
    _row_sources,
    _visible,
    device_guard,
    dot_args,
    prefix_arg,
    prepare_inputs,
    tma_scratch,
    tuned_attention,
    use_tma,
)

_DELTA_BLOCK = 64


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob,  # noqa: E741  (O: the output; capitals name the tensors)
                      stride_oh, stride_os, stride_db, stride_dh, stride_ds, H, S,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """``DELTA[b, h, i] = sum_d dO * O`` in fp32, grid ``(cdiv(S, BLOCK_M), B * H)``."""
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < S
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=rows,
                other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :], mask=rows,
                 other=0.0)
    tl.store(DELTA + pid_bh * S + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < S)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, start, end, offs_m, offs_n, offs_d, prefix,
                seq_len, stride_qs, stride_dos, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key tile over query tiles ``[start, end)``; transposed scores.

    ``k`` and ``v`` are already in ``DOT_DTYPE``; ``q_src``/``do_src`` are this (batch, head)'s descriptors
    (``TMA``) or base pointers (see ``attention_forward._rows``).
    """
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        qT, do = _load_tile_pair(q_src, do_src, start_m, offs_m, offs_d, seq_len, stride_qs, stride_dos, MASKED, TMA,
                                 False)
        if MASKED:
            lse2 = tl.load(lse_ptr + rows, mask=rows < seq_len, other=0.0)
            delta = tl.load(delta_ptr + rows, mask=rows < seq_len, other=0.0)
        else:
            lse2 = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        qT_dot = qT.to(DOT_DTYPE)
        qkT = tl.dot(k, qT_dot, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            vis = _visible(rows[None, :], offs_n[:, None], prefix, seq_len, CAUSAL) & (rows[None, :] < seq_len)
            qkT = tl.where(vis, qkT, float("-inf"))
        pT = tl.math.exp2(qkT - lse2[None, :])
        do_dot = do.to(DOT_DTYPE)
        dv = tl.dot(_round(pT, do.dtype, DOT_DTYPE), do_dot, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do_dot), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(_round(dsT, qT.dtype, DOT_DTYPE), tl.trans(qT_dot), dk, input_precision=DOT_PRECISION)
    return dk, dv


def _dkdv_smem(config, elt, head_dim):
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    return elt * (2 * bn * head_dim + stages * 2 * bm * head_dim + bm * bn)


# dK/dV tiles (BLOCK_M query rows per step, BLOCK_N keys per program), expected best first on an H100/H200 (not
# benchmarked here). The program keeps the fp32 dk, dv of its BLOCK_N keys in registers (k and v stay in shared
# memory: wgmma reads them from there), plus the fp32 scores and dP^T of one step, so at D = 128 the sum is
# 2 * BLOCK_N * 128 + 2 * BLOCK_N * BLOCK_M floats over the threads. 128 keys over two warpgroups fit with 32
# query rows per step (Hopper, TMA: 200-225 registers); FlashAttention's 128 x 64 tile (64, 128, 8, 2) spills
# at D = 128 on both targets, and is listed first for D = 64 on sm_90a (172-229 registers). Tried and dropped
# at D = 128 on sm_90a (Triton 3.6): 16 warps (4 warpgroups: at most 128 registers per thread, 248-1700 B of
# spill stores) and a single stage (64 x 128: 24-152 B). Splitting the head dimension of the accumulators would
# repeat the two score products per half (1.5x the kernel's FLOPs), so it is not done.
_DKDV_TILES = [(64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3)]
# fp32 ("ieee", FMA): 16 x 16 with 4 warps and 1 stage: 70-112 registers on both targets and versions. 16 x 32
# with 8 warps also stayed clean, but at up to 186 registers (Triton 3.9, sm_90a, D = 128); 32 x 32 tiles spill
# there (8 warps: 1048 B with Triton 3.6, 972 B with 3.9).
_DKDV_TILES_FP32 = [(16, 16, 4, 1)]
# Tiles that spill, by (sm_90+, element bytes, D class). Worst spill stores over the masking modes and fp16/bf16,
# Triton 3.6 / 3.9, in bytes (sm_90+: the TMA path; sm_80: pointers; with pointer loads on sm_90a, (64, 64, 8, 3)
# and (32, 128, 8, 2) spilled too, 0 / 96 and 0 / 12 B):
#   sm_90a, D = 128: (64, 128, 8, 2) 24 / 68 at 255 registers;
#   sm_80, D = 128: (64, 128, 8, 2) 5188 / 5252; (32, 128, 8, 3) 9300 / 9436; (32, 128, 8, 2) 9268 / 9528;
#     (32, 64, 4, 3) 0 / 16 (255 registers);
#   sm_80, D = 64: (64, 128, 8, 2) 0 / 16 (255 registers); (64, 64, 8, 3) 24 / 8; (32, 128, 8, 2) 0 / 4.
_DKDV_SPILLS = {
    (True, 2, 128): {(64, 128, 8, 2)},
    (False, 2, 128): {(64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 4, 3)},
    (False, 2, 64): {(64, 128, 8, 2), (64, 64, 8, 3), (32, 128, 8, 2)},
}


@tuned_attention("attn_bwd_dkdv", _DKDV_TILES, _DKDV_TILES_FP32, _DKDV_SPILLS, _dkdv_smem)
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PREFIX,
                          stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                          stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                          H, S, qk_scale, scale,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                          ALL_MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key tile: grid ``(cdiv(S, BLOCK_N), B * H)``; DK/DV contiguous ``(B, H, S, D)``.

    Longest tiles first, in the grid's own order: key tile ``n0`` is seen by ``S - n0`` queries, or by all S
    when it starts inside the prefix, which never increases with ``n0``.
    """
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    n0 = tl.program_id(0) * BLOCK_N
    s_full = (S // BLOCK_M) * BLOCK_M
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b).to(tl.int32)
    if CAUSAL:
        lo = tl.where(n0 < prefix, 0, (n0 // BLOCK_M) * BLOCK_M)
        first_full = tl.where(n0 + BLOCK_N <= prefix, 0, tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M)
        mid = tl.minimum(tl.maximum(lo, first_full), s_full)
    else:
        lo = 0
        mid = 0
    if ALL_MASKED:  # testing aid: send every tile through the masked path
        mid = s_full

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < S
    k_src, v_src = _row_sources(K, V, b * stride_kb + h * stride_kh, b * stride_vb + h * stride_vh, S, stride_ks,
                                stride_vs, BLOCK_N, HEAD_DIM, TMA)
    k = _load_rows(k_src, n0, offs_n, offs_d, S, stride_ks, TMA).to(DOT_DTYPE)
    v = _load_rows(v_src, n0, offs_n, offs_d, S, stride_vs, TMA).to(DOT_DTYPE)
    # Descriptors or scalar bases; the loops form each tile's addresses (see _attn_fwd_kernel).
    q_src, do_src = _row_sources(Q, DO, b * stride_qb + h * stride_qh, b * stride_dob + h * stride_doh, S,
                                 stride_qs, stride_dos, BLOCK_M, HEAD_DIM, TMA)
    lse_ptr = LSE + pid_bh * S
    delta_ptr = DELTA + pid_bh * S

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, lo, mid, offs_m, offs_n, offs_d,
                         prefix, S, stride_qs, stride_dos, qk_scale, CAUSAL, True, BLOCK_M, DOT_DTYPE, DOT_PRECISION,
                         TMA)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, mid, s_full, offs_m, offs_n, offs_d,
                         prefix, S, stride_qs, stride_dos, qk_scale, CAUSAL, False, BLOCK_M, DOT_DTYPE,
                         DOT_PRECISION, TMA)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, s_full, S, offs_m, offs_n, offs_d,
                         prefix, S, stride_qs, stride_dos, qk_scale, CAUSAL, True, BLOCK_M, DOT_DTYPE, DOT_PRECISION,
                         TMA)

    out_offs = pid_bh * S * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offs, _round(dk * scale, DK.dtype.element_ty, DOT_DTYPE), mask=keys)
    tl.store(DV + out_offs, _round(dv, DV.dtype.element_ty, DOT_DTYPE), mask=keys)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_src, v_src, start, end, offs_m, offs_n, offs_d, prefix, seq_len,
              stride_ks, stride_vs, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ (unscaled) of one query tile over key tiles ``[start, end)``; q, do in ``DOT_DTYPE``;
    ``k_src``/``v_src`` as in :func:`_dkdv_tiles`."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kT, vT = _load_tile_pair(k_src, v_src, start_n, offs_n, offs_d, seq_len, stride_ks, stride_vs, MASKED, TMA,
                                 True)
        kT_dot = kT.to(DOT_DTYPE)
        qk = tl.dot(q, kT_dot, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(_visible(offs_m[:, None], cols[None, :], prefix, seq_len, CAUSAL), qk, float("-inf"))
        p = tl.math.exp2(qk - lse2[:, None])
        dp = tl.dot(do, vT.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_round(ds, kT.dtype, DOT_DTYPE), tl.trans(kT_dot), dq, input_precision=DOT_PRECISION)
    return dq


def _dq_smem(config, elt, head_dim):
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    return elt * (2 * bm * head_dim + stages * 2 * bn * head_dim + bm * bn)


# dQ tiles, expected best first on an H100/H200 (not benchmarked here). 8 warps replace the former 4-warp
# 128-row tiles, which spilled ((128, 32, 4, 3): 488 B on sm_90a at D = 128, 2640 B on sm_80; (128, 64, 4, 2):
# 2248 B / 8540 B; Triton 3.6), and (64, 64, 4, 3), which spilled 12 B on sm_80 at both head dims.
_DQ_TILES = [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)]
# fp32 ("ieee", FMA): 16 x 16 with 4 warps: 72-80 registers on both targets and versions (32 x 64 with 8 warps,
# 74-118 registers, also fits but compiles twice as long; 32 x 32 with 8 warps spilled 824 B on sm_90a at
# D = 128 with Triton 3.9).
_DQ_TILES_FP32 = [(16, 16, 4, 2)]
# Tiles that spill (sm_90a, TMA: none; 126-183 registers at D = 128), by (sm_90+, element bytes, D class). Worst
# spill stores over the masking modes and fp16/bf16, Triton 3.6 / 3.9, in bytes:
#   sm_80, D = 128: (128, 64, 8, 2) 412 / 388; (128, 32, 8, 3) 40 / 36;
#   sm_80, D = 64: (128, 64, 8, 2) 32 / 60; (64, 64, 8, 3) 44 / 80.
_DQ_SPILLS = {
    (False, 2, 128): {(128, 64, 8, 2), (128, 32, 8, 3)},
    (False, 2, 64): {(128, 64, 8, 2), (64, 64, 8, 3)},
}


@tuned_attention("attn_bwd_dq", _DQ_TILES, _DQ_TILES_FP32, _DQ_SPILLS, _dq_smem)
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PREFIX,
                        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                        stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                        H, S, qk_scale, scale,
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                        ALL_MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query tile: grid ``(cdiv(S, BLOCK_M), B * H)``, the key range and the longest-first order
    of the forward kernel."""
    pid_bh, b, h, m0, prefix, hi, full_end = _query_tile(PREFIX, H, S, BLOCK_M, BLOCK_N, CAUSAL, HAS_PREFIX,
                                                         ALL_MASKED)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < S
    q_src, do_src = _row_sources(Q, DO, b * stride_qb + h * stride_qh, b * stride_dob + h * stride_doh, S,
                                 stride_qs, stride_dos, BLOCK_M, HEAD_DIM, TMA)
    q = _load_rows(q_src, m0, offs_m, offs_d, S, stride_qs, TMA).to(DOT_DTYPE)
    do = _load_rows(do_src, m0, offs_m, offs_d, S, stride_dos, TMA).to(DOT_DTYPE)
    lse2 = tl.load(LSE + pid_bh * S + offs_m, mask=offs_m < S, other=0.0)
    delta = tl.load(DELTA + pid_bh * S + offs_m, mask=offs_m < S, other=0.0)
    # Descriptors or scalar bases (see _attn_fwd_kernel)
    k_src, v_src = _row_sources(K, V, b * stride_kb + h * stride_kh, b * stride_vb + h * stride_vh, S, stride_ks,
                                stride_vs, BLOCK_N, HEAD_DIM, TMA)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_src, v_src, 0, full_end, offs_m, offs_n, offs_d, prefix, S,
                   stride_ks, stride_vs, qk_scale, CAUSAL, False, BLOCK_N, DOT_DTYPE, DOT_PRECISION, TMA)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_src, v_src, full_end, hi, offs_m, offs_n, offs_d, prefix, S,
                   stride_ks, stride_vs, qk_scale, CAUSAL, True, BLOCK_N, DOT_DTYPE, DOT_PRECISION, TMA)
    tl.store(DQ + pid_bh * S * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             _round(dq * scale, DQ.dtype.element_ty, DOT_DTYPE), mask=rows)


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, prefix_lens: torch.Tensor | None, *, causal: bool, scale: float,
                       mask_every_tile: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (no autograd).

    Args:
        do: gradient of the output, ``(B, H, S, D)`` in q's dtype, any strides.
        q, k, v: the forward inputs; out, lse: the forward's outputs (:func:`attention_forward`).
        prefix_lens, causal, scale, mask_every_tile: as in :func:`attention_forward`.

    Returns:
        ``(dq, dk, dv)``, contiguous ``(B, H, S, D)`` in q's dtype.
    """
    tma = use_tma(q)
    q, k, v, out, do = prepare_inputs(q, k, v, out, do, tma=tma)
    batch, heads, seq, head_dim = q.shape
    dq, dk, dv = (new_output((batch, heads, seq, head_dim), dtype=q.dtype, device=q.device) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    delta = new_output((batch, heads, seq), dtype=torch.float32, device=q.device)
    prefix, has_prefix = prefix_arg(prefix_lens, causal, q)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    flags = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_PREFIX=has_prefix, ALL_MASKED=mask_every_tile, TMA=tma,
                 **dot_args(q.dtype))

    def grid_n(meta):
        return (triton.cdiv(seq, meta["BLOCK_N"]), batch * heads)

    def grid_m(meta):
        return (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)

    with device_guard(q), tma_scratch(tma, q.device):
        _bwd_delta_kernel[(triton.cdiv(seq, _DELTA_BLOCK), batch * heads)](
            out, do, delta, *out.stride()[:3], *do.stride()[:3], heads, seq, HEAD_DIM=head_dim,
            BLOCK_M=_DELTA_BLOCK)
        _attn_bwd_dkdv_kernel[grid_n](q, k, v, do, lse, delta, dk, dv, prefix, *strides, heads, seq,
                                      scale * LOG2E, scale, **flags)
        _attn_bwd_dq_kernel[grid_m](q, k, v, do, lse, delta, dq, prefix, *strides, heads, seq,
                                    scale * LOG2E, scale, **flags)
    return dq, dk, dv
