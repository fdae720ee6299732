"""``AIMv2Config``: encoder and decoder shapes, the loss weight, the backend, and the named presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def swiglu_hidden(dim: int) -> int:
    """MLP hidden size of AIMv2's SwiGLU: ``256 * ceil(int(8 * dim / 3) / 256)`` (2816 for 1024)."""
    return 256 * math.ceil(int(8 * dim / 3) / 256)


def _check_fields(what: str, config: Any, ints: tuple[str, ...]) -> None:
    """Positive-int fields and a finite positive ``norm_eps``, checked before any arithmetic on them (ValueError
    naming the field; ``patch_size=0`` would otherwise be a ZeroDivisionError)."""
    for name in ints:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} {name} must be a positive int, got {value!r}")
    eps = config.norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{what} norm_eps must be a finite positive float, got {eps!r}")


@dataclass
class EncoderConfig:
    """The ViT encoder (no class token). Defaults are AIMv2-L at 224 px."""
    image_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    dim: int = 1024
    depth: int = 24
    num_heads: int = 8
    mlp_hidden: int | None = None  # None: swiglu_hidden(dim)
    norm_eps: float = 1e-5
    pos_embed: str = "learned"  # "learned" ([1, N, D] parameter) or "sincos" (fixed, native resolution)

    def __post_init__(self):
        _check_fields("encoder", self, ("image_size", "patch_size", "in_chans", "dim", "depth", "num_heads"))
        if self.mlp_hidden is None:
            self.mlp_hidden = swiglu_hidden(self.dim)
        _check_fields("encoder", self, ("mlp_hidden",))
        if self.dim % self.num_heads:
            raise ValueError(f"encoder dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        """Values per patch, ``C * p * p`` (588 for RGB at patch 14)."""
        return self.in_chans * self.patch_size ** 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class DecoderConfig:
    """The causal multimodal decoder: the same shape for every encoder size in the paper."""
    dim: int = 1024
    depth: int = 12
    num_heads: int = 8
    mlp_hidden: int | None = None
    norm_eps: float = 1e-5
    vocab_size: int = 32000
    context_length: int = 77  # caption tokens; the text part of the sequence is 1 + context_length
    pad_id: int = 1  # SigLIP's pad (= eos) id, ignored by the text loss

    def __post_init__(self):
        _check_fields("decoder", self, ("dim", "depth", "num_heads", "vocab_size", "context_length"))
        if self.mlp_hidden is None:
            self.mlp_hidden = swiglu_hidden(self.dim)
        _check_fields("decoder", self, ("mlp_hidden",))
        if self.dim % self.num_heads:
            raise ValueError(f"decoder dim {self.dim} is not divisible by num_heads {self.num_heads}")


@dataclass
class AIMv2Config:
    """Everything that defines an AIMv2 model. ``backend`` picks the op backend for the whole model."""
    name: str = "custom"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    img_loss_weight: float = 0.4  # L = L_text + 0.4 * L_img
    backend: str = "auto"
    peak_lr: float = 1e-3  # recipe value for this size (paper Table A1)
    warmup_steps: int | None = None  # recipe warm-up (the paper: 12,500 for every size); None: 10% of the run

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "AIMv2Config":
        """A preset by name (see :data:`PRESETS`); keyword overrides replace top-level fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        config = PRESETS[name]()
        return dataclasses.replace(config, **overrides) if overrides else config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AIMv2Config":
        d = dict(d)
        return cls(encoder=EncoderConfig(**d.pop("encoder")), decoder=DecoderConfig(**d.pop("decoder")), **d)


PAPER_WARMUP_STEPS = 12_500  # linear warm-up of every released size (paper Table A1)

_SIZES = {  # width, heads, peak LR (depth 24 and head_dim 128 for all)
    "large": (1024, 8, 1e-3),
    "huge": (1536, 12, 8e-4),
    "1B": (2048, 16, 8e-4),
    "3B": (3072, 24, 4e-4),
}


def _released(size: str, image_size: int):
    dim, heads, lr = _SIZES[size]

    def make() -> AIMv2Config:
        return AIMv2Config(name=f"aimv2-{size}-patch14-{image_size}",
                           encoder=EncoderConfig(image_size=image_size, dim=dim, depth=24, num_heads=heads),
                           decoder=DecoderConfig(), peak_lr=lr, warmup_steps=PAPER_WARMUP_STEPS)
    return make


def _small(name: str, image_size: int, dim: int, depth: int, heads: int, dec_depth: int, context: int):
    def make() -> AIMv2Config:
        # Byte-level tokenizer (vocab 259, pad = eos = 1) for the bundled data.
        return AIMv2Config(
            name=name,
            encoder=EncoderConfig(image_size=image_size, dim=dim, depth=depth, num_heads=heads),
            decoder=DecoderConfig(dim=dim, depth=dec_depth, num_heads=heads, vocab_size=259,
                                  context_length=context),
            peak_lr=2e-3)
    return make


PRESETS = {f"aimv2-{size}-patch14-{res}": _released(size, res) for size in _SIZES for res in (224, 336, 448)}
PRESETS["aimv2-large-patch14-native"] = lambda: dataclasses.replace(
    _released("large", 224)(), name="aimv2-large-patch14-native",
    encoder=EncoderConfig(image_size=224, dim=1024, depth=24, num_heads=8, pos_embed="sincos"))
# Apple's code also defines a base size (ml-aim's aimv2_base: 768 wide, 12 blocks, 6 heads, SwiGLU 2048) without
# released weights or a recipe: the LR and warm-up here are the family's (an assumption), the decoder the paper's.
PRESETS["aimv2-base-patch14-224"] = lambda: AIMv2Config(
    name="aimv2-base-patch14-224",
    encoder=EncoderConfig(image_size=224, dim=768, depth=12, num_heads=6),
    decoder=DecoderConfig(), peak_lr=1e-3, warmup_steps=PAPER_WARMUP_STEPS)
# Small presets: "demo" trains on 2 CPU cores in a few minutes; "tiny" is for tests.
PRESETS["aimv2-demo"] = _small("aimv2-demo", image_size=112, dim=128, depth=4, heads=2, dec_depth=2, context=112)
PRESETS["aimv2-tiny"] = _small("aimv2-tiny", image_size=56, dim=64, depth=2, heads=2, dec_depth=1, context=24)
