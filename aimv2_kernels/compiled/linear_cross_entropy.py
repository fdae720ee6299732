"""Linear cross-entropy of the ``"cpu"`` and ``"cuda"`` backends: logits in token chunks (torch matmuls), the
compiled row kernel in place on each chunk, and for fp32 the gradients in the forward."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated function.
from typing import Optional, Tuple

import torch

from .._alloc import new_output
from . import DEVICE_TYPES
from .._cross_entropy_op import grad_scale, mean_scale, reduce_rows, scale_saved_gradient
from .cross_entropy import ce_rows

# Logits elements per chunk: the (rows, V) buffer, in the input dtype, is the only V-sized temporary. 2**24
# elements is 64 MiB in fp32: at V = 32000, 524 tokens per chunk.
# NOTE: bigger chunks are faster here. fp32 fwd+bwd at N=4096, D=512, V=32000 on the 2-core AMD EPYC build VM
# (MKL sgemm, 2 threads, while other jobs loaded it: medians of 5 interleaved rounds): 131 rows per chunk 21.4 s,
# 262 rows 17.6 s, 524 rows 15.3 s, the reference 18.5 s. At few rows, MKL runs each matmul less efficiently
# (on one thread, the three matmuls took 16.5 s in chunks of 64 rows, 11.2 s in chunks of 1024) and every chunk
# costs 4 parallel regions, which stall when another job holds a core. The peak memory does not grow with it
# up to about 550 rows: 141 MB at 131, 262 and 524 rows, set by the backward (saved and scaled fp32
# grad_weight; measured before the backward scaled it in place), against 1429 MB for the reference.
CHUNK_ELEMENTS = 1 << 24
# On a GPU, 2**26 elements (256 MiB in fp32, as the Triton backend): small against its memory, big enough that
# each chunk's matmuls fill the device. Not yet tuned on a GPU.
CUDA_CHUNK_ELEMENTS = 1 << 26


def chunk_rows(n_tokens: int, vocab: int, chunk_size: Optional[int] = None, device_type: str = "cpu") -> int:
    """Tokens per chunk: ``chunk_size``, else ``CHUNK_ELEMENTS // vocab`` (``CUDA_CHUNK_ELEMENTS`` on CUDA);
    clipped to ``[1, n_tokens]``."""
    elements = CUDA_CHUNK_ELEMENTS if device_type == "cuda" else CHUNK_ELEMENTS
    rows = chunk_size if chunk_size is not None else elements // vocab
    return max(1, min(n_tokens, rows))


def run_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
               ignore_index: int, label_smoothing: float, z_loss: float, chunk: int,
               needs: Tuple[bool, bool, bool], *, loss_rows: Optional[torch.Tensor] = None,
               lse: Optional[torch.Tensor] = None, saved_lse: Optional[torch.Tensor] = None,
               scale: Optional[torch.Tensor] = None):
    """For each chunk of ``chunk`` tokens: logits = hidden @ weight.T (+ bias) in the input dtype (as
    ``F.linear`` rounds them); the compiled row kernel writes the loss rows / lse and overwrites the logits with
    their gradient; the gradient matmuls accumulate the parameter gradients (no autograd).

    Args:
        hidden: ``(N, D)``; weight: ``(V, D)``; bias: None or ``(V,)``; one dtype (fp32/bf16/fp16) and device.
        targets: ``(N,)`` integers.
        needs: which of (grad_hidden, grad_weight, grad_bias) to compute.
        loss_rows, lse, saved_lse: ``(N,)`` buffers, as in :func:`..cross_entropy.ce_rows`.
        scale: None, a ``(1,)`` or an ``(N,)`` fp32 factor of each token's gradient.

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
    per_row = scale is not None and scale.numel() > 1
    weight_t = weight.t()
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h, logits = hidden[start:end], buf[: end - start]
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        piece = lambda x: None if x is None else x[start:end]  # noqa: E731
        ce_rows(logits, targets[start:end], ignore_index=ignore_index, label_smoothing=label_smoothing,
                z_loss=z_loss, loss_rows=piece(loss_rows), lse=piece(lse), saved_lse=piece(saved_lse),
                grad=logits if any(needs) else None, scale=scale[start:end] if per_row else scale)
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


@torch.library.custom_op("aimv2::compiled_linear_cross_entropy", mutates_args=(), device_types=DEVICE_TYPES)
def linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, reduction: str,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool, chunk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, d loss/d hidden, d loss/d weight (fp32), d loss/d bias (fp32))`` for ``(N, D)`` hidden.

    The gradients asked for by the three flags are computed in this pass ("mean"/"sum" only: a "none" loss
    has per-token upstream gradients); the others are empty ``(0,)`` tensors. With no flag set, the backward
    recomputes the chunks with the saved float64 ``(N,)`` lse. Differentiable w.r.t. hidden, weight and bias.
    """
    n = hidden.shape[0]
    rows = new_output((n,), dtype=torch.float32, device=hidden.device)
    lse = new_output((n,), dtype=torch.float64, device=hidden.device)
    count, inv_count = mean_scale(targets, ignore_index) if reduction == "mean" else (None, None)
    needs = (grad_hidden, grad_weight, grad_bias and bias is not None)
    if reduction == "none" and any(needs):
        raise ValueError("reduction='none' computes its gradients in the backward pass")
    grads = run_chunks(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, chunk, needs,
                       loss_rows=rows, lse=lse, scale=inv_count)
    return (reduce_rows(rows, reduction, count), lse) + grads


@torch.library.custom_op("aimv2::compiled_linear_cross_entropy_backward", mutates_args=(), device_types=DEVICE_TYPES)
def linear_cross_entropy_backward_op(
    grad_scale: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    bias: Optional[torch.Tensor], lse: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool, chunk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the per-token losses weighted by ``grad_scale`` (fp32, ``(1,)`` or ``(N,)``: the loss's
    gradient, divided by the count for "mean"), recomputing the logits chunk by chunk (the saved ``lse`` skips
    the kernel's lse pass). Each in its input's dtype, ``(0,)`` if not asked."""
    gh, gw, gb = run_chunks(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, chunk,
                            (grad_hidden, grad_weight, grad_bias and bias is not None),
                            saved_lse=lse, scale=grad_scale)
    return gh, gw.to(weight.dtype), gb.to(weight.dtype)


def _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias, param_dtype):
    return (hidden.new_empty(hidden.shape if grad_hidden else (0,)),
            weight.new_empty(weight.shape if grad_weight else (0,), dtype=param_dtype),
            weight.new_empty(weight.shape[:1] if grad_bias and bias is not None else (0,), dtype=param_dtype))


@linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, grad_hidden, grad_weight,
      grad_bias, chunk):
    lse = hidden.new_empty(hidden.shape[:1], dtype=torch.float64)
    loss = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    return (loss, lse) + _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias, torch.float32)


@linear_cross_entropy_backward_op.register_fake
def _(grad_scale, hidden, weight, targets, bias, lse, ignore_index, label_smoothing, z_loss, grad_hidden,
      grad_weight, grad_bias, chunk):
    return _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias, weight.dtype)


# NOTE: fp32 "mean"/"sum" compute the gradients in the forward (no second logits matmul) and the backward scales
# them by grad_output. bf16/fp16 and "none" recompute the chunks in the backward instead, with grad_output (and
# 1/count) folded into the logits gradient before its one rounding, as autograd through the reference rounds
# it. Saving the low-precision gradients and scaling them afterwards rounds twice: measured on this CPU with a
# random grad_output (25 seeds, 33 tokens in chunks of 10 and 7 in chunks of 3, bias, smoothing and z-loss),
# bf16 grad_hidden reached 3.8x and grad_bias 3.5x the reference's error against float64 (budget 3x); with the
# recompute (and grad_weight summed in fp32 over all chunks, not rounded per chunk) every bf16/fp16 gradient
# stays at 1.0x. The price is one more logits matmul, for low-precision inputs only.
def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, *flags, chunk = inputs
    ctx.dtype, ctx.reduction, ctx.computed = hidden.dtype, reduction, any(flags)
    ctx.options = (ignore_index, label_smoothing, z_loss)
    ctx.chunk = chunk
    if ctx.computed:  # the gradients are already computed: keep them
        ctx.save_for_backward(*output[2:])
    else:  # recompute in backward: keep the inputs and the lse
        ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    ctx.flags = tuple(flags)
    ctx.mark_non_differentiable(*output[1:])
    # Outputs 1: (the lse and the gradients) never get a gradient; without this, autograd would hand the
    # backward zero-filled tensors of their shapes, among them a (V, D) fp32 one, on every step.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    needs = tuple(ctx.needs_input_grad[i] for i in (0, 1, 3))
    if not ctx.computed:
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        ignore_index = ctx.options[0]
        scale = grad_scale(grad_loss, ctx.reduction, targets, ignore_index)
        grads = linear_cross_entropy_backward_op(scale, hidden, weight, targets, bias, lse, *ctx.options, *needs,
                                                 ctx.chunk)
    else:
        if any(need and not done for need, done in zip(needs, ctx.flags)):
            raise RuntimeError("aimv2::compiled_linear_cross_entropy: a gradient was needed but not computed in the "
                               "forward (pass grad_hidden/grad_weight/grad_bias=True)")
        g = grad_loss.float().reshape(1)  # rank 1, so that the product is computed in fp32
        grads = [scale_saved_gradient(x, g, ctx.dtype) if need else None
                 for x, need in zip(ctx.saved_tensors, needs)]
    gh, gw, gb = (x if need else None for x, need in zip(grads, needs))
    return gh, gw, None, gb, None, None, None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_compiled(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                  bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                  label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                                  chunk_size: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without the full logits: the ``"cpu"`` and ``"cuda"``
    backends of :func:`aimv2_kernels.linear_cross_entropy` (the row kernel follows the tensors' device).

    Args:
        hidden: ``(..., D)`` fp32/bf16/fp16 CPU or CUDA tensor.
        weight: ``(V, D)``; bias: None or ``(V,)``; hidden's dtype and device.
        targets: ``(...)`` integers of any dtype, in ``[0, V)`` or equal to ``ignore_index``.
        label_smoothing, z_loss, reduction: see :func:`aimv2_kernels.cross_entropy`.
        chunk_size: tokens per chunk (default ``CHUNK_ELEMENTS // V``, a 64 MiB fp32 buffer, on the CPU;
            ``CUDA_CHUNK_ELEMENTS // V`` on CUDA).

    Returns:
        fp32 loss: ``()`` for "mean"/"sum", ``targets.shape`` for "none" (0 where ignored).

    Memory: one ``(chunk, V)`` logits buffer in the input dtype (overwritten in place by its gradient), for
    bf16/fp16 its fp32 copy, and the gradients (fp32 accumulators for weight and bias). For fp32 "mean"/"sum"
    the gradients are computed in the forward and the backward only scales them by ``grad_output``; otherwise
    the backward recomputes the chunks (one more logits matmul) with ``grad_output`` folded into the logits
    gradient before it is rounded.
    """
    d, v = hidden.shape[-1], weight.shape[0]
    flat = hidden.reshape(-1, d)
    want = reduction != "none" and hidden.dtype == torch.float32 and torch.is_grad_enabled()
    needs = [want and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    loss = linear_cross_entropy_op(flat, weight, targets.reshape(-1), bias, ignore_index, float(label_smoothing),
                                   float(z_loss), reduction, *needs,
                                   chunk_rows(flat.shape[0], v, chunk_size, hidden.device.type))[0]
    return loss.reshape(targets.shape) if reduction == "none" else loss
