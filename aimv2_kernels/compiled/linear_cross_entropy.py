"""Linear cross-entropy of the ``"cpu"`` and ``"cuda"`` backends: the shared chunk loop and autograd
(:mod:`.._linear_cross_entropy_op`) around the compiled row kernel (:func:`.cross_entropy.ce_rows`)."""
from __future__ import annotations

import torch

from .._linear_cross_entropy_op import chunk_rows as _chunk_rows
from .._linear_cross_entropy_op import define_linear_cross_entropy_ops
from . import DEVICE_TYPES
from .cross_entropy import ce_rows

# Logits elements per chunk: the (rows, V) buffer, in the input dtype, is the only V-sized temporary besides, for
# bf16/fp16 gradients, its fp32 copy. 2**24 elements is 64 MiB in fp32: at V = 32000, 524 tokens per chunk.
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


def chunk_rows(n_tokens: int, vocab: int, chunk_size: int | None = None, device_type: str = "cpu") -> int:
    """Tokens per chunk: ``chunk_size``, else ``CHUNK_ELEMENTS // vocab`` (``CUDA_CHUNK_ELEMENTS`` on CUDA);
    clipped to ``[1, n_tokens]``."""
    elements = CUDA_CHUNK_ELEMENTS if device_type == "cuda" else CHUNK_ELEMENTS
    return _chunk_rows(n_tokens, vocab, elements, chunk_size)


# The compiled row kernel takes the shared interface as it is; its lse is float64 (the backward's exp(x - lse)
# needs it to better than fp32 there: see csrc/cross_entropy_cpu.cpp).
linear_cross_entropy_op, linear_cross_entropy_backward_op, _apply = define_linear_cross_entropy_ops(
    "compiled_linear_cross_entropy", ce_rows, torch.float64, device_types=DEVICE_TYPES)


def linear_cross_entropy_compiled(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                  bias: torch.Tensor | None = None, ignore_index: int = -100,
                                  label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                                  chunk_size: int | None = None) -> torch.Tensor:
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

    Memory and gradients: see :mod:`aimv2_kernels._linear_cross_entropy_op`.
    """
    n = hidden.reshape(-1, hidden.shape[-1]).shape[0]
    chunk = chunk_rows(n, weight.shape[0], chunk_size, hidden.device.type)
    return _apply(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, chunk)
