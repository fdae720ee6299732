"""Backends ``"cpu"`` and ``"cuda"`` of ``prefix_attention``: the compiled tiled kernels as the custom ops
``aimv2::compiled_prefix_attention(_backward)``, with autograd."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated function.
from typing import Optional, Tuple

import torch

from .._alloc import new_output
from .._attention_op import define_attention_ops
from . import DEVICE_TYPES, require_extension

# What the CUDA kernels (csrc/cuda/prefix_attention_fwd.cu, _bwd.cu) implement; the CPU kernels take any D and fp32 too.
CUDA_HEAD_DIMS = (64, 128)
CUDA_DTYPES = (torch.bfloat16, torch.float16)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_lens: Optional[torch.Tensor], *,
                      causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``torch.ops.aimv2.prefix_attention_forward_out`` on fresh outputs (no autograd).

    Returns ``(out, lse)``: out ``(B, H, S, D)`` contiguous in q's dtype; lse fp32 ``(B, H, S)``, the log-sum-exp
    of each query's scaled scores in base 2 (``log2 sum_j 2^(scale * log2(e) * q.k_j)``), for the backward.
    """
    require_extension()
    batch, heads, seq, _ = q.shape
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = new_output((batch, heads, seq), dtype=torch.float32, device=q.device)
    torch.ops.aimv2.prefix_attention_forward_out(q, k, v, prefix_lens, causal, scale, out, lse)
    return out, lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, prefix_lens: Optional[torch.Tensor], *, causal: bool,
                       scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``torch.ops.aimv2.prefix_attention_backward_out``: ``(dq, dk, dv)``, contiguous, q's dtype.

    The probabilities are recomputed from ``lse`` (as returned by :func:`attention_forward`).
    """
    require_extension()
    dq, dk, dv = (new_output(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    torch.ops.aimv2.prefix_attention_backward_out(grad_out, q, k, v, out, lse, prefix_lens, causal, scale, dq, dk,
                                                  dv)
    return dq, dk, dv


forward_op, backward_op = define_attention_ops("compiled_prefix_attention", attention_forward, attention_backward,
                                               device_types=DEVICE_TYPES)


def check_cuda_support(q: torch.Tensor) -> None:
    """Raise if the CUDA kernels do not implement q's dtype or head dimension (the CPU kernels take all)."""
    if q.device.type != "cuda":
        return
    if q.dtype not in CUDA_DTYPES:
        raise TypeError(f"prefix_attention(backend='cuda'): q must be bfloat16 or float16, got {q.dtype}; "
                        f"use backend='triton' or 'reference' for float32")
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        raise ValueError(f"prefix_attention(backend='cuda'): q's head dimension must be one of {CUDA_HEAD_DIMS}, "
                         f"got {q.shape[-1]}")


def prefix_attention_compiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              prefix_lens: Optional[torch.Tensor], *, causal: bool,
                              scale: Optional[float]) -> torch.Tensor:
    """Prefix-causal attention with the compiled kernels (C++ on CPU tensors, CUDA on CUDA tensors),
    differentiable w.r.t. q, k and v.

    Called by :func:`aimv2_kernels.prefix_attention` after its checks (shapes, dtypes, devices, prefix range).

    Args:
        q, k, v: ``(B, H, S, D)``, any S >= 1 and any strides on (B, H, S) (e.g. permuted views of a fused qkv
            projection; a non-contiguous D is copied once). CPU: fp32/bf16/fp16, any D. CUDA: bf16/fp16 and
            D in ``CUDA_HEAD_DIMS`` (else ``TypeError`` / ``ValueError`` naming q).
        prefix_lens: None (plain causal) or integer ``(B,)`` in ``[0, S]``.
        causal: False gives full attention (``prefix_lens`` is then ignored).
        scale: softmax scale, None for ``D ** -0.5``.

    Returns:
        ``(B, H, S, D)`` contiguous, q's dtype. Softmax in fp32 over tiles with an online softmax (masked-out
        tiles skipped, fully visible tiles unmasked); the backward recomputes the probabilities from the saved
        fp32 log-sum-exp and accumulates dq, dk, dv in fp32.
    """
    check_cuda_support(q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = forward_op(q, k, v, prefix_lens if causal else None, causal, scale)
    return out
