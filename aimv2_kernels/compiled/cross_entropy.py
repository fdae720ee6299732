"""Backends ``"cpu"`` and ``"cuda"`` of ``cross_entropy``: the compiled row kernel (``torch.ops.aimv2.cross_entropy_rows_*``,
C++ on CPU tensors, CUDA on CUDA tensors) as the custom op ``aimv2::compiled_cross_entropy``."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated function.
from typing import Optional, Tuple

import torch

from .._alloc import new_output
from . import DEVICE_TYPES, require_extension


def ce_rows(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, label_smoothing: float,
            z_loss: float, loss_rows: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
            saved_lse: Optional[torch.Tensor] = None, grad: Optional[torch.Tensor] = None,
            scale: Optional[torch.Tensor] = None) -> None:
    """Run the C++ row kernel over ``(N, V)`` logits (no autograd); results go to the given buffers.

    Args:
        logits: ``(N, V)`` fp32/bf16/fp16 CPU or CUDA tensor (a non-unit column stride costs a copy).
        targets: ``(N,)`` integers of any dtype, in ``[0, V)`` or equal to ``ignore_index``.
        loss_rows, lse: None or contiguous ``(N,)`` tensors, fp32 and float64, receiving the per-row loss (0
            on ignored rows) and the row logsumexp (float64: the backward's exp(x - lse) needs it to better
            than fp32; see csrc/cross_entropy_cpu.cpp).
        saved_lse: None, or the ``(N,)`` lse of an earlier call: only the gradient is computed then, with one
            exp per element (``loss_rows`` and ``lse`` must be None).
        grad: None (no gradient), an ``(N, V)`` buffer of the logits' dtype, or ``logits`` itself to overwrite
            the logits with their gradient.
        scale: None (1), a one-element or an ``(N,)`` float tensor multiplying each row's gradient (fp32 math,
            one rounding to the logits' dtype).
    """
    require_extension()
    args = (targets, ignore_index, float(label_smoothing), float(z_loss), saved_lse, scale, loss_rows, lse)
    if grad is not None and grad is logits:
        torch.ops.aimv2.cross_entropy_rows_inplace(logits, *args)
    else:
        torch.ops.aimv2.cross_entropy_rows_out(logits, *args, grad)


def mean_scale(targets: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(count, 1/count)``, fp32 ``(1,)``; count = non-ignored targets, at least 1 (a tensor: no host read)."""
    targets = targets if targets.dtype == torch.int64 else targets.long()  # compare values as the kernel does
    count = (targets != ignore_index).sum().clamp_min(1).to(torch.float32).reshape(1)
    return count, count.reciprocal()


def reduce_rows(rows: torch.Tensor, reduction: str, count: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-row fp32 losses to the op's output: their sum divided by ``count`` ("mean"), sum, or themselves."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / count[0] if reduction == "mean" else total


def grad_scale(grad_loss: torch.Tensor, reduction: str, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The fp32 factor of each row's gradient, from the loss's gradient: ``(N,)`` for "none", else ``(1,)``."""
    if reduction == "none":
        return grad_loss.float()
    g = grad_loss.float().reshape(1)
    return g * mean_scale(targets, ignore_index)[1] if reduction == "mean" else g


@torch.library.custom_op("aimv2::compiled_cross_entropy", mutates_args=(), device_types=DEVICE_TYPES)
def cross_entropy_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                     z_loss: float, reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse)`` of ``(N, V)`` logits and ``(N,)`` targets: fp32 loss (``()``, or ``(N,)`` for "none")
    and the float64 ``(N,)`` row logsumexp that the backward reuses. Differentiable w.r.t. ``logits``."""
    rows = new_output(targets.shape, dtype=torch.float32, device=logits.device)
    lse = new_output(targets.shape, dtype=torch.float64, device=logits.device)
    ce_rows(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            loss_rows=rows, lse=lse)
    count = mean_scale(targets, ignore_index)[0] if reduction == "mean" else None
    return reduce_rows(rows, reduction, count), lse


@torch.library.custom_op("aimv2::compiled_cross_entropy_backward", mutates_args=(), device_types=DEVICE_TYPES)
def cross_entropy_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                              lse: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                              reduction: str) -> torch.Tensor:
    """d(loss)/d(logits) times ``grad_loss`` (``()``, or ``(N,)`` for "none"): logits' shape and dtype."""
    grad = new_output(logits.shape, dtype=logits.dtype, device=logits.device)
    ce_rows(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            saved_lse=lse, grad=grad, scale=grad_scale(grad_loss, reduction, targets, ignore_index))
    return grad


@cross_entropy_op.register_fake
def _(logits, targets, ignore_index, label_smoothing, z_loss, reduction):
    rows = logits.new_empty(targets.shape, dtype=torch.float32)
    return (rows if reduction == "none" else rows.new_empty(())), rows.new_empty(targets.shape, dtype=torch.float64)


@cross_entropy_backward_op.register_fake
def _(grad_loss, logits, targets, lse, ignore_index, label_smoothing, z_loss, reduction):
    return torch.empty_like(logits)


# NOTE: as in the Triton backend, the backward writes the gradient from the saved lse with grad_output (and
# 1/count) folded into its one rounding, instead of the forward saving d(loss)/d(logits) for the backward to
# scale: a bf16/fp16 gradient saved and then scaled is rounded twice (2.7x / 2.3x the reference's error against
# float64 in the Triton measurements, budget 3x; this stays at the reference's error). It also keeps no (N, V)
# gradient alive between the passes, and costs one exp per element in the backward.
def _setup_context(ctx, inputs, output):
    logits, targets, *ctx.options = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    grad = cross_entropy_backward_op(grad_loss, logits, targets, lse, *ctx.options)
    return grad, None, None, None, None, None


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy_compiled(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                           label_smoothing: float = 0.0, z_loss: float = 0.0,
                           reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy with the compiled row kernel: the ``"cpu"`` and ``"cuda"`` backends of
    :func:`aimv2_kernels.cross_entropy` (the kernel follows the tensors' device).

    Args:
        logits: ``(..., V)`` fp32/bf16/fp16 CPU or CUDA tensor.
        targets: ``(...)`` integers of any dtype, in ``[0, V)`` or equal to ``ignore_index`` (which may lie
            outside ``[0, V)``).
        label_smoothing, z_loss, reduction: see :func:`aimv2_kernels.cross_entropy`.

    Returns:
        fp32 loss: ``()`` for "mean"/"sum", ``targets.shape`` for "none" (0 where ignored). The forward reads
        the logits once per row (loss and lse); the backward reads them once more with the saved lse and
        writes the gradient, already multiplied by ``grad_output`` (and 1/count for "mean"), rounded once.
    """
    v = logits.shape[-1]
    loss, _ = cross_entropy_op(logits.reshape(-1, v), targets.reshape(-1), ignore_index, float(label_smoothing),
                               float(z_loss), reduction)
    return loss.reshape(targets.shape) if reduction == "none" else loss
