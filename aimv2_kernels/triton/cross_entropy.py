"""Triton softmax cross-entropy: one kernel computes lse, the loss and d(logits) per row; the custom op on top."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated function.
from typing import Optional

import torch
import triton
import triton.language as tl

from .._cross_entropy_op import define_cross_entropy_ops, flat_cross_entropy
from .tuning import tuned


def _configs():
    """``(BLOCK_V, num_warps)`` on a GPU, expected best first for AIMv2's V = 32000 on an H100/H200 (not
    benchmarked here): 8 to 32 elements per thread (whole 16-byte loads), fewest loop trips first; then the
    small blocks that short rows need. Under the interpreter the autotuner gets ``_INTERPRET_CONFIGS`` instead.

    7 of the former 18 (BLOCK_V 256 to 8192, each with 4, 8 and 16 warps), so that autotuning and the compile
    check (tools/triton_compile_check.py: 32 specializations, two targets) stay short. Dropped: 2 or 4 elements
    per thread on wide blocks (1024 with 8 or 16 warps, 2048 with 16), 64 per thread (8192 with 4 warps, the most
    registers), repeats of a kept per-thread count ((2048, 8), (4096, 4), (4096, 16)), and 8 or 16 warps on the
    256 and 512 blocks. None of the 18 spilled: at most 128 registers (Triton 3.6) / 124 (3.9), at BLOCK_V=8192
    with 4 warps in fp32 with every pass on.
    """
    return [triton.Config({"BLOCK_V": b}, num_warps=w)
            for b, w in ((4096, 8), (8192, 16), (2048, 4), (8192, 8), (1024, 4), (512, 4), (256, 4))]


_INTERPRET_CONFIGS = [triton.Config({"BLOCK_V": 256}, num_warps=4)]  # one small block: no autotuning, fast tests


def _prune(configs, named_args, **kwargs):
    """Keep blocks no wider than V (rounded up to a power of two), at most 32 blocks per row for wide rows
    (BLOCK_V >= 1024 once V > 16384), with 1 to 64 elements per thread.

    Shared memory never limits this kernel: it only holds the cross-warp reduction scratch (32 bytes at
    BLOCK_V=4096 with 8 warps, Triton 3.9 for sm_90). Registers do: ptxas reports no spills up to 64 elements
    per thread (see :func:`_configs`).
    """
    cap = max(triton.next_power_of_2(named_args["V"]), 256)
    kept = [c for c in configs if min(cap // 32, 1024) <= c.kwargs["BLOCK_V"] <= cap
            and 32 * c.num_warps <= c.kwargs["BLOCK_V"] <= 64 * 32 * c.num_warps]
    return kept or configs[:1]


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` to ``DTYPE``, rounding to nearest even. For bf16 the rounding is done on the bits, because
    Triton's interpreter truncates fp32 -> bf16 casts (GPUs round to nearest even; this matches them)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _ce_rows_kernel(
    logits_ptr, grad_ptr, loss_ptr, lse_ptr, targets_ptr, scale_ptr,
    V, stride_logits, stride_grad, stride_scale,
    ignore_index, label_smoothing, z_loss,
    LSE_MODE: tl.constexpr, STORE_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SCALE_MODE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row ``r`` of the ``(N, V)`` logits.

    Pass 1 (online max/sum over V in blocks, fp32): ``lse``, stored (LSE_MODE 1), or skipped and ``lse`` loaded
    (LSE_MODE 2). STORE_LOSS: the loss ``(1-eps)(lse - x_t) + eps(lse - mean x) + z lse^2``, 0 when
    ``t == ignore_index`` (needs pass 1).
    Pass 2 (COMPUTE_GRAD): ``grad[r] = (softmax (1 + 2 z lse) - (1-eps) onehot(t) - eps/V) * scale``, 0 on
    ignored rows, in grad's dtype; ``grad_ptr`` may equal ``logits_ptr`` (in place: each block is read before
    it is written). ``scale`` is 1 (SCALE_MODE 0), ``scale_ptr[0]`` (1) or ``scale_ptr[r * stride_scale]`` (2).
    """
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    counted = target != ignore_index
    # A counted target outside [0, V) (only possible with the value checks off) is never read: its row's loss
    # and gradient come out NaN instead of a silently wrong value.
    in_range = counted & (target >= 0) & (target < V)
    bad = counted & ~in_range
    x_row = logits_ptr + row * stride_logits
    cols = tl.arange(0, BLOCK_V)

    if LSE_MODE == 2:
        lse = tl.load(lse_ptr + row)
    else:
        m = float("-inf")
        s = 0.0
        sum_x = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))  # finite after the first block: it holds column 0
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = m + tl.log(s)
        if LSE_MODE == 1:
            tl.store(lse_ptr + row, lse)

    if STORE_LOSS:
        x_t = tl.load(x_row + target, mask=in_range, other=0.0).to(tl.float32)
        x_t = tl.where(bad, float("nan"), x_t)
        loss = lse - (1.0 - label_smoothing) * x_t
        if HAS_SMOOTHING:
            loss -= label_smoothing * (sum_x / V)
        loss += z_loss * lse * lse
        tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))

    if COMPUTE_GRAD:
        if SCALE_MODE == 0:
            scale = 1.0
        elif SCALE_MODE == 1:
            scale = tl.load(scale_ptr).to(tl.float32)
        else:
            scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        scale = tl.where(counted, scale, 0.0)
        scale = tl.where(bad, float("nan"), scale)
        p_coef = (1.0 + 2.0 * z_loss * lse) * scale
        t_coef = (1.0 - label_smoothing) * scale
        u_coef = (label_smoothing / V) * scale
        g_row = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * p_coef - u_coef - tl.where(offs == target, t_coef, 0.0)
            tl.store(g_row + offs, _round_to(g, grad_ptr.dtype.element_ty), mask=mask)


def _rule(configs, args, target):
    """The pruning rule (see .tuning): :func:`_prune`, the same on every target (no config spills)."""
    return _prune(configs, args)


_TUNE = dict(interpret_configs=_INTERPRET_CONFIGS, key=["V", "LSE_MODE", "STORE_LOSS", "COMPUTE_GRAD"])
_GPU_CONFIGS = _configs()
_ce_rows = tuned("ce_rows", _GPU_CONFIGS, _rule, **_TUNE)(_ce_rows_kernel)
# The in-place variant overwrites its input: autotuning must restore it after each timed run.
_ce_rows_inplace = tuned("ce_rows", _GPU_CONFIGS, _rule, **_TUNE, restore_value=["logits_ptr"])(_ce_rows_kernel)


def ce_rows(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, label_smoothing: float,
            z_loss: float, loss_rows: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
            lse_given: bool = False, grad: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
            row_scale: Optional[torch.Tensor] = None) -> None:
    """Launch :func:`_ce_rows_kernel` over the rows of ``logits`` (no autograd); results go to the given buffers.

    Args:
        logits: ``(N, V)`` fp32/bf16/fp16 with unit column stride.
        targets: ``(N,)`` integers of any dtype, contiguous.
        loss_rows: ``(N,)`` fp32, contiguous, receives the per-row loss (0 on ignored rows); None: not stored.
        lse: ``(N,)`` fp32, contiguous: receives each row's logsumexp, or with ``lse_given`` supplies it
            (then the lse pass is skipped and ``loss_rows`` must be None).
        grad: None (no gradient), ``(N, V)`` with unit column stride to receive d(loss_r)/d(logits_r) times
            the scale, or ``logits`` itself to overwrite the logits with their gradient.
        scale: None, or a one-element float tensor that multiplies every row's gradient.
        row_scale: None, or an ``(N,)`` float tensor (any stride) that multiplies row r's gradient.
    """
    n, v = logits.shape
    if lse_given and (lse is None or loss_rows is not None):
        raise ValueError("lse_given needs lse and no loss_rows")
    if n == 0:
        return
    scale_mode, scale_ptr, stride_scale = 0, logits, 0  # logits stands in for pointers left unused
    if scale is not None:
        scale_mode, scale_ptr = 1, scale
    elif row_scale is not None:
        scale_mode, scale_ptr, stride_scale = 2, row_scale, row_scale.stride(0)
    in_place = grad is not None and grad.data_ptr() == logits.data_ptr()
    launch = _ce_rows_inplace if in_place else _ce_rows
    launch[(n,)](
        logits, logits if grad is None else grad, logits if loss_rows is None else loss_rows,
        logits if lse is None else lse, targets, scale_ptr,
        v, logits.stride(0), 0 if grad is None else grad.stride(0), stride_scale,
        ignore_index, float(label_smoothing), float(z_loss),
        LSE_MODE=0 if lse is None else 2 if lse_given else 1, STORE_LOSS=loss_rows is not None,
        COMPUTE_GRAD=grad is not None, SCALE_MODE=scale_mode, HAS_SMOOTHING=label_smoothing != 0.0,
    )


def rows(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, label_smoothing: float, z_loss: float,
         loss_rows: Optional[torch.Tensor], lse: Optional[torch.Tensor], saved_lse: Optional[torch.Tensor],
         grad: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> None:
    """The shared row-kernel interface (``aimv2_kernels._cross_entropy_op.RowKernel``) on :func:`ce_rows`: fp32
    lse, a copy of logits with a non-unit column stride (not when the gradient overwrites them), contiguous
    targets, and a ``(1,)`` or per-row ``scale``."""
    if logits.stride(1) != 1 and grad is not logits:
        logits = logits.contiguous()
    per_row = scale is not None and scale.numel() > 1
    ce_rows(logits, targets.contiguous(), ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            loss_rows=loss_rows, lse=saved_lse if saved_lse is not None else lse, lse_given=saved_lse is not None,
            grad=grad, scale=None if per_row else scale, row_scale=scale if per_row else None)


cross_entropy_op, cross_entropy_backward_op = define_cross_entropy_ops("triton_cross_entropy", rows, torch.float32)


def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy in Triton: the ``"triton"`` backend of :func:`aimv2_kernels.cross_entropy`.

    Args:
        logits: ``(..., V)`` fp32/bf16/fp16, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        targets: ``(...)`` integers of any dtype, in ``[0, V)`` or equal to ``ignore_index`` (which may lie
            outside ``[0, V)``).
        label_smoothing, z_loss, reduction: see :func:`aimv2_kernels.cross_entropy`.

    Returns:
        fp32 loss: ``()`` for "mean"/"sum", ``targets.shape`` for "none" (0 where ignored). The forward reads
        the logits once (loss and row lse); the backward reads them once more with the saved lse and writes
        the gradient, already multiplied by ``grad_output`` (and 1/count for "mean"; count on the device).
        No host synchronisation.
    """
    return flat_cross_entropy(cross_entropy_op, logits, targets, ignore_index, label_smoothing, z_loss, reduction)
