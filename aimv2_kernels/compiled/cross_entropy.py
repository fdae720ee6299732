"""Backends ``"cpu"`` and ``"cuda"`` of ``cross_entropy``: the compiled row kernel
(``torch.ops.aimv2.cross_entropy_rows_*``, C++ on CPU tensors, CUDA on CUDA tensors) as the custom op
``aimv2::compiled_cross_entropy``."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated function.
from typing import Optional

import torch

from .._cross_entropy_op import define_cross_entropy_ops, flat_cross_entropy
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


# lse in float64: see ce_rows.
# ce_rows is the shared row-kernel interface (aimv2_kernels._cross_entropy_op.RowKernel) as it is.
cross_entropy_op, cross_entropy_backward_op = define_cross_entropy_ops(
    "compiled_cross_entropy", ce_rows, torch.float64, device_types=DEVICE_TYPES)


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
    return flat_cross_entropy(cross_entropy_op, logits, targets, ignore_index, label_smoothing, z_loss, reduction)
