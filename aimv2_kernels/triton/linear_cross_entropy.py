"""Triton linear cross-entropy: the shared chunk loop and autograd (:mod:`.._linear_cross_entropy_op`) around the
fused Triton row kernel (:func:`.cross_entropy.rows`), which overwrites each chunk's logits with their gradient."""
from __future__ import annotations

import torch

from .._linear_cross_entropy_op import chunk_rows as _chunk_rows
from .._linear_cross_entropy_op import define_linear_cross_entropy_ops
from .cross_entropy import rows

# Logits elements per chunk. A chunk's ``(rows, V)`` logits buffer, in the input dtype, is the only V-sized
# temporary besides, for bf16/fp16 gradients, its fp32 copy (2**26 elements: 128 MiB in bf16 and 256 MiB in
# fp32; at V = 32000, 2097 tokens per chunk). Not yet tuned on a GPU.
CHUNK_ELEMENTS = 1 << 26


def chunk_rows(n_tokens: int, vocab: int, chunk_size: int | None = None) -> int:
    """Tokens per chunk: ``chunk_size``, else ``CHUNK_ELEMENTS // vocab``; clipped to ``[1, n_tokens]``."""
    return _chunk_rows(n_tokens, vocab, CHUNK_ELEMENTS, chunk_size)


linear_cross_entropy_op, linear_cross_entropy_backward_op, _apply = define_linear_cross_entropy_ops(
    "triton_linear_cross_entropy", rows, torch.float32)


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                bias: torch.Tensor | None = None, ignore_index: int = -100,
                                label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                                chunk_size: int | None = None) -> torch.Tensor:
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

    Memory and gradients: see :mod:`aimv2_kernels._linear_cross_entropy_op` (one ``(chunk, V)`` logits buffer,
    overwritten by its gradient; fp32 "mean"/"sum" get their gradients in the forward, the others recompute the
    chunks in the backward).
    """
    chunk = chunk_rows(hidden.reshape(-1, hidden.shape[-1]).shape[0], weight.shape[0], chunk_size)
    return _apply(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, chunk)
