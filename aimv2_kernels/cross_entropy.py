"""Public ``cross_entropy`` and ``linear_cross_entropy``: argument checks and backend dispatch."""
from __future__ import annotations

import torch

from . import _validate as V
from ._backend import kernel, resolve_backend
from .reference.cross_entropy import cross_entropy_reference, linear_cross_entropy_reference


def _check_options(ignore_index, label_smoothing, z_loss, reduction) -> None:
    """Checked before dispatch, identically for every backend: ``ignore_index`` an int64-representable int,
    ``label_smoothing`` finite in [0, 1], ``z_loss`` finite and >= 0, ``reduction`` a known name."""
    V.check_ignore_index(ignore_index)
    V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    V.check_float("z_loss", z_loss, low=0.0)
    V.check_reduction(reduction)


def _as_int64(targets: torch.Tensor) -> torch.Tensor:
    """The reference backend (``F.cross_entropy``) takes int64 (or uint8) targets only; the kernels read any
    integer dtype as int64 values: the same values reach every backend."""
    return targets if targets.dtype == torch.int64 else targets.long()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                  backend: str = "auto") -> torch.Tensor:
    """Softmax cross-entropy over given logits, computed in fp32.

    Value: ``F.cross_entropy(logits.float(), targets, ignore_index, label_smoothing)`` plus
    ``z_loss * logsumexp(logits)**2`` averaged (or summed) over the counted (non-ignored) tokens.

    Args:
        logits: ``(..., V)`` fp32/bf16/fp16.
        targets: ``(...)`` integer class ids in ``[0, V)`` or ``ignore_index``.
        reduction: ``"mean"`` over non-ignored tokens (0, with zero gradient, when all are ignored),
            ``"sum"``, or ``"none"`` (per token, shape ``(...)``, 0 where ignored).

    Returns:
        fp32 loss. The gradient flows to ``logits``.
    """
    V.check_tensor("logits", logits, min_ndim=1)
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    _check_options(ignore_index, label_smoothing, z_loss, reduction)
    V.check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index, logits.device)
    impl = resolve_backend("cross_entropy", backend, logits.device, logits.dtype)
    if impl == "reference":
        return cross_entropy_reference(logits, _as_int64(targets), ignore_index=ignore_index,
                                       label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                                       reduction=reduction)
    ce = kernel("cross_entropy", impl)
    return ce(logits, targets, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
              z_loss=float(z_loss), reduction=reduction)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                         backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias``, which kernel backends never materialise.

    Args:
        hidden: ``(..., D)`` fp32/bf16/fp16.
        weight: ``(V, D)``, hidden's dtype and device.
        targets: ``(...)`` integers in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)``.
        ignore_index, label_smoothing, z_loss, reduction: as in :func:`cross_entropy`.
        backend: ``"auto"``, ``"reference"`` (builds the full logits: the oracle and eager baseline),
            ``"triton"``, ``"cuda"`` or ``"cpu"``. Kernel backends hold O(chunk x V) extra memory at most.

    Returns:
        fp32 loss. Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    V.check_tensor("hidden", hidden, min_ndim=1)
    V.check_tensor("weight", weight, ndim=2)
    V.check_same("weight", weight, "hidden", hidden)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden's last dimension, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (class), got shape {tuple(weight.shape)}")
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1)
        V.check_same("bias", bias, "hidden", hidden)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_options(ignore_index, label_smoothing, z_loss, reduction)
    V.check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index, hidden.device)
    impl = resolve_backend("linear_cross_entropy", backend, hidden.device, hidden.dtype)
    if impl == "reference":
        return linear_cross_entropy_reference(hidden, weight, _as_int64(targets), bias=bias, ignore_index=ignore_index,
                                              label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                                              reduction=reduction)
    linear_ce = kernel("linear_cross_entropy", impl)
    return linear_ce(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                     label_smoothing=float(label_smoothing), z_loss=float(z_loss), reduction=reduction)
