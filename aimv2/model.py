"""The AIMv2 encoder (with the released checkpoints' module names), the causal multimodal decoder and the loss."""
from __future__ import annotations

import os
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
    :meth:`init_weights`."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
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
            # Another resolution: the learned [1, g*g, D] table is resized bicubically on its 2-D grid.
            return x + (self.pos_embed if grid == (g, g) else resize_pos_embed(self.pos_embed, (g, g), grid))
        pos = sincos_pos_embed(*grid, self.cfg.dim, device=x.device)
        return x + pos.to(x.dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The patch embedding's (:meth:`PatchEmbed.init_weights`), then a learned position table N(0, 0.02)."""
        self.patchifier.init_weights()
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)


class AIMv2Encoder(nn.Module):
    """The AIMv2 ViT. State-dict keys equal Apple's original layout (``preprocessor.*``, ``trunk.*``).

    The constructor initialises it as for training (:meth:`init_weights`), unless built on the meta device."""

    def __init__(self, cfg: EncoderConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        with _building_children():
            self.preprocessor = ViTPreprocessor(cfg)
            self.trunk = Transformer(cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, backend)
        _init_unless_nested(self)

    def forward(self, images: torch.Tensor, prefix_lens: torch.Tensor | None = None) -> torch.Tensor:
        """``images (B, C, H, W)`` float -> features ``(B, N, D)`` after the final RMSNorm, ``N = (H/p)(W/p)``.

        Any multiple of the patch size works: a learned position embedding is resized bicubically on its 2-D
        grid when the image is not ``image_size`` square; the sin-cos one is computed for the grid.

        ``prefix_lens`` (int ``(B,)``) applies AIMv2's pre-training prefix attention (query i sees key j iff
        ``j <= i`` or ``j < prefix_lens[b]``); None gives bidirectional attention, as at inference.
        """
        c = self.cfg
        if images.dim() != 4 or images.shape[1] != c.in_chans:
            raise ValueError(f"images must have shape (B, {c.in_chans}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % c.patch_size or images.shape[-1] % c.patch_size:
            raise ValueError(f"images must have sides that are multiples of {c.patch_size}, "
                             f"got {tuple(images.shape[-2:])}")
        x = self.preprocessor(images)
        return self.trunk(x, prefix_lens, causal=prefix_lens is not None)

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
