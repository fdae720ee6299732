"""The AIMv2 encoder (with the released checkpoints' module names), the causal multimodal decoder and the loss."""
from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from aimv2_kernels import BACKENDS, linear_cross_entropy, patch_mse_loss

from .config import AIMv2Config, DecoderConfig, EncoderConfig
from .layers import (
    Transformer,
    _building_children,
    _init_unless_nested,
    fan_in_trunc_normal_,
    resize_pos_embed,
    sincos_pos_embed,
)
from .weights import read_pretrained


class PatchEmbed(nn.Module):
    """Conv (kernel = stride = patch, with bias) -> raster-order tokens -> RMSNorm. Initialised by
    :meth:`init_weights`."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        _init_unless_nested(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The conv weight xavier-uniform on its ``[D, C*p*p]`` view, the RMSNorm scale 1; the conv bias keeps
        torch's default init (uniform in +-1/sqrt(C*p*p))."""
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.ones_(self.norm.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(images).flatten(2).transpose(1, 2))  # (B, N, D)


class ViTPreprocessor(nn.Module):
    """Patch embedding plus the position embedding (learned ``[1, N, D]`` or fixed 2-D sin-cos). Initialised by
    :meth:`init_weights`.

    ``antialias`` (a plain attribute, not part of the state dict; default True): the bicubic kernel that resizes
    a learned table for an image that is not ``image_size`` square (:func:`aimv2.layers.resize_pos_embed`):
    True is timm's (``resample_abs_pos_embed``), False the plain bicubic this module used before."""

    def __init__(self, cfg: EncoderConfig, *, antialias: bool = True):
        super().__init__()
        self.cfg = cfg
        self.antialias = _check_flag("antialias", antialias)
        with _building_children():
            self.patchifier = PatchEmbed(cfg)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches, cfg.dim))
        else:
            self.register_parameter("pos_embed", None)
        _init_unless_nested(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patchifier(images)
        p = self.cfg.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        if self.pos_embed is not None:
            g = self.cfg.grid_size
            # Another resolution: the learned [1, g*g, D] table is resized bicubically on its 2-D grid, on the
            # fly (as timm's dynamic_img_size does; gradients flow to the table).
            if grid == (g, g):
                return x + self.pos_embed
            return x + resize_pos_embed(self.pos_embed, (g, g), grid, antialias=self.antialias)
        pos = sincos_pos_embed(*grid, self.cfg.dim, device=x.device)
        return x + pos.to(x.dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The patch embedding's (:meth:`PatchEmbed.init_weights`), then a learned position table N(0, 0.02)."""
        self.patchifier.init_weights()
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)


OUTPUT_FORMATS = ("NLC", "NCHW")

# What the encoder's forward takes (a TypeError for anything else names the class that makes it from images).
_PROCESSOR = "aimv2.processor.AIMv2ImageProcessor"


def feature_take_indices(depth: int, indices: int | Sequence[int] | None = None) -> list[int]:
    """The blocks ``indices`` names, as sorted distinct absolute indices in ``[0, depth)`` (timm's
    ``feature_take_indices`` and its meaning, in the order :meth:`AIMv2Encoder.forward_intermediates` returns
    them).

    Args:
        depth: the number of blocks.
        indices: None: every block; an int ``n``: the last ``n`` blocks (``1 <= n <= depth``); a sequence of
            ints: those blocks, a negative index counting from the end (``-1`` is the last block). A block
            named twice is taken once, and the blocks come in block order whatever the order given (as timm,
            which collects them while it runs the blocks).

    Raises:
        TypeError: ``indices`` is not None, an int or a sequence of ints (a bool is not an int here).
        ValueError: ``n`` or an index out of range, or an empty sequence.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if indices is None:
        return list(range(depth))
    if isinstance(indices, bool):
        raise TypeError("indices must be None, an int (the last n blocks) or a sequence of block indices, got bool")
    if isinstance(indices, numbers.Integral):
        indices = int(indices)
        if not 1 <= indices <= depth:
            raise ValueError(f"indices: the last n blocks needs 1 <= n <= {depth} (the depth), got {indices}")
        return list(range(depth - indices, depth))
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
        raise TypeError(f"indices must be None, an int (the last n blocks) or a sequence of block indices, "
                        f"got {type(indices).__name__}")
    if len(indices) == 0:
        raise ValueError("indices must name at least one block, got an empty sequence")
    taken = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"indices must hold ints, got {type(i).__name__} ({i!r})")
        i = int(i)
        if not -depth <= i < depth:
            raise ValueError(f"indices: block {i} is out of range for depth {depth} (-{depth} to {depth - 1})")
        taken.add(i % depth)
    return sorted(taken)


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class AIMv2Encoder(nn.Module):
    """The AIMv2 ViT. State-dict keys equal Apple's original layout (``preprocessor.*``, ``trunk.*``).

    The constructor initialises it as for training (:meth:`init_weights`), unless built on the meta device.

    Input: normalized float pixels ``(B, C, H, W)``, ``H`` and ``W`` multiples of the patch size; PIL images
    and arrays are made into those by ``aimv2.processor.AIMv2ImageProcessor`` (passing one here is a
    TypeError). :attr:`pos_embed_antialias` picks how a learned position table is resized for another
    resolution (timm's kernel by default)."""

    def __init__(self, cfg: EncoderConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        with _building_children():
            self.preprocessor = ViTPreprocessor(cfg)
            self.trunk = Transformer(cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, backend)
        _init_unless_nested(self)

    @property
    def pos_embed_antialias(self) -> bool:
        """Whether a learned position table is resized with torch's antialiased bicubic kernel (True, the
        default: timm's ``resample_abs_pos_embed``, so features at other resolutions match timm's AIMv2 models)
        or the plain one (False: this encoder's behaviour before, kept for features computed with it). A
        runtime setting like the backend: not saved with the weights, and without effect at ``image_size``
        square or for the sin-cos table. :func:`aimv2.layers.resize_pos_embed` says what differs."""
        return self.preprocessor.antialias

    @pos_embed_antialias.setter
    def pos_embed_antialias(self, value: bool) -> None:
        self.preprocessor.antialias = _check_flag("pos_embed_antialias", value)

    def _check_images(self, images: object) -> None:
        c = self.cfg
        if not isinstance(images, torch.Tensor):
            kind = type(images)
            raise TypeError(f"images must be a float tensor (B, {c.in_chans}, H, W) of normalized pixels, got "
                            f"{kind.__module__}.{kind.__qualname__}; make it from PIL images or arrays with "
                            f"{_PROCESSOR}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor of normalized pixels, got {images.dtype}; make it from "
                            f"raw pixels with {_PROCESSOR}")
        if images.dim() != 4 or images.shape[1] != c.in_chans:
            raise ValueError(f"images must have shape (B, {c.in_chans}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % c.patch_size or images.shape[-1] % c.patch_size:
            raise ValueError(f"images must have sides that are multiples of {c.patch_size}, "
                             f"got {tuple(images.shape[-2:])}")

    def forward(self, images: torch.Tensor, prefix_lens: torch.Tensor | None = None) -> torch.Tensor:
        """``images (B, C, H, W)`` float -> features ``(B, N, D)`` after the final RMSNorm, ``N = (H/p)(W/p)``.

        Any multiple of the patch size works: a learned position embedding is resized bicubically on its 2-D
        grid when the image is not ``image_size`` square (:attr:`pos_embed_antialias`); the sin-cos one is
        computed for the grid.

        ``prefix_lens`` (int ``(B,)``) applies AIMv2's pre-training prefix attention (query i sees key j iff
        ``j <= i`` or ``j < prefix_lens[b]``); None gives bidirectional attention, as at inference.

        Raises TypeError for anything but a float tensor (a PIL image, an array: see
        ``aimv2.processor.AIMv2ImageProcessor``), ValueError for a wrong shape.
        """
        self._check_images(images)
        x = self.preprocessor(images)
        return self.trunk(x, prefix_lens, causal=prefix_lens is not None)

    def forward_intermediates(self, images: torch.Tensor, indices: int | Sequence[int] | None = None, *,
                              norm: bool = False, output_fmt: str = "NLC", intermediates_only: bool = False,
                              stop_early: bool = False, prefix_lens: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """The outputs of chosen blocks, with timm's name and meaning (``VisionTransformer.forward_intermediates``).

        Args:
            images: as :meth:`forward`.
            indices: which blocks (:func:`feature_take_indices`): None every block, an int ``n`` the last
                ``n``, a sequence of block indices (negative from the end). The intermediates come in block
                order, each block once.
            norm: apply the final RMSNorm (``trunk.post_trunk_norm``) to each intermediate, so that the last
                block's equals :meth:`forward`'s output. Default False, as timm.
            output_fmt: ``"NLC"`` (default here): ``(B, N, D)`` tokens in raster order; ``"NCHW"``:
                ``(B, D, H/p, W/p)``, contiguous (timm's default). The final features stay ``(B, N, D)``.
            intermediates_only: return the list only (the final norm is then not computed).
            stop_early: run no block after the last one asked for. The final features are then the final norm
                of that block's output (as timm), not :meth:`forward`'s unless it is the last block.
            prefix_lens: as :meth:`forward` (prefix attention; None: bidirectional).

        Returns:
            ``(final_features (B, N, D), [intermediate, ...])``, or the list alone with ``intermediates_only``.
            Without ``stop_early`` the final features equal :meth:`forward`'s, and each intermediate is
            exactly the block's output in :meth:`forward` (the same modules, called the same way).

        Keyword-only after ``indices``: timm's positional order differs (its third argument is
        ``return_prefix_tokens``; this encoder has no prefix tokens), so a positional call could not mean the
        same in both.

        Raises:
            TypeError: ``images`` not a float tensor (see :meth:`forward`), ``indices`` of the wrong type, a
                flag that is not a bool, ``output_fmt`` not a str.
            ValueError: a bad image shape, ``indices`` out of range or empty, an unknown ``output_fmt``.
        """
        c = self.cfg
        take = feature_take_indices(c.depth, indices)
        norm = _check_flag("norm", norm)
        intermediates_only = _check_flag("intermediates_only", intermediates_only)
        stop_early = _check_flag("stop_early", stop_early)
        if not isinstance(output_fmt, str):
            raise TypeError(f"output_fmt must be a str, one of {OUTPUT_FORMATS}, got {type(output_fmt).__name__}")
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
        self._check_images(images)
        causal = prefix_lens is not None
        wanted, last = set(take), take[-1]
        blocks = self.trunk.blocks
        x = self.preprocessor(images)
        intermediates = []
        for i, block in enumerate(blocks):
            if stop_early and i > last:
                break
            x = block(x, prefix_lens, causal)
            if i in wanted:
                intermediates.append(self.trunk.post_trunk_norm(x) if norm else x)
        if output_fmt == "NCHW":
            b, h, w = images.shape[0], images.shape[-2] // c.patch_size, images.shape[-1] // c.patch_size
            intermediates = [y.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.trunk.post_trunk_norm(x), intermediates

    def init_weights(self) -> None:
        """The trunk's (xavier-uniform linears, unit norms), then the preprocessor's."""
        self.trunk.init_weights()
        self.preprocessor.init_weights()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, image_size: int | None = None, backend: str = "auto",
                        config: str | AIMv2Config | EncoderConfig | None = None,
                        drop_head: bool = False) -> "AIMv2Encoder":
        """Load released weights from a folder (``config.json`` + ``model.safetensors``) in transformers'
        ``Aimv2VisionModel`` layout, Apple's original layout or timm's, or a bare weights file: the encoder in
        eval mode, fp32 on the CPU. Arguments and errors: :func:`aimv2.pretrained.load_pretrained_encoder`. A
        training run folder of ``aimv2-train`` is refused (ValueError): load it with
        :func:`aimv2.checkpoint.load_trained_encoder`."""
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, one of {BACKENDS}, got {type(backend).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        cfg, state = read_pretrained(path, image_size=image_size, config=config, drop_head=drop_head)
        with torch.device("meta"):
            encoder = cls(cfg, backend=backend)
        encoder.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in list(encoder.parameters()) + list(encoder.buffers())):
            raise RuntimeError("AIMv2Encoder.from_pretrained: the encoder has tensors the checkpoint did not fill")
        return encoder.eval()


class AIMv2Decoder(nn.Module):
    """Causal decoder over ``[image_proj(features) (N) || start token (1) || caption embeddings (T)]``.
    Initialised by :meth:`init_weights` in the constructor (unless on the meta device)."""

    def __init__(self, cfg: DecoderConfig, enc_dim: int, patch_dim: int, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.image_proj = nn.Linear(enc_dim, cfg.dim, bias=True)
        self.text_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.start_token = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.text_pos_embed = nn.Parameter(torch.empty(1, cfg.context_length + 1, cfg.dim))
        with _building_children():
            self.trunk = Transformer(cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, backend)
        self.pixel_head = nn.Linear(cfg.dim, patch_dim, bias=False)
        self.text_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        _init_unless_nested(self)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``features (B, N, D_enc)``, ``tokens (B, T)`` int -> hidden ``(B, N + 1 + T, dim)`` (final-normed)."""
        b = features.shape[0]
        text = torch.cat([self.start_token.expand(b, -1, -1), self.text_embedding(tokens)], dim=1)
        text = text + self.text_pos_embed
        x = torch.cat([self.image_proj(features), text.to(features.dtype)], dim=1)
        return self.trunk(x, causal=True)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Trunk as the encoder's; embeddings and start token N(0, 0.02), text positions N(0, 0.01); the heads
        fan-in truncated normal scaled by 1 / (1 + depth)."""
        self.trunk.init_weights()  # the image projection keeps torch's default Linear init, as in training
        nn.init.normal_(self.text_embedding.weight, std=0.02)
        nn.init.normal_(self.start_token, std=0.02)
        nn.init.normal_(self.text_pos_embed, std=0.01)
        for head in (self.pixel_head, self.text_head):
            fan_in_trunc_normal_(head.weight, scale=1.0 / (1 + self.cfg.depth))


@dataclass
class AIMv2Output:
    loss: torch.Tensor  # L_text + img_loss_weight * L_img, fp32 scalar
    loss_img: torch.Tensor
    loss_txt: torch.Tensor
    prefix_lens: torch.Tensor | None


class AIMv2(nn.Module):
    """Encoder + decoder + the AIMv2 objective. The model calls only the public ``aimv2_kernels`` ops."""

    def __init__(self, cfg: AIMv2Config):
        super().__init__()
        self.cfg = cfg
        with _building_children():  # initialised once, below, in the order training always used
            self.encoder = AIMv2Encoder(cfg.encoder, cfg.backend)
            self.decoder = AIMv2Decoder(cfg.decoder, cfg.encoder.dim, cfg.encoder.patch_dim, cfg.backend)
        _init_unless_nested(self)

    def init_weights(self) -> None:
        """The encoder's, then the decoder's."""
        self.encoder.init_weights()
        self.decoder.init_weights()

    def sample_prefix_lens(self, batch: int, device: torch.device, generator: torch.Generator | None = None,
                           num_patches: int | None = None) -> torch.Tensor:
        """Per-sample prefix lengths, uniform in ``{1, ..., N-1}`` (int64 ``(B,)``); N defaults to the preset's."""
        n = self.cfg.encoder.num_patches if num_patches is None else num_patches
        return torch.randint(1, n, (batch,), device=device, generator=generator)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                prefix_lens: torch.Tensor | None = None) -> AIMv2Output:
        """Loss of a batch.

        Args:
            images: ``(B, C, H, W)`` float, normalized: the encoder input and the pixel targets.
            tokens: ``(B, T)`` int64 caption ids, right-padded with ``pad_id`` (ignored by the loss).
            prefix_lens: int ``(B,)`` in ``[0, N]``. None in training mode draws them per sample,
                uniform in ``{1, ..., N-1}``; None in eval mode uses a bidirectional encoder and counts
                every target patch.
        """
        enc, dec = self.cfg.encoder, self.cfg.decoder
        if tokens.dim() != 2 or tokens.shape[1] != dec.context_length:
            raise ValueError(f"tokens must have shape (B, {dec.context_length}), got {tuple(tokens.shape)}")
        if tokens.shape[0] != images.shape[0]:
            raise ValueError(f"tokens has batch {tokens.shape[0]} but images has batch {images.shape[0]}")
        n, t = (images.shape[-2] // enc.patch_size) * (images.shape[-1] // enc.patch_size), dec.context_length
        if prefix_lens is None and self.training:
            prefix_lens = self.sample_prefix_lens(images.shape[0], images.device, num_patches=n)
        hidden = self.decoder(self.encoder(images, prefix_lens), tokens)  # (B, N + 1 + T, dim)
        # Image position i predicts patch i + 1; the last image position has no target.
        pred = self.decoder.pixel_head(hidden[:, : n - 1])
        loss_img = patch_mse_loss(pred.to(images.dtype), images, enc.patch_size, prefix_lens, target_offset=1,
                                  backend=self.cfg.backend)
        # The start token's output predicts caption token 0; caption token t predicts t + 1.
        text_hidden = hidden[:, n: n + t]
        loss_txt = linear_cross_entropy(text_hidden, self.decoder.text_head.weight.to(text_hidden.dtype), tokens,
                                        ignore_index=dec.pad_id, backend=self.cfg.backend)
        loss = loss_txt + self.cfg.img_loss_weight * loss_img
        return AIMv2Output(loss=loss, loss_img=loss_img, loss_txt=loss_txt, prefix_lens=prefix_lens)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
