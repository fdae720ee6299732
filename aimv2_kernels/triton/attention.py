"""Triton backend of ``prefix_attention``: custom ops ``aimv2::prefix_attention_triton(_backward)``, autograd."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated function.
from typing import Optional

import torch

from .._attention_op import define_attention_ops
from .attention_backward import attention_backward
from .attention_forward import HEAD_DIMS, attention_forward

forward_op, backward_op = define_attention_ops("prefix_attention_triton", attention_forward, attention_backward)


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
