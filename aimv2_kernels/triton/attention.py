"""Triton backend of ``prefix_attention``: custom ops ``aimv2::prefix_attention_triton(_backward)``, autograd."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated function.
from typing import Optional, Tuple

import torch

from .attention_backward import attention_backward
from .attention_forward import HEAD_DIMS, attention_forward


@torch.library.custom_op("aimv2::prefix_attention_triton", mutates_args=())
def forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_lens: Optional[torch.Tensor], causal: bool,
               scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out ``(B, H, S, D)`` in q's dtype, lse fp32 ``(B, H, S)`` (see ``attention_forward``)."""
    return attention_forward(q, k, v, prefix_lens, causal=causal, scale=scale)


@torch.library.custom_op("aimv2::prefix_attention_triton_backward", mutates_args=())
def backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, prefix_lens: Optional[torch.Tensor], causal: bool,
                scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, each ``(B, H, S, D)`` in q's dtype (see ``attention_backward``)."""
    return attention_backward(grad_out, q, k, v, out, lse, prefix_lens, causal=causal, scale=scale)


@forward_op.register_fake
def _(q, k, v, prefix_lens, causal, scale):
    batch, heads, seq, head_dim = q.shape
    return q.new_empty((batch, heads, seq, head_dim)), q.new_empty((batch, heads, seq), dtype=torch.float32)


@backward_op.register_fake
def _(grad_out, q, k, v, out, lse, prefix_lens, causal, scale):
    return tuple(q.new_empty(q.shape[:4]) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_lens, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, prefix_lens)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, prefix_lens = ctx.saved_tensors
    dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, prefix_lens, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


forward_op.register_autograd(_backward, setup_context=_setup_context)


def prefix_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_lens: Optional[torch.Tensor],
                            *, causal: bool, scale: Optional[float]) -> torch.Tensor:
    """Prefix-causal attention with Triton kernels, differentiable w.r.t. q, k and v.

    Called by :func:`aimv2_kernels.prefix_attention` after its checks (shapes, dtypes, devices, prefix range).

    Args:
        q, k, v: ``(B, H, S, D)`` fp32/bf16/fp16 CUDA tensors (CPU under ``TRITON_INTERPRET=1``), any strides
            (e.g. permuted views of a fused qkv projection). D must be 16, 32, 64 or 128.
        prefix_lens: None (plain causal) or integer ``(B,)`` in ``[0, S]``; read inside the kernels.
        causal: False gives full attention (``prefix_lens`` is then ignored).
        scale: softmax scale, None for ``D ** -0.5``.

    Returns:
        ``(B, H, S, D)`` contiguous, q's dtype. Softmax in fp32; the backward recomputes the probabilities
        from the saved fp32 log-sum-exp.
    """
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"q: backend='triton' needs a head dimension D in {HEAD_DIMS}, got shape {tuple(q.shape)}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    out, _ = forward_op(q, k, v, prefix_lens if causal else None, causal, scale)
    return out
