"""Transformer building blocks shared by the encoder and decoder (pre-norm, RMSNorm, SwiGLU, no biases)."""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from aimv2_kernels import prefix_attention

# Activation checkpointing of a block (:func:`set_activation_checkpointing`): "none" keeps every activation,
# "full" keeps only the block's input and recomputes the block in the backward pass, "selective" keeps the
# outputs of the matmuls and of the attention op and recomputes the rest (norms, SiLU, products, sums).
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")

# Every module of aimv2 initialises itself in its constructor with its documented initialiser (``init_weights``),
# as torch's own modules do. A module built inside another aimv2 module leaves that to the outermost one, whose
# ``init_weights`` covers its children: each parameter is initialised once, and ``AIMv2(cfg)`` draws the same
# random numbers in the same order as when only the top-level model initialised itself. Modules built on the meta
# device are not initialised (there is nothing to fill; ``to_empty`` + ``load_state_dict`` or ``init_weights``
# does it).
_BUILDING = threading.local()


@contextlib.contextmanager
def _building_children() -> Iterator[None]:
    """Construct aimv2 submodules without their own initialisation (the enclosing module's covers them)."""
    depth = getattr(_BUILDING, "depth", 0)
    _BUILDING.depth = depth + 1
    try:
        yield
    finally:
        _BUILDING.depth = depth


def _init_unless_nested(module: nn.Module) -> None:
    """End of an aimv2 constructor: ``module.init_weights()`` unless an enclosing aimv2 module is being built (it
    initialises this one) or the module is on the meta device."""
    if getattr(_BUILDING, "depth", 0):
        return
    if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
        return
    module.init_weights()


@torch.no_grad()
def _xavier_and_ones(module: nn.Module) -> None:
    """The trunk initialiser: every Linear xavier-uniform (bias 0), every RMSNorm scale 1, in module order."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.RMSNorm):
            nn.init.ones_(m.weight)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``, both without bias.

    Initialised xavier-uniform (:meth:`init_weights`)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows [q; k; v], each head-major
        self.proj = nn.Linear(dim, dim, bias=False)
        _init_unless_nested(self)

    def init_weights(self) -> None:
        """``qkv`` and ``proj`` xavier-uniform, as in the trunk."""
        _xavier_and_ones(self)

    def forward(self, x: torch.Tensor, prefix_lens: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = prefix_attention(q, k, v, prefix_lens, causal=causal, backend=self.backend)  # (B, H, S, hd)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    """``fc2(silu(fc1(x)) * fc3(x))``: fc1 is the gate, fc3 the up projection, fc2 the down projection.

    Initialised xavier-uniform (:meth:`init_weights`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)
        _init_unless_nested(self)

    def init_weights(self) -> None:
        """``fc1``, ``fc2``, ``fc3`` xavier-uniform, as in the trunk."""
        _xavier_and_ones(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


def _saved_by_selective(func: object) -> bool:
    """Whether selective activation checkpointing keeps ``func``'s output: matmuls and aimv2's own ops (the
    attention forward, whose recomputation would cost as much as the matmuls)."""
    aten = torch.ops.aten
    return func in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default) or \
        getattr(func, "namespace", None) == "aimv2"


def _selective_policy(ctx: object, func: object, *args: object, **kwargs: object) -> object:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if _saved_by_selective(func) else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm_1(x))``, then ``x + mlp(norm_2(x))``. Initialised as the trunk
    (:meth:`init_weights`).

    ``activation_checkpointing`` (one of :data:`ACTIVATION_CHECKPOINTING`, set by
    :func:`set_activation_checkpointing`) applies when gradients are enabled: the block's computation runs under
    ``torch.utils.checkpoint`` (non-reentrant) inside the block's own ``__call__``, so that an FSDP2 unit's
    hooks stay outside the recomputed region."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, backend: str):
        super().__init__()
        self.norm_1 = nn.RMSNorm(dim, eps=eps)
        with _building_children():
            self.attn = Attention(dim, num_heads, backend)
        self.norm_2 = nn.RMSNorm(dim, eps=eps)
        with _building_children():
            self.mlp = SwiGLU(dim, mlp_hidden)
        self.activation_checkpointing = "none"
        _init_unless_nested(self)

    def init_weights(self) -> None:
        """Linears xavier-uniform, RMSNorm scales 1, as in the trunk."""
        _xavier_and_ones(self)

    def forward(self, x: torch.Tensor, prefix_lens: torch.Tensor | None, causal: bool) -> torch.Tensor:
        mode = self.activation_checkpointing
        if mode == "none" or not torch.is_grad_enabled():
            return self._forward(x, prefix_lens, causal)
        from torch.utils.checkpoint import checkpoint

        extra = {"context_fn": _selective_contexts} if mode == "selective" else {}
        return checkpoint(self._forward, x, prefix_lens, causal, use_reentrant=False, **extra)

    def _forward(self, x: torch.Tensor, prefix_lens: torch.Tensor | None, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), prefix_lens, causal)
        return x + self.mlp(self.norm_2(x))


class Transformer(nn.Module):
    """A stack of blocks with a final RMSNorm (``post_trunk_norm``). Initialised by :meth:`init_weights`."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_hidden: int, eps: float, backend: str):
        super().__init__()
        with _building_children():
            self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_hidden, eps, backend) for _ in range(depth))
        self.post_trunk_norm = nn.RMSNorm(dim, eps=eps)
        _init_unless_nested(self)

    def forward(self, x: torch.Tensor, prefix_lens: torch.Tensor | None = None, *, causal: bool) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, prefix_lens, causal)
        return self.post_trunk_norm(x)

    def init_weights(self) -> None:
        """Trunk linears are xavier-uniform (official training code); RMSNorm scales are 1."""
        _xavier_and_ones(self)


def set_activation_checkpointing(module: nn.Module, mode: str) -> int:
    """Set activation checkpointing on every :class:`Block` inside ``module`` (or ``module`` itself).

    Args:
        module: any module holding blocks (an ``AIMv2``, an encoder, a ``Transformer``).
        mode: ``"none"``, ``"full"`` (recompute the whole block in the backward pass; only its input is kept)
            or ``"selective"`` (keep the matmuls' and the attention op's outputs; recompute norms and
            element-wise ops).
    Returns:
        The number of blocks set. Works on a plain model and under FSDP2 (apply before or after
        ``fully_shard``), eager or compiled. The outputs and gradients are those of ``"none"`` (the
        recomputation repeats the same ops).
    """
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"mode must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}")
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.activation_checkpointing = mode
    return len(blocks)


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


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], *,
                     antialias: bool = True) -> torch.Tensor:
    """Resize a learned position embedding ``(1, gh*gw, D)`` (raster order) to ``new_grid`` bicubically on its
    2-D grid; returns ``(1, nh*nw, D)`` in the input's dtype (``pos_embed`` itself when the grids are equal).

    This is timm's ``resample_abs_pos_embed`` (``interpolation="bicubic"``, ``antialias=True``,
    ``align_corners=None``, no prefix tokens, as timm's AIMv2 models call it, on the fly with
    ``dynamic_img_size=True`` and when loading weights into a model of another size): the table is upcast to
    float32, viewed as ``(1, D, gh, gw)``, resized with ``F.interpolate(mode="bicubic", align_corners=False,
    antialias=antialias)``, flattened back in raster order and cast to the input's dtype.

    ``antialias`` picks one of torch's two bicubic kernels, and it matters when *enlarging* as well as when
    shrinking (it is not only an anti-aliasing low-pass):

    - ``True`` (default, timm's): Pillow's separable resampling: the Keys cubic with ``a = -0.5``, its support
      widened by the shrink factor when shrinking, the taps that fall outside the grid dropped and the rest
      renormalised to sum to one.
    - ``False`` (what this function did before, and OpenCV's / torch's plain bicubic): the cubic with
      ``a = -0.75``, always 4 taps per axis, the border replicated (indices clamped).

    On a random table the two differ by about 8% relative (RMS) when enlarging 16 -> 24 (224 -> 336 px at
    patch 14) and about 38% when shrinking 16 -> 12 (224 -> 168 px). Through an encoder (2 random blocks, a
    N(0, 0.02) table) ``antialias=False`` puts the features about 2e-3 (336 px) and 8e-3 (168 px) relative
    from timm's, ``antialias=True`` about 3e-7, fp32 rounding (tests/test_timm_parity.py). A constant table
    stays constant with either.
    """
    if not isinstance(antialias, bool):
        raise TypeError(f"antialias must be a bool, got {type(antialias).__name__}")
    (gh, gw), (nh, nw) = old_grid, new_grid
    if pos_embed.dim() != 3 or pos_embed.shape[1] != gh * gw:
        raise ValueError(f"pos_embed must have shape (1, {gh * gw}, D), got {tuple(pos_embed.shape)}")
    if (gh, gw) == (nh, nw):
        return pos_embed
    d = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False,
                                           antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, nh * nw, d).to(pos_embed.dtype)


def fan_in_trunc_normal_(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Variance-scaling init (fan-in, truncated normal at 2 std), as the official heads use."""
    fan_in = weight.shape[1]
    std = math.sqrt(scale / fan_in) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
