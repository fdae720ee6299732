"""Public ``prefix_attention``: argument checks and backend dispatch."""
from __future__ import annotations

import math

import torch

from . import _validate as V
from ._backend import kernel, resolve_backend
from .reference.attention import prefix_attention_reference


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_lens: torch.Tensor | None = None,
                     *, causal: bool = True, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Prefix-causal attention, the mask of AIMv2's pre-training encoder.

    Key j is visible to query i iff ``not causal`` or ``j <= i`` or ``j < prefix_lens[b]``::

        S=6, prefix_lens[b]=3           keys j ->
                                  q 0:  x x x . . .
                                  q 1:  x x x . . .    bidirectional inside the prefix,
                                  q 2:  x x x . . .
                                  q 3:  x x x x . .    causal after it
                                  q 4:  x x x x x .
                                  q 5:  x x x x x x

    ``prefix_lens=None`` is plain causal attention, ``prefix_lens[b] = S`` (or ``causal=False``) is full
    attention. Every query sees at least itself, so no row is empty.

    Args:
        q, k, v: ``(B, H, S, D)`` (the layout of ``F.scaled_dot_product_attention``), one dtype among
            fp32, bf16, fp16, on one device.
        prefix_lens: optional integer ``(B,)`` with values in ``[0, S]``.
        causal: False gives full bidirectional attention (``prefix_lens`` is then ignored).
        scale: softmax scale, finite (any sign); defaults to ``D ** -0.5``.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.

    Returns:
        ``(B, H, S, D)`` in q's dtype; the softmax runs in fp32. Gradients flow to q, k and v.
    """
    V.check_tensor("q", q, ndim=4)
    V.check_tensor("k", k, ndim=4)
    V.check_tensor("v", v, ndim=4)
    V.check_same("k", k, "q", q)
    V.check_same("v", v, "q", q)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != q.shape:
        raise ValueError(f"v must have the shape of q {tuple(q.shape)}, got {tuple(v.shape)}")
    b, _, s, d = q.shape
    if s < 1 or d < 1:
        raise ValueError(f"q must have a non-empty sequence and head dimension, got shape {tuple(q.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None:
        # Finite, for every backend. Any sign: the mask is applied after scaling, so a negative or zero scale still
        # masks (tests/test_attention_cpu.py::test_negative_scale).
        scale = V.check_float("scale", scale, low=-math.inf)
    V.check_prefix_lens(prefix_lens, b, s, q.device)

    impl = resolve_backend("prefix_attention", backend, q.device, q.dtype)
    if impl == "reference":
        return prefix_attention_reference(q, k, v, prefix_lens, causal=causal, scale=scale)
    return kernel("prefix_attention", impl)(q, k, v, prefix_lens, causal=causal, scale=scale)
