"""Public ``patch_mse_loss``: argument checks, backend dispatch, and the reduction over per-patch rows."""
from __future__ import annotations

import torch

from . import _validate as V
from ._backend import kernel, resolve_backend
from .reference.patch_mse import count_patches, patch_mse_loss_reference


def patch_mse_loss(pred: torch.Tensor, images: torch.Tensor, patch_size: int,
                   prefix_lens: torch.Tensor | None = None, *, target_offset: int = 0, eps: float = 1e-6,
                   reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Per-patch-normalized MSE between predicted patches and the image's own patches.

    Args:
        pred: ``(B, L, P)`` predictions, fp32/bf16/fp16, with ``L = N - target_offset`` and
            ``P = C * p * p``. Row l is compared with patch ``l + target_offset``.
        images: ``(B, C, H, W)``, same dtype and device as ``pred``; H and W multiples of ``patch_size``.
            There are ``N = (H/p) * (W/p)`` patches in raster order; each patch vector is ordered
            (row in patch, column in patch, channel), channel fastest.
        patch_size: p, a positive int.
        prefix_lens: optional integer ``(B,)`` in ``[0, N]``. Patch n of sample b counts iff
            ``n >= prefix_lens[b]``; all patches count when None.
        target_offset: 0 or more, less than N (the AIMv2 decoder passes 1: position i predicts patch i+1).
        eps: added to the unbiased variance inside the sqrt of the per-patch normalisation; finite, > 0.
        reduction: ``"mean"`` (sum over counted patches / their number in the whole batch; 0 with zero
            gradient when none count), ``"sum"``, or ``"none"`` (``(B, L)``, 0 where not counted).
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.

    Returns:
        fp32 loss (scalar, or ``(B, L)`` for ``"none"``). The gradient flows to ``pred`` only; math runs in fp32.
    """
    V.check_tensor("pred", pred, ndim=3)
    V.check_tensor("images", images, ndim=4)
    V.check_same("images", images, "pred", pred)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"patch_size must be an int, got {type(patch_size).__name__}")
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"images height and width must be multiples of patch_size={patch_size}, "
                         f"got {h}x{w}")
    n, p = (h // patch_size) * (w // patch_size), c * patch_size * patch_size
    if p < 2:
        raise ValueError(f"a patch must hold at least 2 values for the unbiased variance, got "
                         f"C*p*p={p} (images channels={c}, patch_size={patch_size})")
    if isinstance(target_offset, bool) or not isinstance(target_offset, int):
        raise TypeError(f"target_offset must be an int, got {type(target_offset).__name__}")
    if not 0 <= target_offset < max(n, 1):
        raise ValueError(f"target_offset must lie in [0, {n}), got {target_offset}")
    if pred.shape != (b, n - target_offset, p):
        raise ValueError(f"pred must have shape {(b, n - target_offset, p)} (B, N - target_offset, C*p*p) "
                         f"for images {tuple(images.shape)}, got {tuple(pred.shape)}")
    eps = V.check_float("eps", eps, low=0.0, low_open=True)  # finite and > 0, for every backend
    V.check_reduction(reduction)
    V.check_prefix_lens(prefix_lens, b, n, pred.device)

    impl = resolve_backend("patch_mse_loss", backend, pred.device, pred.dtype)
    if impl == "reference":
        return patch_mse_loss_reference(pred, images, patch_size, prefix_lens, target_offset=target_offset,
                                        eps=float(eps), reduction=reduction)
    rows_fn = kernel("patch_mse_loss", impl)
    rows = rows_fn(pred, images, patch_size, prefix_lens, target_offset, float(eps))  # (B, L) fp32
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = count_patches(prefix_lens, b, n - target_offset, target_offset, pred.device)
    return total / count.clamp_min(1).to(total.dtype)

