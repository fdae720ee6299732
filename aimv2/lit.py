"""AIMv2 LiT: Apple's ``aimv2-large-patch14-224-lit`` (the AIMv2-L vision tower with an attention-pooling head,
a CLIP-style causal text tower, two projections and a logit scale) for zero-shot classification and retrieval.

The model (:class:`AIMv2LiT`) is built from this package's parts: the vision tower *is* an
:class:`aimv2.model.AIMv2Encoder` (:class:`LiTImageEncoder` adds the pooling head) and the text tower is an
:class:`aimv2.layers.Transformer` run with causal attention (``aimv2_kernels.prefix_attention(..., causal=True)``).
Its state-dict keys are Apple's original ones (ml-aim's ``AIMv2LiT``)::

    image_encoder.{preprocessor, trunk}.*             the AIMv2 encoder (aimv2.layouts' "apple" keys)
    image_encoder.head.{cls_token, k, v, linear}      attention pooling: one learned query, k/v projections
    text_encoder.preprocessor.{text_embedding.weight [V, D], positional_embedding [T, D]}
    text_encoder.trunk.{blocks.i.*, post_trunk_norm}   pre-norm RMSNorm blocks, SwiGLU, no biases
    image_projector.weight, text_projector.weight     bias-free projections to the joint space
    log_logit_scale                                    scalar; the scale is exp(clamp(., 0, log(max_logit_scale)))

What the forward computes (that of transformers' ``Aimv2Model`` and of ml-aim, checked in tests/test_lit.py):

- **Image**: encoder features ``(B, N, D)`` after the final RMSNorm; the head attends from its learned
  ``cls_token`` (used as the query directly: there is no query projection) to ``k(x)``, ``v(x)`` with the
  vision tower's head count and the usual ``head_dim ** -0.5`` scale; the heads are concatenated and go through
  ``linear`` (the only linear with a bias). There is no normalisation in the head.
- **Text**: token embedding + learned position embedding, causal pre-norm blocks, the final RMSNorm, then the
  hidden state at the *first* EOS id of each row (``argmax(ids == eos)``; padding after it never reaches it).
- **Projections** are applied to the pooled vectors; :meth:`AIMv2LiT.encode_image` / :meth:`~AIMv2LiT.encode_text`
  return them *unnormalised*, as transformers' ``get_image_features`` / ``get_text_features`` do
  (``normalize=True`` L2-normalises). :meth:`AIMv2LiT.forward` L2-normalises both and returns
  ``logits_per_text = exp(clamp(log_logit_scale, 0, log 100)) * text @ image.T`` and its transpose.

Where transformers 5.x differs: its text tower is causal only when an ``attention_mask`` is passed *and* the
attention implementation materialises the mask (eager, or SDPA with padding in the batch). Called without a
mask, or with SDPA (the default) on a batch without padding, it attends bidirectionally, which is not how the
model was trained (ml-aim's text attention is ``is_causal=True``). This module is always causal, as ml-aim.

Loading (:meth:`AIMv2LiT.from_pretrained`): a folder with ``config.json`` + ``model.safetensors`` (or a
``pytorch_model.bin`` read with ``weights_only=True``, or a sharded index) in transformers' ``Aimv2Model`` layout
(``vision_model.*``, ``text_model.*``, ``visual_projection``, ``text_projection``, ``logit_scale``;
``model_type: "aimv2"``) or in Apple's layout (the keys above), or a bare weights file; strict: every tensor
must be there with its shape and nothing else may be (:class:`~aimv2.weights.CheckpointMismatchError` lists
them).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EncoderConfig, _check_fields
from .layers import Transformer, _building_children, _init_unless_nested, _xavier_and_ones
from .layouts import (
    _HEAD_DIM,
    _POS,
    MAX_DEPTH,
    MAX_DIM,
    MAX_MLP_HIDDEN,
    MAX_NORM_EPS,
    WeightsError,
    _float_field,
    _int_field,
    _layout_names,
    _refuse_unsupported,
    _spec_from_json,
    _spec_from_shapes,
    check_spec,
    encoder_shapes,
)
from .model import AIMv2Encoder
from .weights import CheckpointMismatchError, _read_json, _read_weights, _resolve

__all__ = ["LiTConfig", "TextConfig", "LiTOutput", "AIMv2LiT", "LiTImageEncoder", "LiTTextEncoder",
           "AttentionPoolingHead", "LIT_LAYOUTS", "detect_lit_layout", "lit_to_layout", "lit_from_layout",
           "lit_shapes", "lit_config_json", "read_lit_pretrained"]

LIT_LAYOUTS = ("hf", "apple")

MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 16
MAX_LOGIT_SCALE = 1e6


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------

def _positive_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


@dataclass
class TextConfig:
    """The causal text tower. Defaults are the released LiT's (CLIP's BPE vocabulary and context)."""
    vocab_size: int = 49408
    dim: int = 768
    depth: int = 12
    num_heads: int = 6
    mlp_hidden: int = 2048
    context_length: int = 77
    eos_id: int = 49407
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_fields("text", self, ("vocab_size", "dim", "depth", "num_heads", "mlp_hidden", "context_length"))
        if isinstance(self.eos_id, bool) or not isinstance(self.eos_id, int) or not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"text eos_id must be an int in [0, vocab_size={self.vocab_size}), got {self.eos_id!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"text dim {self.dim} is not divisible by num_heads {self.num_heads}")


def _lit_vision_default() -> EncoderConfig:
    return EncoderConfig(image_size=224, patch_size=14, dim=1024, depth=24, num_heads=8, mlp_hidden=2816)


@dataclass
class LiTConfig:
    """The whole LiT model. Defaults are ``aimv2-large-patch14-224-lit``: AIMv2-L at 224 px (the head uses the
    vision tower's 8 heads), a 768-wide 12-block text tower with 6 heads, a 768-d joint space, logit scale at
    most 100."""
    vision: EncoderConfig = field(default_factory=_lit_vision_default)
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 768
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if not isinstance(self.vision, EncoderConfig):
            raise TypeError(f"vision must be an EncoderConfig, got {type(self.vision).__name__}")
        if not isinstance(self.text, TextConfig):
            raise TypeError(f"text must be a TextConfig, got {type(self.text).__name__}")
        _positive_int("projection_dim", self.projection_dim)
        s = self.max_logit_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s >= 1.0):
            raise ValueError(f"max_logit_scale must be a finite float >= 1, got {s!r}")


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------

class AttentionPoolingHead(nn.Module):
    """One learned query (``cls_token``, not projected) attending to ``k(x)``, ``v(x)`` over ``num_heads``
    heads, then ``linear`` (with bias): ``(B, N, D) -> (B, D)``. Apple's ``AttentionPoolingClassifier`` of the
    LiT (no batch norm, one query) and transformers' ``Aimv2AttentionPoolingHead``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"head dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.linear = nn.Linear(dim, dim, bias=True)
        _init_unless_nested(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        """``k``, ``v``, ``linear`` xavier-uniform (bias 0), ``cls_token`` N(0, 0.02)."""
        _xavier_and_ones(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.cls_token.expand(b, -1, -1).reshape(b, 1, h, d // h).transpose(1, 2)
        k = self.k(x).view(b, n, h, d // h).transpose(1, 2)
        v = self.v(x).view(b, n, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.to(k.dtype), k, v)  # (B, H, 1, hd)
        return self.linear(out.transpose(1, 2).reshape(b, d))


class LiTImageEncoder(AIMv2Encoder):
    """The LiT's vision tower: an :class:`~aimv2.model.AIMv2Encoder` (``forward`` still returns the features
    ``(B, N, D)``) with the attention-pooling ``head``; :meth:`pool` gives the pooled ``(B, D)``."""

    def __init__(self, cfg: EncoderConfig, backend: str = "auto"):
        with _building_children():
            super().__init__(cfg, backend)
            self.head = AttentionPoolingHead(cfg.dim, cfg.num_heads)
        _init_unless_nested(self)

    def init_weights(self) -> None:
        """The encoder's, then the head's."""
        super().init_weights()
        self.head.init_weights()

    def pool(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, C, H, W)`` -> the pooled ``(B, D)`` (before the LiT's projection)."""
        return self.head(self(images))

    @classmethod
    def from_pretrained(cls, *args: object, **kwargs: object) -> LiTImageEncoder:
        """Not supported: load the whole model with :meth:`AIMv2LiT.from_pretrained` (its ``image_encoder`` is
        this tower), or the bare trunk with ``AIMv2Encoder.from_pretrained(path, drop_head=True)``."""
        raise TypeError("LiTImageEncoder.from_pretrained is not supported: use AIMv2LiT.from_pretrained(path) "
                        "(its .image_encoder), or AIMv2Encoder.from_pretrained(path, drop_head=True) for the trunk")


class TextPreprocessor(nn.Module):
    """Token embedding plus a learned ``[T, D]`` position embedding (Apple's ``TextPreprocessor``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.dim))
        _init_unless_nested(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Token embedding N(0, 0.02), positions N(0, 0.01) (CLIP's)."""
        nn.init.normal_(self.text_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_embedding(ids) + self.positional_embedding[: ids.shape[1]]


class LiTTextEncoder(nn.Module):
    """The causal text tower: ``ids (B, S)`` -> the final-normed hidden state at each row's first EOS ``(B, D)``."""

    def __init__(self, cfg: TextConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        with _building_children():
            self.preprocessor = TextPreprocessor(cfg)
            self.trunk = Transformer(cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, backend)
        _init_unless_nested(self)

    def init_weights(self) -> None:
        """The trunk's (xavier-uniform linears, unit norms), then the embeddings'."""
        self.trunk.init_weights()
        self.preprocessor.init_weights()

    def check_ids(self, ids: torch.Tensor) -> None:
        """ValueError unless ``ids`` is an integer ``(B, S)`` tensor with ``1 <= S <= context_length``, values in
        ``[0, vocab_size)`` and an EOS id in every row (the tower pools at the first one)."""
        c = self.cfg
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor of shape (B, S), got {ids.dtype} {tuple(ids.shape)}")
        if not 1 <= ids.shape[1] <= c.context_length:
            raise ValueError(f"ids must have 1 to {c.context_length} tokens per row (the context length), "
                             f"got {ids.shape[1]}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size):
            raise ValueError(f"ids must lie in [0, {c.vocab_size}), got values in [{int(ids.min())}, "
                             f"{int(ids.max())}]")
        has_eos = (ids == c.eos_id).any(dim=1)
        if not bool(has_eos.all()):
            rows = has_eos.logical_not().nonzero().flatten().tolist()
            raise ValueError(f"every row of ids must contain the EOS id {c.eos_id} (the text tower pools there); "
                             f"rows without it: {rows[:8]}{' ...' if len(rows) > 8 else ''}")

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """All hidden states ``(B, S, D)`` after the final RMSNorm (causal attention)."""
        self.check_ids(ids)
        return self.trunk(self.preprocessor(ids), causal=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.features(ids)
        first_eos = (ids == self.cfg.eos_id).int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_eos]


@dataclass
class LiTOutput:
    """:meth:`AIMv2LiT.forward`'s result: the scaled cosine similarities and the L2-normalised embeddings."""
    logits_per_image: torch.Tensor  # (B_img, B_txt)
    logits_per_text: torch.Tensor  # (B_txt, B_img)
    image_embeds: torch.Tensor  # (B_img, P), unit norm
    text_embeds: torch.Tensor  # (B_txt, P), unit norm


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


class AIMv2LiT(nn.Module):
    """The LiT model (module names = Apple's keys; see the module docstring). Built directly, it is randomly
    initialised (encoder as for training, head and text tower as CLIP's, ``log_logit_scale = log(1 / 0.07)``);
    :meth:`from_pretrained` loads released weights."""

    def __init__(self, cfg: LiTConfig | None = None, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg = LiTConfig() if cfg is None else cfg
        if not isinstance(cfg, LiTConfig):
            raise TypeError(f"cfg must be a LiTConfig, got {type(cfg).__name__}")
        with _building_children():
            self.image_encoder = LiTImageEncoder(cfg.vision, backend)
            self.text_encoder = LiTTextEncoder(cfg.text, backend)
        self.image_projector = nn.Linear(cfg.vision.dim, cfg.projection_dim, bias=False)
        self.text_projector = nn.Linear(cfg.text.dim, cfg.projection_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.empty(()))
        _init_unless_nested(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Both towers', projections N(0, width^-1/2), ``log_logit_scale = log(1 / 0.07)`` (CLIP's)."""
        self.image_encoder.init_weights()
        self.text_encoder.init_weights()
        nn.init.normal_(self.image_projector.weight, std=self.cfg.vision.dim ** -0.5)
        nn.init.normal_(self.text_projector.weight, std=self.cfg.text.dim ** -0.5)
        self.log_logit_scale.fill_(math.log(1 / 0.07))

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(clamp(log_logit_scale, 0, log(max_logit_scale)))``, a 0-d tensor (about 100 when released)."""
        return self.log_logit_scale.clamp(0.0, math.log(self.cfg.max_logit_scale)).exp()

    def encode_image(self, pixels: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """``pixels (B, 3, H, W)`` (normalised with CLIP's mean/std, as the released preprocessing does) ->
        ``(B, projection_dim)``: the projected pooled features, unnormalised as transformers'
        ``get_image_features``; ``normalize=True`` divides by the L2 norm."""
        out = self.image_projector(self.image_encoder.pool(pixels))
        return _unit(out) if normalize else out

    def encode_text(self, ids: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """``ids (B, S)`` int (BOS, tokens, EOS, any padding; ``S <= context_length``) -> ``(B, projection_dim)``:
        the projected hidden state at each row's first EOS, unnormalised as transformers' ``get_text_features``;
        ``normalize=True`` divides by the L2 norm. ValueError when a row has no EOS or an id is out of range."""
        out = self.text_projector(self.text_encoder(ids))
        return _unit(out) if normalize else out

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> LiTOutput:
        """Both towers, L2-normalised, and the scaled similarities (transformers' ``Aimv2Model.forward``)."""
        image = _unit(self.encode_image(pixels))
        text = _unit(self.encode_text(ids))
        logits_per_text = (self.logit_scale.to(text.dtype) * text) @ image.t()
        return LiTOutput(logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                         image_embeds=image, text_embeds=text)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, backend: str = "auto") -> AIMv2LiT:
        """Load a LiT checkpoint (transformers' ``Aimv2Model`` layout or Apple's; see the module docstring):
        the model fp32 on the CPU, in eval mode.

        Shapes come from ``config.json`` (transformers' ``Aimv2Config``: ``vision_config``, ``text_config``,
        ``projection_dim``, ``max_logit_scale``) where it says them and from the tensors otherwise; without a
        config, head counts are ``width / 128`` (AIMv2's head_dim), norm eps 1e-5, the EOS id the last id of the
        vocabulary (49407 in CLIP's), max logit scale 100.

        Raises:
            FileNotFoundError: ``path`` (or a weights file in a folder) does not exist.
            CheckpointMismatchError: (a WeightsError) keys missing or unexpected, or shapes that differ, all listed.
            WeightsError: (a ValueError) unreadable files, a malformed config, a vision-only or unknown layout.
        """
        cfg, state = read_lit_pretrained(path)
        with torch.device("meta"):
            model = cls(cfg, backend=backend)
        model.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            raise RuntimeError("AIMv2LiT.from_pretrained: the model has tensors the checkpoint did not fill")
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike[str], layout: str = "hf") -> Path:
        """Write ``path/config.json`` + ``path/model.safetensors`` in ``layout`` (``"hf"``: loadable by
        ``transformers.Aimv2Model.from_pretrained``; ``"apple"``: Apple's keys, the same ``config.json``).
        Tensors keep their dtype; :meth:`from_pretrained` reads both back exactly."""
        _check_lit_layout(layout)
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise ValueError(f"path {str(path)!r} is a file; save_pretrained writes a folder")
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu") for k, v in self.state_dict().items()}
        tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in lit_to_layout(state, layout).items()}
        dtype = str(self.log_logit_scale.dtype).replace("torch.", "")
        (out / "config.json").write_text(json.dumps(lit_config_json(self.cfg, dtype), indent=2) + "\n")
        from safetensors.torch import save_file
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out


# ---------------------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------------------

_HEAD_HF = {"cls_token": "cls_token", "k.weight": "k_proj.weight", "v.weight": "v_proj.weight",
            "linear.weight": "output_proj.weight", "linear.bias": "output_proj.bias"}
_TOP_HF = {"image_projector.weight": "visual_projection.weight", "text_projector.weight": "text_projection.weight",
           "log_logit_scale": "logit_scale",
           "text_encoder.preprocessor.text_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "text_encoder.preprocessor.positional_embedding": "text_model.embeddings.position_embedding.weight"}
_IMG, _TXT, _HEAD = "image_encoder.", "text_encoder.", "image_encoder.head."


def _check_lit_layout(layout: object) -> None:
    if not isinstance(layout, str) or layout not in LIT_LAYOUTS:
        raise ValueError(f"layout must be one of {LIT_LAYOUTS}, got {layout!r}")


def _hf_names(key: str) -> tuple[str, ...]:
    """transformers' key(s) of our tensor ``key`` (three for a fused ``qkv``)."""
    if key in _TOP_HF:
        return (_TOP_HF[key],)
    if key.startswith(_HEAD):
        return ("vision_model.head." + _HEAD_HF[key[len(_HEAD):]],)
    if key.startswith(_IMG):  # the encoder: aimv2.layouts' mapping of Aimv2VisionModel
        return tuple("vision_model." + n for n in _layout_names(key[len(_IMG):], "hf"))
    if key.startswith(_TXT + "trunk."):  # the text trunk has the vision trunk's names under text_model.
        return tuple("text_model." + n for n in _layout_names(key[len(_TXT):], "hf"))
    raise ValueError(f"no transformers name for LiT tensor {key!r}; aimv2.lit needs updating")


def lit_to_layout(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our (= Apple's) LiT state dict -> the same tensors under ``layout``'s names (views, nothing copied).

    ``"hf"`` splits each fused ``qkv [3D, D]`` into q/k/v and stores the vision position table ``[N, D]``;
    ``"apple"`` is the identity. Works on meta tensors (for the key/shape check)."""
    _check_lit_layout(layout)
    if layout == "apple":
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        names = _hf_names(key)
        if len(names) == 3:
            parts = t.chunk(3, dim=0)
        elif key == _IMG + _POS:
            parts = (t[0],)
        else:
            parts = (t,)
        out.update(zip(names, parts))
    return out


def lit_from_layout(tensors: Mapping[str, torch.Tensor], keys: Mapping[str, object],
                    layout: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`lit_to_layout` for our ``keys`` (e.g. a model's ``state_dict()``): q/k/v are
    concatenated along dim 0 and an HF vision position table ``[N, D]`` becomes ``[1, N, D]``. Expects every
    key :func:`lit_to_layout` produces (KeyError otherwise; :func:`read_lit_pretrained` checks first)."""
    _check_lit_layout(layout)
    if layout == "apple":
        return {k: tensors[k] for k in keys}
    out = {}
    for key in keys:
        parts = [tensors[n] for n in _hf_names(key)]
        if len(parts) == 3:
            out[key] = torch.cat(parts, dim=0)
        elif key == _IMG + _POS:
            out[key] = parts[0].unsqueeze(0)
        else:
            out[key] = parts[0]
    return out


def detect_lit_layout(keys: list[str] | tuple[str, ...] | set[str]) -> str:
    """``"hf"`` (``vision_model.`` / ``text_model.`` keys) or ``"apple"`` (``image_encoder.`` / ``text_encoder.``);
    WeightsError for anything else, naming a vision-only checkpoint as such."""
    hf = any(k.startswith(("vision_model.", "text_model.")) for k in keys)
    apple = any(k.startswith((_IMG, _TXT)) for k in keys)
    text = any(k.startswith(("text_model.", _TXT)) for k in keys)
    bare_encoder = any(k.startswith(("embeddings.", "encoder.layers.", "preprocessor.", "trunk.", "patch_embed.",
                                     "blocks.")) for k in keys)
    if (hf or apple or bare_encoder) and not text:
        raise WeightsError("the checkpoint has no text tower: a vision-only AIMv2; load it with "
                           "aimv2.model.AIMv2Encoder.from_pretrained")
    if hf != apple:
        return "hf" if hf else "apple"
    sample = ", ".join(sorted(keys)[:4])
    raise WeightsError(f"cannot tell the LiT key layout (transformers Aimv2Model or Apple's) of a state dict with "
                       f"keys {sample}, ...")


def lit_shapes(cfg: LiTConfig) -> dict[str, tuple[int, ...]]:
    """Keys (ours) and shapes of ``AIMv2LiT(cfg).state_dict()`` without building the model."""
    v, t, p = cfg.vision, cfg.text, cfg.projection_dim
    shapes = {_IMG + k: s for k, s in encoder_shapes(v).items()}
    shapes.update({_HEAD + "k.weight": (v.dim, v.dim), _HEAD + "v.weight": (v.dim, v.dim),
                   _HEAD + "cls_token": (1, 1, v.dim), _HEAD + "linear.weight": (v.dim, v.dim),
                   _HEAD + "linear.bias": (v.dim,)})
    shapes[_TXT + "preprocessor.text_embedding.weight"] = (t.vocab_size, t.dim)
    shapes[_TXT + "preprocessor.positional_embedding"] = (t.context_length, t.dim)
    trunk = EncoderConfig(image_size=14, patch_size=14, dim=t.dim, depth=t.depth, num_heads=t.num_heads,
                          mlp_hidden=t.mlp_hidden)
    shapes.update({_TXT + k: s for k, s in encoder_shapes(trunk).items() if k.startswith("trunk.")})
    shapes.update({"image_projector.weight": (p, v.dim), "text_projector.weight": (p, t.dim), "log_logit_scale": ()})
    return shapes


def lit_config_json(cfg: LiTConfig, dtype: str = "float32") -> dict:
    """transformers' ``Aimv2Config`` (``model_type: "aimv2"``) for ``cfg``, as :meth:`AIMv2LiT.save_pretrained`
    writes it."""
    v, t = cfg.vision, cfg.text
    return {"architectures": ["Aimv2Model"], "model_type": "aimv2", "projection_dim": cfg.projection_dim,
            "max_logit_scale": cfg.max_logit_scale, "logit_scale_init_value": math.log(1 / 0.07), "dtype": dtype,
            "vision_config": {"model_type": "aimv2_vision_model", "hidden_size": v.dim,
                              "intermediate_size": v.mlp_hidden, "num_hidden_layers": v.depth,
                              "num_attention_heads": v.num_heads, "num_channels": v.in_chans,
                              "image_size": v.image_size, "patch_size": v.patch_size, "rms_norm_eps": v.norm_eps,
                              "hidden_act": "silu", "qkv_bias": False, "mlp_bias": False, "use_head": True,
                              "is_native": v.pos_embed == "sincos"},
            "text_config": {"model_type": "aimv2_text_model", "vocab_size": t.vocab_size, "hidden_size": t.dim,
                            "intermediate_size": t.mlp_hidden, "num_hidden_layers": t.depth,
                            "num_attention_heads": t.num_heads, "max_position_embeddings": t.context_length,
                            "eos_token_id": t.eos_id, "rms_norm_eps": t.norm_eps, "hidden_act": "silu",
                            "qkv_bias": False, "mlp_bias": False}}


# ---------------------------------------------------------------------------------------------------------
# Reading a checkpoint
# ---------------------------------------------------------------------------------------------------------

def _text_spec_from_json(d: dict, source: str) -> dict:
    """TextConfig fields that ``text_config`` sets, type- and range-checked (WeightsError naming the field)."""
    if not isinstance(d, dict):
        raise WeightsError(f"{source}: text_config must be a JSON object, got {type(d).__name__}")
    _refuse_unsupported(d, f"{source} (text_config)")
    names = {"vocab_size": ("vocab_size", MAX_VOCAB), "hidden_size": ("dim", MAX_DIM),
             "num_hidden_layers": ("depth", MAX_DEPTH), "num_attention_heads": ("num_heads", MAX_DIM),
             "intermediate_size": ("mlp_hidden", MAX_MLP_HIDDEN),
             "max_position_embeddings": ("context_length", MAX_CONTEXT)}
    spec = {ours: _int_field(d[theirs], f"text_config.{theirs}", source, upper)
            for theirs, (ours, upper) in names.items() if d.get(theirs) is not None}
    eos = d.get("eos_token_id")
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if eos is not None:
        if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < MAX_VOCAB:
            raise WeightsError(f"{source}: text_config.eos_token_id must be one non-negative int, got {eos!r}")
        spec["eos_id"] = eos
    if d.get("rms_norm_eps") is not None:
        spec["norm_eps"] = _float_field(d["rms_norm_eps"], "text_config.rms_norm_eps", source, MAX_NORM_EPS)
    return spec


def _text_spec_from_shapes(sd: Mapping[str, torch.Tensor]) -> dict:
    spec: dict = {}
    emb = sd.get(_TXT + "preprocessor.text_embedding.weight")
    if emb is not None and emb.dim() == 2:
        spec.update(vocab_size=emb.shape[0], dim=emb.shape[1])
    pos = sd.get(_TXT + "preprocessor.positional_embedding")
    if pos is not None and pos.dim() == 2:
        spec["context_length"] = pos.shape[0]
    trunk = {k[len(_TXT):]: v for k, v in sd.items() if k.startswith(_TXT + "trunk.")}
    shape = _spec_from_shapes(trunk, "apple")
    if "depth" in shape:
        spec["depth"] = shape["depth"]
    if "mlp_hidden" in shape:
        spec["mlp_hidden"] = shape["mlp_hidden"]
    return spec


def _shape_check(sd: Mapping[str, torch.Tensor], cfg: LiTConfig, layout: str, source: str) -> None:
    meta = {k: torch.empty(s, device="meta") for k, s in lit_shapes(cfg).items()}
    expected = {k: tuple(v.shape) for k, v in lit_to_layout(meta, layout).items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [(k, tuple(sd[k].shape), s) for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
    if missing or unexpected or mismatched:
        v, t = cfg.vision, cfg.text
        what = (f"AIMv2LiT(vision dim={v.dim} depth={v.depth} heads={v.num_heads} image_size={v.image_size}; "
                f"text dim={t.dim} depth={t.depth} vocab={t.vocab_size} context={t.context_length}; "
                f"projection {cfg.projection_dim}) in the {layout} layout")
        raise CheckpointMismatchError(source, what, missing, unexpected, mismatched)


def read_lit_pretrained(path: str | os.PathLike[str]) -> tuple[LiTConfig, dict[str, torch.Tensor]]:
    """The :class:`LiTConfig` and the fp32 tensors (under our keys) of a LiT checkpoint, checked strictly:
    ``AIMv2LiT(cfg).load_state_dict(state, strict=True)`` fits exactly. Errors as
    :meth:`AIMv2LiT.from_pretrained`."""
    resolved = _resolve(path)  # (weights file, config.json or None[, whether path is a hub id])
    weights_file, config_file = resolved[0], resolved[1]
    source = str(path)
    d: dict = {}
    if config_file is not None:
        d = _read_json(config_file)
    snapshots = weights_file.parent.parent  # a hub snapshot: <cache>/models--owner--name/snapshots/<commit>/<file>
    if len(resolved) > 2 and resolved[2] and snapshots.name == "snapshots":
        raw = _read_weights(weights_file, snapshots.parent / "blobs")
    else:
        raw = _read_weights(weights_file)
    # Index buffers some exports include (transformers' position_ids): no weights in them.
    raw = {k: v for k, v in raw.items() if not k.endswith(".position_ids")}
    layout = detect_lit_layout(list(raw))
    try:
        cfg = _lit_config(d, raw, layout, str(config_file or source))
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"checkpoint {source}: {exc}") from None
    _shape_check(raw, cfg, layout, source)
    bad = [k for k, v in raw.items() if not v.is_floating_point()]
    if bad:
        raise WeightsError(f"checkpoint {source} has non-float tensors: {', '.join(bad[:4])}")
    ours = lit_from_layout(raw, lit_shapes(cfg), layout)
    return cfg, {k: v.to(torch.float32).contiguous() for k, v in ours.items()}


_SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_TEXT_LIMITS = {"vocab_size": MAX_VOCAB, "dim": MAX_DIM, "depth": MAX_DEPTH, "num_heads": MAX_DIM,
                "mlp_hidden": MAX_MLP_HIDDEN, "context_length": MAX_CONTEXT}


def _lit_config(d: dict, raw: Mapping[str, torch.Tensor], layout: str, source: str) -> LiTConfig:
    """The model shape: config.json's fields over what the tensors say, then the documented fallbacks."""
    # Shapes first, from our keys (the HF names map one-to-one except for the split q/k/v, not needed here).
    probe = raw if layout == "apple" else {k: raw[n] for k in _shape_keys(raw) if (n := _first(k)) in raw}
    vision_sd = {k[len(_IMG):]: v for k, v in probe.items() if k.startswith(_IMG) and not k.startswith(_HEAD)}
    vspec = _spec_from_shapes(vision_sd, "apple")
    vjson = d.get("vision_config") if isinstance(d.get("vision_config"), dict) else d
    if any(k in vjson for k in _SHAPE_FIELDS):  # a config in another schema is left to the tensors
        vspec.update(_spec_from_json(d, "hf" if layout == "hf" else None, source))
    vspec.setdefault("pos_embed", "learned")
    vspec.setdefault("norm_eps", 1e-5)
    if "dim" not in vspec:
        raise WeightsError(f"{source}: cannot infer the vision tower's shape (its patch conv is missing or malformed)")
    vspec.setdefault("num_heads", max(1, vspec["dim"] // _HEAD_DIM))
    vspec.setdefault("image_size", 224)
    if vspec["pos_embed"] == "sincos" and vspec["image_size"] % vspec.get("patch_size", 14):
        vspec["image_size"] = vspec.get("patch_size", 14) * 16
    check_spec(vspec, source)
    vision = EncoderConfig(**vspec)

    tspec = _text_spec_from_shapes(probe)
    tjson = d.get("text_config")
    if tjson is not None and (not isinstance(tjson, dict) or any(k in tjson for k in _SHAPE_FIELDS)):
        tspec.update(_text_spec_from_json(tjson, source))
    if "dim" not in tspec or "depth" not in tspec:
        raise WeightsError(f"{source}: cannot infer the text tower's shape (token embedding or blocks missing)")
    tspec.setdefault("num_heads", max(1, tspec["dim"] // _HEAD_DIM))
    tspec.setdefault("mlp_hidden", tspec["dim"] * 4)
    tspec.setdefault("context_length", 77)
    tspec.setdefault("eos_id", tspec["vocab_size"] - 1 if "vocab_size" in tspec else 49407)  # CLIP's: the last id
    for name, upper in _TEXT_LIMITS.items():  # what the tensors say too (e.g. a block index of 10**8)
        if name in tspec:
            tspec[name] = _int_field(tspec[name], f"text {name}", source, upper)
    text = TextConfig(**tspec)

    proj = probe.get("image_projector.weight")
    projection_dim = proj.shape[0] if proj is not None and proj.dim() == 2 else 768
    if d.get("projection_dim") is not None:
        projection_dim = _int_field(d["projection_dim"], "projection_dim", source, MAX_DIM)
    max_scale = 100.0
    if d.get("max_logit_scale") is not None:
        max_scale = _float_field(d["max_logit_scale"], "max_logit_scale", source, MAX_LOGIT_SCALE)
    return LiTConfig(vision=vision, text=text, projection_dim=projection_dim, max_logit_scale=max_scale)


def _first(key: str) -> str:
    """transformers' first name of our ``key`` (q_proj for a fused qkv)."""
    return _hf_names(key)[0]


def _shape_keys(raw: Mapping[str, torch.Tensor]) -> list[str]:
    """Our keys that an HF checkpoint ``raw`` may hold, for reading shapes (no q/k/v fusion needed): the
    embeddings, block-0 MLP gate and every block's norm (for the depth), the projections."""
    keys = [_IMG + "preprocessor.patchifier.proj.weight", _IMG + _POS, "image_projector.weight",
            _TXT + "preprocessor.text_embedding.weight", _TXT + "preprocessor.positional_embedding"]
    for tower, hf in ((_IMG, "vision_model.encoder.layers."), (_TXT, "text_model.encoder.layers.")):
        idx = {k[len(hf):].split(".", 1)[0] for k in raw if k.startswith(hf)}
        for i in sorted(i for i in idx if i.isdigit() and len(i) <= 9):
            keys.append(f"{tower}trunk.blocks.{i}.norm_1.weight")
        keys.append(f"{tower}trunk.blocks.0.mlp.fc1.weight")
    return keys


