"""What the kernel backends of ``linear_cross_entropy`` share: the chunk loop, the custom-op pair and its autograd.

A backend supplies only its row kernel (a :data:`RowKernel`: loss rows, log-sum-exp and the logits gradient of
``(rows, V)`` logits, in place) and its chunk size; :func:`define_linear_cross_entropy_ops` registers
``aimv2::<name>`` and ``aimv2::<name>_backward`` around it.

Gradient policy (one for every backend, measured: see the note above :func:`define_linear_cross_entropy_ops`):
fp32 inputs with reduction "mean" or "sum" get their gradients in the forward pass, from the logits the loss
already built, and the backward only scales them by ``grad_output`` (fp32 rounding is far below the budget).
Every other case (bf16/fp16 inputs, reduction "none") keeps the inputs and the ``(N,)`` log-sum-exp and
recomputes the logits chunk by chunk in the backward, with ``grad_output`` (and ``1/count`` for "mean") folded
into the logits gradient before its one rounding, as autograd through the reference rounds it; the weight and
bias gradients are summed in fp32 over all chunks and rounded once.
"""
# No ``from __future__ import annotations``: torch.library.custom_op infers the ops' schemas from the
# annotations of the decorated functions.
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ._alloc import new_output
from ._cross_entropy_op import RowKernel, grad_scale, mean_scale, reduce_rows, scale_saved_gradient


def chunk_rows(n_tokens: int, vocab: int, elements: int, chunk_size: Optional[int] = None) -> int:
    """Tokens per chunk: ``chunk_size``, else ``elements // vocab`` (a ``(rows, V)`` buffer of ``elements``);
    clipped to ``[1, n_tokens]``."""
    rows = chunk_size if chunk_size is not None else elements // vocab
    return max(1, min(n_tokens, rows))


def run_chunks(rows: RowKernel, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               bias: Optional[torch.Tensor], ignore_index: int, label_smoothing: float, z_loss: float, chunk: int,
               needs: Tuple[bool, bool, bool], *, loss_rows: Optional[torch.Tensor] = None,
               lse: Optional[torch.Tensor] = None, saved_lse: Optional[torch.Tensor] = None,
               scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each chunk of ``chunk`` tokens: logits = hidden @ weight.T (+ bias) in the input dtype (as
    ``F.linear`` rounds them); ``rows`` writes the loss rows / lse and overwrites the logits with their gradient;
    the gradient matmuls accumulate the parameter gradients (no autograd).

    Args:
        rows: the backend's row kernel (:data:`RowKernel`).
        hidden: ``(N, D)``; weight: ``(V, D)``; bias: None or ``(V,)``; one dtype (fp32/bf16/fp16) and device.
        targets: ``(N,)`` contiguous integers.
        needs: which of (grad_hidden, grad_weight, grad_bias) to compute.
        loss_rows, lse, saved_lse: ``(N,)`` buffers, as in :data:`RowKernel`.
        scale: None, a ``(1,)`` or an ``(N,)`` fp32 factor of each token's gradient.

    Returns:
        ``(grad_hidden, grad_weight, grad_bias)``: ``(N, D)`` in the input dtype, ``(V, D)`` and ``(V,)`` in
        fp32 (summed over chunks in fp32); an empty ``(0,)`` tensor for each one not computed.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    need_h, need_w, need_b = needs
    grad_hidden = new_output((n, d) if need_h else (0,), dtype=dtype, device=dev)
    grad_weight = torch.zeros((v, d) if need_w else (0,), dtype=torch.float32, device=dev)
    grad_bias = torch.zeros((v,) if need_b else (0,), dtype=torch.float32, device=dev)
    buf = new_output((min(chunk, n), v), dtype=dtype, device=dev)
    per_row = scale is not None and scale.numel() > 1
    weight_t = weight.t()

    def piece(x, start, end):
        return None if x is None else x[start:end]

    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h, logits = hidden[start:end], buf[: end - start]
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        rows(logits, targets[start:end], ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
             loss_rows=piece(loss_rows, start, end), lse=piece(lse, start, end),
             saved_lse=piece(saved_lse, start, end), grad=logits if any(needs) else None,
             scale=piece(scale, start, end) if per_row else scale)
        if need_h:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_w or need_b:
            # bf16/fp16: the chunk's gradient in fp32 (a (chunk, V) temporary), so that grad_weight is summed in
            # fp32 over all tokens and rounded once at the end, as the reference's single matmul rounds it.
            g = logits if dtype == torch.float32 else logits.float()
            if need_w:
                grad_weight.addmm_(g.t(), h if dtype == torch.float32 else h.float())
            if need_b:
                grad_bias.add_(g.sum(0))
    return grad_hidden, grad_weight, grad_bias


def _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias, param_dtype):
    return (hidden.new_empty(hidden.shape if grad_hidden else (0,)),
            weight.new_empty(weight.shape if grad_weight else (0,), dtype=param_dtype),
            weight.new_empty(weight.shape[:1] if grad_bias and bias is not None else (0,), dtype=param_dtype))


# NOTE: the policy of the module docstring, measured on this CPU with a random grad_output (25 seeds, 33 tokens in
# chunks of 10 and 7 in chunks of 3, bias, label smoothing and z-loss), worst gradient error over the reference's
# error against float64, budget 3x:
#   save the low-precision gradients in the forward, scale them in the backward (two roundings):
#     C++ row kernel: bf16 grad_hidden 3.8x, grad_bias 3.5x (over budget);
#     Triton row kernel (grad_weight rounded per chunk): bf16 grad_hidden 2.4x, grad_weight 2.9x;
#   recompute in the backward with grad_output folded in, fp32 sums over chunks: every bf16/fp16 gradient 1.00x,
#     with either row kernel (this shared wiring, 2026-12-02, reductions mean, sum and none).
# The price of the recompute (counted, not timed: no GPU has run it) is one more (chunk, V) logits matmul per chunk
# for low-precision inputs (four matmuls of the logits' size instead of three) and a (chunk, V) fp32 copy of
# each chunk's gradient; fp32 needs neither, so it keeps the forward-pass gradients.
def define_linear_cross_entropy_ops(name: str, rows: RowKernel, lse_dtype: torch.dtype,
                                    device_types: Union[str, Sequence[str], None] = None,
                                    ) -> Tuple[torch.library.CustomOpDef, torch.library.CustomOpDef,
                                               Callable[..., torch.Tensor]]:
    """Register ``aimv2::<name>`` and ``aimv2::<name>_backward`` (with fake implementations and autograd) over the
    row kernel ``rows``, whose log-sum-exp comes in ``lse_dtype``. Returns ``(op, backward_op, apply)``, where
    ``apply(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, chunk)`` is the
    differentiable loss (fp32; ``()`` or ``targets.shape`` for "none") for ``(..., D)`` hidden."""

    @torch.library.custom_op(f"aimv2::{name}", mutates_args=(), device_types=device_types)
    def op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
           ignore_index: int, label_smoothing: float, z_loss: float, reduction: str,
           grad_hidden: bool, grad_weight: bool, grad_bias: bool, chunk: int,
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, lse, d loss/d hidden, d loss/d weight (fp32), d loss/d bias (fp32))`` for ``(N, D)`` hidden.

        The gradients asked for by the three flags are computed in this pass ("mean"/"sum" only: a "none" loss
        has per-token upstream gradients); the others are empty ``(0,)`` tensors. With no flag set, the backward
        recomputes the chunks with the saved ``(N,)`` lse. Differentiable w.r.t. hidden, weight and bias.
        """
        n = hidden.shape[0]
        targets = targets.contiguous()
        loss_rows = new_output((n,), dtype=torch.float32, device=hidden.device)
        lse = new_output((n,), dtype=lse_dtype, device=hidden.device)
        count, inv_count = mean_scale(targets, ignore_index) if reduction == "mean" else (None, None)
        needs = (grad_hidden, grad_weight, grad_bias and bias is not None)
        if reduction == "none" and any(needs):
            raise ValueError("reduction='none' computes its gradients in the backward pass")
        grads = run_chunks(rows, hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, chunk, needs,
                           loss_rows=loss_rows, lse=lse, scale=inv_count)
        return (reduce_rows(loss_rows, reduction, count), lse) + grads

    @torch.library.custom_op(f"aimv2::{name}_backward", mutates_args=(), device_types=device_types)
    def backward_op(grad_scale: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: Optional[torch.Tensor], lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                    z_loss: float, grad_hidden: bool, grad_weight: bool, grad_bias: bool, chunk: int,
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of the per-token losses weighted by ``grad_scale`` (fp32, ``(1,)`` or ``(N,)``: the loss's
        gradient, divided by the count for "mean"), recomputing the logits chunk by chunk (the saved ``lse``
        skips the kernel's lse pass). Each in its input's dtype, ``(0,)`` if not asked."""
        gh, gw, gb = run_chunks(rows, hidden, weight, targets.contiguous(), bias, ignore_index, label_smoothing,
                                z_loss, chunk, (grad_hidden, grad_weight, grad_bias and bias is not None),
                                saved_lse=lse.contiguous(), scale=grad_scale.contiguous())
        return gh, gw.to(weight.dtype), gb.to(weight.dtype)

    @op.register_fake
    def _(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, grad_hidden,
          grad_weight, grad_bias, chunk):
        lse = hidden.new_empty(hidden.shape[:1], dtype=lse_dtype)
        loss = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), dtype=torch.float32)
        return (loss, lse) + _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias, torch.float32)

    @backward_op.register_fake
    def _(grad_scale, hidden, weight, targets, bias, lse, ignore_index, label_smoothing, z_loss, grad_hidden,
          grad_weight, grad_bias, chunk):
        return _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias, weight.dtype)

    def setup_context(ctx, inputs, output):
        hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, *flags, chunk = inputs
        ctx.dtype, ctx.reduction, ctx.flags = hidden.dtype, reduction, tuple(flags)
        ctx.computed = any(flags)
        ctx.options = (ignore_index, label_smoothing, z_loss)
        ctx.chunk = chunk
        if ctx.computed:  # the gradients are already computed: keep them
            ctx.save_for_backward(*output[2:])
        else:  # recompute in backward: keep the inputs and the lse
            ctx.save_for_backward(hidden, weight, targets, bias, output[1])
        ctx.mark_non_differentiable(*output[1:])
        # Outputs 1: (the lse and the gradients) never get a gradient; without this, autograd would hand the
        # backward zero-filled tensors of their shapes, among them a (V, D) fp32 one, on every step.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, *_unused):
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 1, 3))
        if not ctx.computed:
            hidden, weight, targets, bias, lse = ctx.saved_tensors
            scale = grad_scale(grad_loss, ctx.reduction, targets, ctx.options[0])
            grads = backward_op(scale, hidden, weight, targets, bias, lse, *ctx.options, *needs, ctx.chunk)
        else:
            if any(need and not done for need, done in zip(needs, ctx.flags)):
                raise RuntimeError(f"aimv2::{name}: a gradient was needed but not computed in the forward (pass "
                                   "grad_hidden/grad_weight/grad_bias=True)")
            g = grad_loss.float().reshape(1)  # rank 1, so that the product is computed in fp32
            grads = [scale_saved_gradient(x, g, ctx.dtype) if need else None
                     for x, need in zip(ctx.saved_tensors, needs)]
        gh, gw, gb = (x if need else None for x, need in zip(grads, needs))
        return gh, gw, None, gb, None, None, None, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)

    def apply(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
              ignore_index: int, label_smoothing: float, z_loss: float, reduction: str, chunk: int) -> torch.Tensor:
        """The loss through ``op``, with the gradients in the forward exactly when the policy says so."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        in_forward = reduction != "none" and hidden.dtype == torch.float32 and torch.is_grad_enabled()
        needs = [in_forward and x is not None and x.requires_grad for x in (hidden, weight, bias)]
        loss = op(flat, weight, targets.reshape(-1), bias, ignore_index, float(label_smoothing), float(z_loss),
                  reduction, *needs, chunk)[0]
        return loss.reshape(targets.shape) if reduction == "none" else loss

    return op, backward_op, apply
