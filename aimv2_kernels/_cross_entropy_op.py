"""What the kernel backends of ``cross_entropy`` share: the loss reduction helpers and the custom-op pair."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the ops' schemas from the
# annotations of the decorated functions.
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ._alloc import new_output


def mean_scale(targets: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(count, 1/count)`` on the device, fp32 ``(1,)``; count = non-ignored targets, at least 1 (no sync)."""
    targets = targets if targets.dtype == torch.int64 else targets.long()  # compare values as the kernels do
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
    return g / mean_scale(targets, ignore_index)[0] if reduction == "mean" else g


def scaled(x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * g`` computed in fp32 (``g``: an fp32 tensor of rank >= 1) and rounded once to ``dtype``."""
    return torch.mul(x, g, out=torch.empty(x.shape, dtype=dtype, device=x.device))


def scale_saved_gradient(x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`scaled` for a gradient the forward computed and saved, in the backward that uses it last.

    When ``x`` already has ``dtype`` and the autograd graph is not kept (no ``retain_graph``: the saved tensor is
    freed after this backward), ``x`` is scaled in place and returned, so that no second tensor of its size (the
    ``(V, D)`` weight gradient) is allocated. With the graph kept, or while traced (``torch.compile``, AOT
    tracing: ``x`` is then a tensor subclass, fake or functional), a new tensor.
    """
    if (x.dtype == dtype and type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._autograd._get_current_graph_task_keep_graph()):
        return x.mul_(g)
    return scaled(x, g, dtype)


# rows(logits, targets, *, ignore_index, label_smoothing, z_loss, loss_rows, lse, saved_lse, grad, scale) -> None: a
# backend's row kernel. For (n, V) logits and (n,) targets it writes the fp32 per-row losses into ``loss_rows`` (0
# where ignored) and the row logsumexp into ``lse`` (each None: not stored), or, given ``saved_lse`` (then both are
# None), skips that pass; with ``grad`` (``logits`` itself: in place) it writes d loss_r / d logits_r times
# ``scale`` (None, or fp32 ``(1,)`` or ``(n,)``), rounded once to the logits' dtype. Shared with
# :mod:`._linear_cross_entropy_op`.
RowKernel = Callable[..., None]


def define_cross_entropy_ops(name: str, rows: RowKernel, lse_dtype: torch.dtype,
                             device_types: Union[str, Sequence[str], None] = None,
                             ) -> Tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    """Register ``aimv2::<name>`` (``(loss, lse)`` of ``(N, V)`` logits and ``(N,)`` targets) and
    ``aimv2::<name>_backward`` with fake implementations and autograd over the backend's row kernel ``rows``
    (:data:`RowKernel`), whose log-sum-exp comes in ``lse_dtype``. Returns ``(op, backward_op)``.

    NOTE: the gradient is written by a second launch in the backward (from the saved lse, with grad_output and
    1/count folded into its one rounding), not saved by the forward and scaled afterwards. Measured on the CPU
    (Triton interpreter, 10 seeds, (7, 50) and (33, 1003) logits, random grad_output): saving then scaling gave
    bf16 / fp16 logits gradients 2.7x / 2.3x the reference's error against float64 (budget 3x); this gives 1.0x.
    It also holds no (N, V) gradient between the passes, for one more exp per element.
    """

    @torch.library.custom_op(f"aimv2::{name}", mutates_args=(), device_types=device_types)
    def op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
           reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss, lse)``: fp32 loss (``()``, or ``(N,)`` for "none") and the ``(N,)`` row logsumexp that the
        backward reuses. Differentiable w.r.t. ``logits``."""
        loss_rows = new_output(targets.shape, dtype=torch.float32, device=logits.device)
        lse = new_output(targets.shape, dtype=lse_dtype, device=logits.device)
        rows(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
             loss_rows=loss_rows, lse=lse, saved_lse=None, grad=None, scale=None)
        count = mean_scale(targets, ignore_index)[0] if reduction == "mean" else None
        return reduce_rows(loss_rows, reduction, count), lse

    @torch.library.custom_op(f"aimv2::{name}_backward", mutates_args=(), device_types=device_types)
    def backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    ignore_index: int, label_smoothing: float, z_loss: float, reduction: str) -> torch.Tensor:
        """d(loss)/d(logits) times ``grad_loss`` (``()``, or ``(N,)`` for "none"): logits' shape and dtype."""
        grad = new_output(logits.shape, dtype=logits.dtype, device=logits.device)
        rows(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
             loss_rows=None, lse=None, saved_lse=lse, grad=grad,
             scale=grad_scale(grad_loss, reduction, targets, ignore_index))
        return grad

    @op.register_fake
    def _(logits, targets, ignore_index, label_smoothing, z_loss, reduction):
        rows = logits.new_empty(targets.shape, dtype=torch.float32)
        return (rows if reduction == "none" else rows.new_empty(())), rows.new_empty(targets.shape, dtype=lse_dtype)

    @backward_op.register_fake
    def _(grad_loss, logits, targets, lse, ignore_index, label_smoothing, z_loss, reduction):
        return torch.empty_like(logits)

    def setup_context(ctx, inputs, output):
        logits, targets, *ctx.options = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_loss, _grad_lse):
        logits, targets, lse = ctx.saved_tensors
        grad = backward_op(grad_loss, logits, targets, lse, *ctx.options)
        return grad, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op, backward_op


def flat_cross_entropy(op: Callable[..., Tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor,
                       targets: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                       reduction: str) -> torch.Tensor:
    """Apply ``op`` (from :func:`define_cross_entropy_ops`) to ``(..., V)`` logits; "none" keeps targets' shape."""
    v = logits.shape[-1]
    loss, _ = op(logits.reshape(-1, v), targets.reshape(-1), ignore_index, float(label_smoothing), float(z_loss),
                 reduction)
    return loss.reshape(targets.shape) if reduction == "none" else loss
