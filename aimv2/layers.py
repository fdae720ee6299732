"""Transformer building blocks shared by the encoder and decoder (pre-norm, RMSNorm, SwiGLU, no biases)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from aimv2_kernels import prefix_attention


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``, both without bias."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows [q; k; v], each head-major
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, prefix_lens: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = prefix_attention(q, k, v, prefix_lens, causal=causal, backend=self.backend)  # (B, H, S, hd)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    """``fc2(silu(fc1(x)) * fc3(x))``: fc1 is the gate, fc3 the up projection, fc2 the down projection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm_1(x))``, then ``x + mlp(norm_2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, backend: str):
        super().__init__()
        self.norm_1 = nn.RMSNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, backend)
        self.norm_2 = nn.RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, prefix_lens: torch.Tensor | None, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), prefix_lens, causal)
        return x + self.mlp(self.norm_2(x))


class Transformer(nn.Module):
    """A stack of blocks with a final RMSNorm (``post_trunk_norm``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_hidden: int, eps: float, backend: str):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_hidden, eps, backend) for _ in range(depth))
        self.post_trunk_norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, prefix_lens: torch.Tensor | None = None, *, causal: bool) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, prefix_lens, causal)
        return self.post_trunk_norm(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Trunk linears are xavier-uniform (official training code); RMSNorm scales are 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int, *, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``(grid_h * grid_w, dim)`` of AIMv2's native-resolution model.

    Channels ``[0, D/2)`` encode the column index as ``[sin(x w), cos(x w)]`` and ``[D/2, D)`` the row index,
    with ``w_k = 10000^(-k / (D/4))``; tokens are in raster order (token t is row t // w, column t % w).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64, device=device),
                                torch.arange(grid_w, dtype=torch.float64, device=device), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).to(dtype)


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a learned position embedding ``(1, gh*gw, D)`` (raster order) to ``new_grid`` bicubically on its
    2-D grid (``align_corners=False``, as timm does); returns ``(1, nh*nw, D)`` in the input's dtype."""
    (gh, gw), (nh, nw) = old_grid, new_grid
    if pos_embed.dim() != 3 or pos_embed.shape[1] != gh * gw:
        raise ValueError(f"pos_embed must have shape (1, {gh * gw}, D), got {tuple(pos_embed.shape)}")
    if (gh, gw) == (nh, nw):
        return pos_embed
    d = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, nh * nw, d).to(pos_embed.dtype)


def fan_in_trunc_normal_(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Variance-scaling init (fan-in, truncated normal at 2 std), as the official heads use."""
    fan_in = weight.shape[1]
    std = math.sqrt(scale / fan_in) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
