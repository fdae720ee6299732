"""The attentive probe of AIMv2's evaluation: a classifier trained on the frozen trunk's last-layer features.

The module follows Apple's ``AttentionPoolingClassifier`` (ml-aim): an optional non-affine BatchNorm over the
features, one learned query per head (no query projection), key and value projections without bias, a softmax
over the patches, the mean over queries, then a linear classifier. Heads = ``dim // 128`` (at least 1). Which
exact variant produced the paper's numbers is not published (AIMV2_FACTS.md §5.1); this one is Apple's code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROBE_HEAD_DIM = 128


def probe_heads(dim: int) -> int:
    """Heads of the probe for features of width ``dim``: ``dim // 128``, at least 1, and a divisor of ``dim``."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    heads = max(1, dim // PROBE_HEAD_DIM)
    while dim % heads:
        heads -= 1
    return heads


class AttentionPoolingClassifier(nn.Module):
    """Attentive probe: ``features (B, N, dim)`` -> ``(logits (B, num_classes), pooled (B, dim))``.

    Args:
        dim: feature width (the trunk's ``D``).
        num_classes: classifier outputs.
        num_heads: attention heads; None = :func:`probe_heads` (``dim // 128``, at least 1).
        num_queries: learned query tokens, averaged after pooling (1 in Apple's default).
        use_batch_norm: normalize the features with a non-affine BatchNorm (eps 1e-6) first, as ml-aim does.
    Parameters: ``query (1, num_queries, dim)``, ``k``/``v`` ``Linear(dim, dim, bias=False)``, ``linear``
    ``Linear(dim, num_classes)``: ``2 dim^2 + num_queries dim`` for the pooling.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int | None = None, num_queries: int = 1,
                 use_batch_norm: bool = True):
        super().__init__()
        heads = probe_heads(dim) if num_heads is None else num_heads
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"num_heads must be a positive divisor of dim={dim}, got {heads!r}")
        if not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
        self.dim, self.num_heads, self.num_queries = dim, heads, num_queries
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if use_batch_norm else nn.Identity()
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 3 or features.shape[-1] != self.dim:
            raise ValueError(f"features must have shape (B, N, {self.dim}), got {tuple(features.shape)}")
        b, n, d = features.shape
        h, hd = self.num_heads, d // self.num_heads
        x = self.bn(features.transpose(1, 2)).transpose(1, 2)
        q = self.query.expand(b, -1, -1).reshape(b, self.num_queries, h, hd).transpose(1, 2)
        k = self.k(x).reshape(b, n, h, hd).transpose(1, 2)
        v = self.v(x).reshape(b, n, h, hd).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, h, queries, hd): softmax over the N patches
        pooled = pooled.transpose(1, 2).reshape(b, self.num_queries, d).mean(dim=1)
        return self.linear(pooled), pooled
