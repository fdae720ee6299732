"""Reference per-patch-normalized MSE (the AIMv2 / MAE ``norm_pix_loss``), in plain PyTorch."""
from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, p*p*C)``, patches in raster order, each vector ordered (row, col, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p_row, p_col, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def counted_mask(prefix_lens: torch.Tensor | None, batch: int, length: int, target_offset: int,
                 device: torch.device) -> torch.Tensor:
    """Boolean ``(B, L)``: row l of sample b counts iff patch ``l + target_offset >= prefix_lens[b]``."""
    patch_index = torch.arange(length, device=device) + target_offset
    if prefix_lens is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return patch_index[None, :] >= prefix_lens[:, None]


def count_patches(prefix_lens: torch.Tensor | None, batch: int, length: int, target_offset: int,
                  device: torch.device) -> torch.Tensor:
    """Number of counted rows over the whole batch, as a 0-d int64 tensor (no host synchronisation)."""
    if prefix_lens is None:
        return torch.tensor(batch * length, dtype=torch.int64, device=device)
    skipped = (prefix_lens.to(torch.int64) - target_offset).clamp(0, length)
    return (length - skipped).sum()


def patch_mse_loss_reference(pred: torch.Tensor, images: torch.Tensor, patch_size: int,
                             prefix_lens: torch.Tensor | None = None, *, target_offset: int = 0,
                             eps: float = 1e-6, reduction: str = "mean") -> torch.Tensor:
    """Per-patch-normalized MSE; see :func:`aimv2_kernels.patch_mse_loss` for the contract.

    Math runs in fp32 (fp64 inputs stay fp64, for the oracle). The result is fp32 (or fp64).
    """
    compute = torch.float64 if pred.dtype == torch.float64 else torch.float32
    target = patchify(images.to(compute), patch_size)[:, target_offset:]
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    target = (target - mean) / torch.sqrt(var + eps)
    per_patch = (pred.to(compute) - target).pow(2).mean(dim=-1)  # (B, L)
    b, length = per_patch.shape
    mask = counted_mask(prefix_lens, b, length, target_offset, pred.device)
    per_patch = torch.where(mask, per_patch, torch.zeros((), dtype=compute, device=pred.device))
    if reduction == "none":
        return per_patch
    total = per_patch.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1).to(compute)
