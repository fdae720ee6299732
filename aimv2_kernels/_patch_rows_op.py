"""The custom-op pair every compiled backend of ``patch_mse_loss`` registers around its launcher."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the ops' schemas from the
# annotations of the decorated functions.
from typing import Callable, Optional, Tuple

import torch

# launch(pred, images, patch_size, prefix_lens, target_offset, eps, grad_rows=None) -> Tensor: without
# grad_rows, fp32 (B, L) rows; with grad_rows, grad_rows[..., None] * d rows / d pred in pred's dtype.
Launcher = Callable[..., torch.Tensor]


def define_patch_rows_ops(name: str, launch: Launcher, device_types: Optional[str] = None,
                          ) -> Tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    """Register ``aimv2::<name>`` (per-row loss) and ``aimv2::<name>_backward`` with fake and autograd.

    Returns ``(rows_op, backward_op)``. ``rows_op(pred, images, patch_size, prefix_lens, target_offset, eps)``
    gives the fp32 ``(B, L)`` per-row loss, 0 where a row is not counted, differentiable w.r.t. ``pred`` (not
    ``images``).

    NOTE: the backward recomputes the target and writes the gradient in one pass instead of the forward saving
    d rows / d pred for the backward to scale. A gradient saved in bf16/fp16 and scaled afterwards is rounded
    twice: on the CPU kernel its bf16 error reached 4.2x the reference's against float64 (budget 3x), and on the
    Triton kernel (interpreter, 40 seeds x 3 shapes x "mean"/"none") it exceeded 3x in 7 of 240 bf16 cases
    (worst 3.7x) and 1 of 240 fp16 cases; rounding once stayed at 1.0x. Both wirings move the same bytes:
    (pred + images) + (pred + images + grad) here, against (pred + images + grad) + (grad read + grad write).
    """

    @torch.library.custom_op(f"aimv2::{name}", mutates_args=(), device_types=device_types)
    def rows_op(pred: torch.Tensor, images: torch.Tensor, patch_size: int, prefix_lens: Optional[torch.Tensor],
                target_offset: int, eps: float) -> torch.Tensor:
        return launch(pred, images, patch_size, prefix_lens, target_offset, eps)

    @torch.library.custom_op(f"aimv2::{name}_backward", mutates_args=(), device_types=device_types)
    def backward_op(grad_rows: torch.Tensor, pred: torch.Tensor, images: torch.Tensor, patch_size: int,
                    prefix_lens: Optional[torch.Tensor], target_offset: int, eps: float) -> torch.Tensor:
        return launch(pred, images, patch_size, prefix_lens, target_offset, eps, grad_rows)

    @rows_op.register_fake
    def _(pred, images, patch_size, prefix_lens, target_offset, eps):
        return pred.new_empty(pred.shape[:2], dtype=torch.float32)

    @backward_op.register_fake
    def _(grad_rows, pred, images, patch_size, prefix_lens, target_offset, eps):
        return pred.new_empty(pred.shape)

    def setup_context(ctx, inputs, output):
        pred, images, patch_size, prefix_lens, target_offset, eps = inputs
        ctx.save_for_backward(pred, images, prefix_lens)
        ctx.args = (patch_size, target_offset, eps)

    def backward(ctx, grad_rows):
        pred, images, prefix_lens = ctx.saved_tensors
        patch_size, target_offset, eps = ctx.args
        grad_pred = backward_op(grad_rows, pred, images, patch_size, prefix_lens, target_offset, eps)
        return grad_pred, None, None, None, None, None

    rows_op.register_autograd(backward, setup_context=setup_context)
    return rows_op, backward_op
