"""Backends ``"cpu"`` and ``"cuda"`` of ``patch_mse_loss``: the compiled fused kernel (C++ on CPU tensors, CUDA on CUDA
tensors) as the custom ops ``aimv2::patch_mse_rows(_backward)``."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated function.
from typing import Optional

import torch

from .._alloc import new_output
from .._patch_rows_op import define_patch_rows_ops
from . import DEVICE_TYPES, require_extension


def _launch(pred: torch.Tensor, images: torch.Tensor, patch_size: int, prefix_lens: Optional[torch.Tensor],
            target_offset: int, eps: float, grad_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run ``torch.ops.aimv2.patch_mse_rows_out`` on fresh outputs (no autograd).

    Without ``grad_rows``: returns ``rows``, fp32 ``(B, L)``, ``mean_P (pred - target)^2`` (0 where not
    counted). With ``grad_rows`` (floating ``(B, L)``): returns ``grad_rows[..., None] * d rows / d pred``,
    pred's shape and dtype (0 where not counted), from a pass that recomputes the target.
    """
    require_extension()
    batch, length, _ = pred.shape
    if grad_rows is None:
        out = new_output((batch, length), dtype=torch.float32, device=pred.device)
        torch.ops.aimv2.patch_mse_rows_out(pred, images, patch_size, prefix_lens, target_offset, eps, None,
                                           out, None)
    else:
        out = new_output(pred.shape, dtype=pred.dtype, device=pred.device)
        torch.ops.aimv2.patch_mse_rows_out(pred, images, patch_size, prefix_lens, target_offset, eps, grad_rows,
                                           None, out)
    return out


patch_mse_rows_op, patch_mse_rows_backward_op = define_patch_rows_ops("patch_mse_rows", _launch,
                                                                  device_types=DEVICE_TYPES)


def patch_mse_rows(pred: torch.Tensor, images: torch.Tensor, patch_size: int,
                   prefix_lens: Optional[torch.Tensor], target_offset: int, eps: float) -> torch.Tensor:
    """Per-row normalized-pixel MSE with the compiled kernel, differentiable w.r.t. ``pred``.

    Args:
        pred: ``(B, L, P)`` fp32/bf16/fp16 CPU or CUDA tensor, ``L = N - target_offset``, ``P = C * p * p``.
        images: ``(B, C, H, W)``, same dtype; H and W multiples of ``patch_size``.
        patch_size: p.
        prefix_lens: None or an integer ``(B,)`` tensor; row l counts iff ``l + target_offset >= prefix_lens[b]``.
        target_offset: row l is compared with patch ``l + target_offset``.
        eps: added to the unbiased variance inside the sqrt.

    Returns:
        fp32 ``(B, L)``: ``mean_P (pred - target)^2`` per row, 0 where the row is not counted. Arguments are
        checked by :func:`aimv2_kernels.patch_mse_loss` (and again, by shape and dtype, in the C++ entry).
        The backward pass recomputes the target and writes the gradient of ``pred`` (its dtype) in one pass.
    """
    return patch_mse_rows_op(pred, images, patch_size, prefix_lens, target_offset, eps)
