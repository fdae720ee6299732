"""Reference cross-entropy over given logits, and the straightforward linear + cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                            label_smoothing: float = 0.0, z_loss: float = 0.0,
                            reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits.float(), ...)`` plus ``z_loss * logsumexp^2`` on the counted tokens.

    ``logits``: ``(..., V)``; ``targets``: ``(...)`` integers. ``"mean"`` divides by the number of
    non-ignored tokens and gives 0 (with zero gradient) when all are ignored. Returns fp32 (fp64 for fp64).
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = logits.reshape(-1, logits.shape[-1]).to(compute)
    tgt = targets.reshape(-1)
    counted = tgt != ignore_index
    per_token = F.cross_entropy(flat, tgt, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                reduction="none")
    if z_loss != 0.0:
        lse = torch.logsumexp(flat, dim=-1)
        per_token = per_token + z_loss * torch.where(counted, lse.pow(2), torch.zeros_like(lse))
    if reduction == "none":
        return per_token.reshape(targets.shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp_min(1).to(compute)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   bias: torch.Tensor | None = None, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, z_loss: float = 0.0,
                                   reduction: str = "mean") -> torch.Tensor:
    """Builds the full ``(tokens, V)`` logits ``hidden @ weight.T + bias``, then :func:`cross_entropy_reference`."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy_reference(logits, targets, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)
