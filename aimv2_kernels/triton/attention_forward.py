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
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .tuning import INTERPRET, Target, tuned

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)


def make_configs(tiles: Iterable[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs from ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples, in the given order."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


def tile(config: triton.Config) -> tuple:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of an attention config."""
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


# Under TRITON_INTERPRET=1 every attention kernel gets this one config, so tests neither autotune nor wait.
INTERPRET_CONFIGS = make_configs([(16, 16, 4, 1)])


def attention_rule(estimate: Callable[[triton.Config, int, int], int],
                   fp32_tiles: Iterable[tuple[int, int, int, int]],
                   spills: Mapping[tuple[bool, int, int], Collection[tuple[int, int, int, int]]],
                   ) -> Callable[[list, dict, Target], list]:
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


def tuned_attention(name: str, tiles: list, fp32_tiles: list, spills: dict,
                    smem: Callable[[triton.Config, int, int], int]) -> Callable:
    """:func:`.tuning.tuned` for an attention kernel: configs from ``tiles`` (fp16/bf16) and ``fp32_tiles``, the
    :func:`attention_rule` over ``spills`` and the shared-memory estimate ``smem``, one small config under the
    interpreter, one tuning per (S, HEAD_DIM, CAUSAL, HAS_PREFIX, TMA) and input dtypes."""
    return tuned(name, make_configs(list(tiles) + list(fp32_tiles)), attention_rule(smem, fp32_tiles, spills),
                 interpret_configs=INTERPRET_CONFIGS, key=["S", "HEAD_DIM", "CAUSAL", "HAS_PREFIX", "TMA"])


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


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """Make ``t``'s GPU the current device for the launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


TMA_ENV = "AIMV2_ATTENTION_TMA"


def tma_for(capability: int, dtype: torch.dtype) -> bool:
    """Whether the kernels load through tensor descriptors (TMA) on a GPU of this compute capability
    (``10 * major + minor``) for inputs of ``dtype``: sm_90 and newer, fp16 and bf16. fp32 inputs keep the
    pointer loads: their products run on FMA units (see :func:`dot_args`), which TMA does not speed up, and
    the FMA operand layouts fed from TMA tiles spilled kilobytes on sm_90a (up to 10 KB of spill stores at
    D = 128, Triton 3.9). Shared with ``tools/triton_compile_check.py``, which compiles the variant each
    target runs."""
    return capability >= 90 and dtype in (torch.float16, torch.bfloat16)


def use_tma(t: torch.Tensor) -> bool:
    """The ``TMA`` flag of a launch on ``t``'s device and dtype.

    ``AIMV2_ATTENTION_TMA`` = ``auto`` (default: :func:`tma_for`; off under ``TRITON_INTERPRET=1``), ``1``
    (descriptors for fp16/bf16 inputs, also under the interpreter; on a GPU below sm_90 this is an error, not
    a quiet pointer path) or ``0`` (pointer loads everywhere: the sm_80 code path, for comparisons on a
    Hopper GPU). fp32 inputs always use pointer loads.
    """
    raw = os.environ.get(TMA_ENV, "auto").strip().lower() or "auto"
    if raw not in ("auto", "0", "1"):
        raise ValueError(f"{TMA_ENV} must be auto, 0 or 1, got {raw!r}")
    if raw == "0" or t.dtype not in (torch.float16, torch.bfloat16):
        return False
    capability = None
    if t.is_cuda and not INTERPRET:
        major, minor = torch.cuda.get_device_capability(t.device)
        capability = 10 * major + minor
    if raw == "auto":
        return capability is not None and tma_for(capability, t.dtype)
    if capability is not None and not tma_for(capability, t.dtype):
        raise RuntimeError(f"{TMA_ENV}=1: tensor descriptors need sm_90 or newer, this GPU is sm_{capability}")
    return True


def _tma_ready(t: torch.Tensor) -> bool:
    """``t``'s (batch, head) matrices are valid TMA sources: 16-byte aligned start and row stride (every
    stride but the last is a multiple of 16 bytes; the last is 1)."""
    elt = t.element_size()
    return t.data_ptr() % 16 == 0 and all((stride * elt) % 16 == 0 for stride in t.stride()[:-1])


def prepare_inputs(*tensors: torch.Tensor, tma: bool = False) -> list[torch.Tensor]:
    """Views with a unit stride in the head dimension; other strides are kept.

    A view is copied only when its head dimension is strided or, with ``tma``, when a descriptor cannot
    address it (:func:`_tma_ready`; the views of AIMv2's fused qkv projection always can). The copy is a fresh
    contiguous allocation (aligned), even for a tensor that is contiguous already but starts off a 16-byte
    boundary.
    """
    def ready(t):
        return t.stride(-1) == 1 and (not tma or _tma_ready(t))
    return [t if ready(t) else t.clone(memory_format=torch.contiguous_format) for t in tensors]


@contextlib.contextmanager
def tma_scratch(enabled: bool, device: torch.device) -> Iterator[None]:
    """Global scratch for the descriptors the kernels build on the device (``tl.make_tensor_descriptor``,
    128 bytes per descriptor and program), allocated by torch on ``device`` during the launch.

    Triton takes it from the allocator of ``triton.set_allocator``; when the caller has set none, one is
    set for the duration of the block and the caller's state is restored after (a context variable).
    """
    if not enabled:
        yield
        return
    from triton.runtime import _allocation  # the context variable behind triton.set_allocator

    if _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR:  # the caller's own allocator
        yield
        return

    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    token = _allocation._allocator.set(allocate)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def prefix_arg(prefix_lens: torch.Tensor | None, causal: bool, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
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
def _rows(base, offset, rows, stride_rows, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """The ``(rows, HEAD_DIM)`` matrix at ``base + offset`` (one batch and head, unit stride along the head
    dimension): a tensor descriptor with ``(BLOCK, HEAD_DIM)`` blocks when ``TMA``, else the pointer itself.

    Descriptors need a 16-byte aligned start and row stride; :func:`prepare_inputs` guarantees both.
    """
    if TMA:
        return tl.make_tensor_descriptor(base + offset, shape=[rows, HEAD_DIM], strides=[stride_rows, 1],
                                         block_shape=[BLOCK, HEAD_DIM])
    else:
        return base + offset


@triton.jit
def _row_sources(A, B, a_offset, b_offset, rows, stride_a, stride_b, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 TMA: tl.constexpr):
    """:func:`_rows` of two matrices of one (batch, head) with the same block: ``(a_src, b_src)``."""
    return (_rows(A, a_offset, rows, stride_a, BLOCK, HEAD_DIM, TMA),
            _rows(B, b_offset, rows, stride_b, BLOCK, HEAD_DIM, TMA))


@triton.jit
def _query_tile(PREFIX, H, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_PREFIX: tl.constexpr, ALL_MASKED: tl.constexpr):
    """The query tile of this program and the keys it visits (forward and dQ): ``(pid_bh, b, h, m0, prefix, hi,
    full_end)``. Program 0 takes the last query tile (longest first, see :func:`_attn_fwd_kernel`); keys
    ``[0, full_end)`` need no mask, ``[full_end, hi)`` do, the rest is never visible."""
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
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
    return pid_bh, b, h, m0, prefix, hi, full_end


@triton.jit
def _load_rows(src, start, offs, offs_d, rows, stride_rows, TMA: tl.constexpr):
    """Rows ``start + offs`` of a :func:`_rows` matrix, zeros at and past ``rows``: ``(len(offs), HEAD_DIM)``."""
    if TMA:
        return src.load([start, 0])
    else:
        return tl.load(src + offs[:, None] * stride_rows + offs_d[None, :], mask=offs[:, None] < rows, other=0.0)


@triton.jit
def _store_rows(dst, value, start, offs, offs_d, rows, stride_rows, TMA: tl.constexpr):
    """Store ``value`` into rows ``start + offs`` (those below ``rows``) of a :func:`_rows` matrix."""
    if TMA:
        dst.store([start, 0], value)
    else:
        tl.store(dst + offs[:, None] * stride_rows + offs_d[None, :], value, mask=offs[:, None] < rows)


@triton.jit
def _load_tile_pair(a_src, b_src, start, offs, offs_d, rows, stride_a, stride_b, MASKED: tl.constexpr,
                    TMA: tl.constexpr, B_TRANSPOSED: tl.constexpr):
    """Rows ``start + offs`` of two :func:`_rows` matrices, as the loops consume them: the first transposed
    ``(HEAD_DIM, n)``, the second ``(n, HEAD_DIM)`` (transposed too with ``B_TRANSPOSED``). Rows at and past
    ``rows`` read as zeros (descriptors: always; pointers: with ``MASKED``, which the callers set on every tile
    that may reach past the sequence)."""
    if TMA:
        a_t = tl.trans(a_src.load([start, 0]))
        b = b_src.load([start, 0])
        if B_TRANSPOSED:
            b = tl.trans(b)
    else:
        idx = start + offs
        a_ptrs = a_src + idx[None, :] * stride_a + offs_d[:, None]
        if B_TRANSPOSED:
            b_ptrs = b_src + idx[None, :] * stride_b + offs_d[:, None]
            b_inside = idx[None, :] < rows
        else:
            b_ptrs = b_src + idx[:, None] * stride_b + offs_d[None, :]
            b_inside = idx[:, None] < rows
        if MASKED:
            a_t = tl.load(a_ptrs, mask=idx[None, :] < rows, other=0.0)
            b = tl.load(b_ptrs, mask=b_inside, other=0.0)
        else:
            a_t = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
    return a_t, b


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, start, end, offs_m, offs_n, offs_d, prefix, seq_len,
               stride_ks, stride_vs, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax update over key tiles ``[start, end)``; scores in log2 units (``qk_scale`` has log2 e).

    ``q`` is already in ``DOT_DTYPE``; ``p`` is rounded to v's dtype before the second product, as in the
    reference and FlashAttention. ``k_src``/``v_src`` are this (batch, head)'s tensor descriptors when ``TMA``,
    else its base pointers, from which the loop forms each tile's addresses (see :func:`_attn_fwd_kernel`).
    """
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kT, v = _load_tile_pair(k_src, v_src, start_n, offs_n, offs_d, seq_len, stride_ks, stride_vs, MASKED, TMA,
                                False)
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


# Hopper review (Triton 3.6 / 3.9, PTX of tools/triton_compile_check.py; docs/attention-kernels.md has the tables):
# * Products: tl.dot. Every fp16/bf16 config below compiles to wgmma on sm_90a (num_warps 4 or 8, and the M of
#   each product, BLOCK_M here and in dQ, BLOCK_N in dK/dV, is >= 64); sm_80 gets mma.sync. fp32 inputs use
#   input_precision "ieee", which no tensor-core instruction offers: FMA, hence the separate small fp32 tiles
#   (tf32 / 3xtf32 would change the results).
# * Loads: fp16/bf16 on sm_90+ read q, k, v, dO through tensor descriptors made on the device (TMA:
#   cp.async.bulk.tensor into shared memory, pipelined by num_stages; O is stored through one too), everything
#   else through pointer loads (cp.async). Same kernel source, the TMA constexpr picks the path (use_tma). The
#   descriptors free the address registers: at D = 128 on sm_90a the 128 x 64 / 8-warp forward tile went from
#   180-182 to 144-168 registers, 128 x 128 / 8 warps from 234-255 to 191-245, and two more dK/dV tiles stopped
#   spilling (Triton 3.9 / 3.6 ranges).
# * Warp specialisation: Triton 3.6's tl.range(..., warp_specialize=True) left this loop unchanged on sm_90a
#   (no setmaxnreg in the PTX, the same registers; Triton documents it for Blackwell), so it is not used.
# * Tiles at D = 128: 128 x 64 with 8 warps (two warpgroups of 64 query rows) is the usual FlashAttention-2
#   forward tile on Hopper; at D = 64, 128 x 128 with 8 warps and 128 x 64 with 4 also fit. num_stages 2-3:
#   128 x 64 x 3 stages takes 132096 B of the 232448 B of shared memory at D = 128 (bf16, TMA).
#
# fp16/bf16 tiles (BLOCK_M, BLOCK_N, num_warps, num_stages), expected best first on an H100/H200 at D = 128
# (not benchmarked here); AIMV2_AUTOTUNE_MAX_CONFIGS=N keeps the first N that the rule keeps. (64, 128, 4, 3),
# formerly listed, is gone: it spilled at D = 128 on both targets (Triton 3.9: 8 B on sm_90a, 60 B on sm_80).
_FWD_TILES = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 32, 4, 3)]
# fp32 ("ieee", FMA): one tile. 32 x 64 with 8 warps and 1 stage stays at 64-195 registers on both targets and
# both versions. Larger fp32 tiles spill kilobytes (64 x 64 with 8 warps: 67760 B on sm_90a at D = 128, Triton
# 3.6); 16 x 64 spilled with Triton 3.9 on sm_80, 32 x 32 on sm_90a, both at D = 128.
_FWD_TILES_FP32 = [(32, 64, 8, 1)]
# Tiles that spill registers, by (sm_90+, element bytes, D class). Worst spill stores over the masking modes and
# fp16/bf16, Triton 3.6 / 3.9, in bytes (sm_90+: the TMA path; sm_80: pointers):
#   sm_90a, D = 128: (128, 64, 4, 3) 108 / 16 at 255 registers (with 8 warps: 144-168 registers, no spill);
#   sm_80, D = 128: (128, 64, 4, 3) 400 / 464; (128, 64, 8, 3) 0 / 28 (226-255 registers); (128, 128, 8, 2)
#     20 / 64 (also above sm_80's shared memory by the estimate);
#   sm_80, D = 64: (128, 64, 4, 3) 12 / 20; (128, 128, 8, 2) 4 / 4 (since the longest-first grid order; 0 before).
_FWD_SPILLS = {
    (True, 2, 128): {(128, 64, 4, 3)},
    (False, 2, 128): {(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)},
    (False, 2, 64): {(128, 64, 4, 3), (128, 128, 8, 2)},
}


@tuned_attention("attn_fwd", _FWD_TILES, _FWD_TILES_FP32, _FWD_SPILLS, _fwd_smem)
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, PREFIX,  # noqa: E741  (O: the output; capitals name the tensors)
                     stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                     H, S, qk_scale,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                     ALL_MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile of one (batch, head): grid ``(cdiv(S, BLOCK_M), B * H)``; writes O and the fp32 LSE.

    Longest tiles first: program 0 takes the last query tile. A tile's work is ``max(m0 + BLOCK_M, prefix)``
    keys, which never decreases with ``m0``, so the blocks the GPU dispatches last (the tail of the grid) are
    the shortest ones.
    """
    pid_bh, b, h, m0, prefix, hi, full_end = _query_tile(PREFIX, H, S, BLOCK_M, BLOCK_N, CAUSAL, HAS_PREFIX,
                                                         ALL_MASKED)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Scalar bases; the loops form each tile's addresses (here and in the backward kernels). Before, tensors of
    # 64-bit pointers ([HEAD_DIM, BLOCK_N] here) were made once and carried through every loop. Same loads, same
    # results, fewer registers (tools/triton_compile_check.py measures them). With TMA, descriptors replace
    # the pointers: the copy engine forms the addresses and zero-fills the rows past S.
    q_src = _rows(Q, b * stride_qb + h * stride_qh, S, stride_qs, BLOCK_M, HEAD_DIM, TMA)
    k_src, v_src = _row_sources(K, V, b * stride_kb + h * stride_kh, b * stride_vb + h * stride_vh, S, stride_ks,
                                stride_vs, BLOCK_N, HEAD_DIM, TMA)
    q = _load_rows(q_src, m0, offs_m, offs_d, S, stride_qs, TMA).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Key 0 is visible to every query, so each row has a finite maximum after the first tile.
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, 0, full_end, offs_m, offs_n, offs_d, prefix, S,
                               stride_ks, stride_vs, qk_scale, CAUSAL, False, BLOCK_N, DOT_DTYPE, DOT_PRECISION,
                               TMA)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, full_end, hi, offs_m, offs_n, offs_d, prefix, S,
                               stride_ks, stride_vs, qk_scale, CAUSAL, True, BLOCK_N, DOT_DTYPE, DOT_PRECISION,
                               TMA)

    out = _round(acc / l_i[:, None], O.dtype.element_ty, DOT_DTYPE)
    o_dst = _rows(O, b * stride_ob + h * stride_oh, S, stride_os, BLOCK_M, HEAD_DIM, TMA)
    _store_rows(o_dst, out, m0, offs_m, offs_d, S, stride_os, TMA)
    lse2 = m_i + tl.math.log2(l_i)  # log2 of the softmax denominator, log2(e) * LSE
    tl.store(LSE + pid_bh * S + offs_m, lse2, mask=offs_m < S)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_lens: torch.Tensor | None, *,
                      causal: bool, scale: float, mask_every_tile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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
    tma = use_tma(q)
    q, k, v = prepare_inputs(q, k, v, tma=tma)
    batch, heads, seq, head_dim = q.shape
    out = new_output((batch, heads, seq, head_dim), dtype=q.dtype, device=q.device)
    lse = new_output((batch, heads, seq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    prefix, has_prefix = prefix_arg(prefix_lens, causal, q)

    def grid(meta):
        return (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)

    with device_guard(q), tma_scratch(tma, q.device):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, prefix, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            heads, seq, scale * LOG2E, HEAD_DIM=head_dim, CAUSAL=causal, HAS_PREFIX=has_prefix,
            ALL_MASKED=mask_every_tile, TMA=tma, **dot_args(q.dtype))
    return out, lse
