"""Triton linear cross-entropy: logits in token chunks, the fused CE kernel in place, gradients in the forward."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated function.
from typing import Optional, Tuple

import torch

from .._alloc import new_output
from .._cross_entropy_op import mean_scale, reduce_rows, scale_saved_gradient
from .cross_entropy import ce_rows

# Logits elements per chunk. A chunk's ``(rows, V)`` logits buffer, in the input dtype, is the only V-sized
# temporary (2**26 elements: 128 MiB in bf16; at V = 32000, 2097 tokens per chunk).
CHUNK_ELEMENTS = 1 << 26


def chunk_rows(n_tokens: int, vocab: int, chunk_size: Optional[int] = None) -> int:
    """Tokens per chunk: ``chunk_size``, else ``CHUNK_ELEMENTS // vocab``; clipped to ``[1, n_tokens]``."""
    rows = chunk_size if chunk_size is not None else CHUNK_ELEMENTS // vocab
    return max(1, min(n_tokens, rows))


def run_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
               ignore_index: int, label_smoothing: float, z_loss: float, chunk: int,
               needs: Tuple[bool, bool, bool], *, loss_rows: Optional[torch.Tensor] = None,
               lse: Optional[torch.Tensor] = None, lse_given: bool = False,
               scale: Optional[torch.Tensor] = None, row_scale: Optional[torch.Tensor] = None):
    """For each chunk of ``chunk`` tokens: logits = hidden @ weight.T (+ bias) in the input dtype (as
    ``F.linear`` rounds them); the CE kernel writes the loss rows / lse and overwrites the logits with their
    gradient; the gradient matmuls accumulate the parameter gradients (no autograd).

    Args:
        hidden: ``(N, D)``; weight: ``(V, D)``; bias: None or ``(V,)``, one dtype (fp32/bf16/fp16).
        targets: ``(N,)`` contiguous integers.
        needs: which of (grad_hidden, grad_weight, grad_bias) to compute.
        loss_rows, lse, lse_given, scale, row_scale: as in :func:`..cross_entropy.ce_rows`, ``(N,)`` buffers.

    Returns:
        ``(grad_hidden, grad_weight, grad_bias)``: ``(N, D)`` in the input dtype, ``(V, D)`` and ``(V,)`` in
        fp32 (accumulated over chunks in fp32); an empty ``(0,)`` tensor for each one not computed.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    need_h, need_w, need_b = needs
    grad_hidden = new_output((n, d) if need_h else (0,), dtype=dtype, device=dev)
    grad_weight = torch.zeros((v, d) if need_w else (0,), dtype=torch.float32, device=dev)
    grad_bias = torch.zeros((v,) if need_b else (0,), dtype=torch.float32, device=dev)
    buf = new_output((min(chunk, n), v), dtype=dtype, device=dev)
    partial = new_output((v, d), dtype=dtype, device=dev) if need_w and dtype != torch.float32 else None
    weight_t = weight.t()
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h, logits = hidden[start:end], buf[: end - start]
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        ce_rows(logits, targets[start:end], ignore_index=ignore_index, label_smoothing=label_smoothing,
                z_loss=z_loss, loss_rows=None if loss_rows is None else loss_rows[start:end],
                lse=None if lse is None else lse[start:end], lse_given=lse_given,
                grad=logits if any(needs) else None, scale=scale,
                row_scale=None if row_scale is None else row_scale[start:end])
        if need_h:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_w:
            if partial is None:
                grad_weight.addmm_(logits.t(), h)
            else:  # one rounding of this chunk's part, then an fp32 sum over chunks
                grad_weight.add_(torch.mm(logits.t(), h, out=partial))
        if need_b:
            grad_bias.add_(logits.sum(0, dtype=torch.float32))
    return grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("aimv2::triton_linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, reduction: str,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool, chunk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, d loss/d hidden, d loss/d weight (fp32), d loss/d bias (fp32))`` for ``(N, D)`` hidden.

    The gradients asked for by the three flags are computed in this pass ("mean"/"sum" only: a "none" loss
    has per-token upstream gradients, so its backward recomputes the chunks with the saved fp32 ``(N,)``
    lse); the others are empty ``(0,)`` tensors. Differentiable w.r.t. hidden, weight and bias.
    """
    n = hidden.shape[0]
    targets = targets.contiguous()
    rows = new_output((n,), dtype=torch.float32, device=hidden.device)
    lse = new_output((n,), dtype=torch.float32, device=hidden.device)
    count, inv_count = mean_scale(targets, ignore_index) if reduction == "mean" else (None, None)
    needs = (grad_hidden, grad_weight, grad_bias and bias is not None)
    if reduction == "none" and any(needs):
        raise ValueError("reduction='none' computes its gradients in the backward pass")
    grads = run_chunks(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, chunk, needs,
                       loss_rows=rows, lse=lse, scale=inv_count)
    return (reduce_rows(rows, reduction, count), lse) + grads


@torch.library.custom_op("aimv2::triton_linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    bias: Optional[torch.Tensor], lse: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool, chunk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a "none" loss for a per-token ``(N,)`` ``grad_loss``, recomputing the logits chunk by
    chunk (the saved ``lse`` skips the kernel's first pass). Each in its input's dtype, ``(0,)`` if not asked."""
    gh, gw, gb = run_chunks(hidden, weight, targets.contiguous(), bias, ignore_index, label_smoothing, z_loss,
                            chunk, (grad_hidden, grad_weight, grad_bias and bias is not None),
                            lse=lse.contiguous(), lse_given=True, row_scale=grad_loss.float())
    return gh, gw.to(weight.dtype), gb.to(weight.dtype)


def _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias, param_dtype):
    return (hidden.new_empty(hidden.shape if grad_hidden else (0,)),
            weight.new_empty(weight.shape if grad_weight else (0,), dtype=param_dtype),
            weight.new_empty(weight.shape[:1] if grad_bias and bias is not None else (0,), dtype=param_dtype))


@linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, grad_hidden, grad_weight,
      grad_bias, chunk):
    lse = hidden.new_empty(hidden.shape[:1], dtype=torch.float32)
    loss = lse.new_empty(hidden.shape[:1] if reduction == "none" else ())
    return (loss, lse) + _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias, torch.float32)


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, targets, bias, lse, ignore_index, label_smoothing, z_loss, grad_hidden,
      grad_weight, grad_bias, chunk):
    return _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias, weight.dtype)


# NOTE: for "mean"/"sum" the forward computes the gradients (no second logits matmul) and the backward scales
# them once in fp32. Measured on the CPU interpreter with a random grad_output (25 seeds, 7 tokens in chunks
# of 3 and 33 in chunks of 10): bf16 grad_hidden 2.4x and grad_weight 2.9x the reference's error against
# float64 at worst (budget 3x), from rounding the saved grad_hidden and each chunk's grad_weight part once
# more. "none" recomputes instead: its per-token grad_output must be folded into the logits gradient.
def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, *flags, chunk = inputs
    ctx.dtype, ctx.reduction, ctx.computed = hidden.dtype, reduction, tuple(flags)
    ctx.options = (ignore_index, label_smoothing, z_loss)
    ctx.chunk = chunk
    if reduction == "none":  # recompute in backward: keep the inputs and the lse
        ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    else:  # the gradients are already computed: keep them
        ctx.save_for_backward(*output[2:])
    ctx.mark_non_differentiable(*output[1:])
    # Outputs 1: (the lse and the gradients) never get a gradient; without this, autograd would hand the
    # backward zero-filled tensors of their shapes, among them a (V, D) fp32 one, on every step.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    needs = tuple(ctx.needs_input_grad[i] for i in (0, 1, 3))
    if ctx.reduction == "none":
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        grads = linear_cross_entropy_backward_op(grad_loss, hidden, weight, targets, bias, lse, *ctx.options,
                                                 *needs, ctx.chunk)
    else:
        if any(need and not done for need, done in zip(needs, ctx.computed)):
            raise RuntimeError("aimv2::triton_linear_cross_entropy: a gradient was needed but not computed in the "
                               "forward (pass grad_hidden/grad_weight/grad_bias=True)")
        g = grad_loss.float().reshape(1)  # rank 1, so that the product is computed in fp32
        grads = [scale_saved_gradient(x, g, ctx.dtype) if need else None
                 for x, need in zip(ctx.saved_tensors, needs)]
    gh, gw, gb = (x if need else None for x, need in zip(grads, needs))
    return gh, gw, None, gb, None, None, None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                                chunk_size: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without the full logits: the ``"triton"`` backend of
    :func:`aimv2_kernels.linear_cross_entropy`.

    Args:
        hidden: ``(..., D)`` fp32/bf16/fp16, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        weight: ``(V, D)``; bias: None or ``(V,)``; hidden's dtype and device.
        targets: ``(...)`` integers of any dtype, in ``[0, V)`` or equal to ``ignore_index``.
        label_smoothing, z_loss, reduction: see :func:`aimv2_kernels.cross_entropy`.
        chunk_size: tokens per chunk (default ``CHUNK_ELEMENTS // V``).

    Returns:
        fp32 loss: ``()`` for "mean"/"sum", ``targets.shape`` for "none" (0 where ignored).

    Memory: one ``(chunk, V)`` logits buffer in the input dtype (overwritten in place by its gradient), a
    ``(V, D)`` chunk product and the gradients (fp32 accumulators for weight and bias). For "mean"/"sum" the
    gradients are computed in the forward and the backward only scales them by ``grad_output``; for "none"
    the backward recomputes the chunks (one more logits matmul) with ``grad_output`` per token.
    """
    d, v = hidden.shape[-1], weight.shape[0]
    flat = hidden.reshape(-1, d)
    want = reduction != "none" and torch.is_grad_enabled()
    needs = [want and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    loss = linear_cross_entropy_op(flat, weight, targets.reshape(-1), bias, ignore_index, float(label_smoothing),
                                   float(z_loss), reduction, *needs, chunk_rows(flat.shape[0], v, chunk_size))[0]
    return loss.reshape(targets.shape) if reduction == "none" else loss
