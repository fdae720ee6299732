"""The key layouts of released AIMv2 weights and the conversion between them (no file access, no model).

Three key layouts of the same tensors are in circulation (``docs/aimv2-reference.md`` §5 tabulates them):

``apple``  Apple's original (ml-aim, and the Hub's pinned remote-code revisions, ``config.json`` with
           ``model_type: "aimv2"``). Its keys *are* our state-dict keys: ``preprocessor.patchifier.{proj,norm}``,
           ``preprocessor.pos_embed [1, N, D]`` (absent for the native-resolution model),
           ``trunk.blocks.i.{norm_1, attn.qkv, attn.proj, norm_2, mlp.fc1, mlp.fc2, mlp.fc3}``,
           ``trunk.post_trunk_norm``. The LiT checkpoint prefixes them with ``image_encoder.``.
``hf``     transformers' ``Aimv2VisionModel`` (``model_type: "aimv2_vision_model"``):
           ``embeddings.{patch_embed, rms_norm}``, ``embeddings.position_embedding.weight [N, D]``,
           ``encoder.layers.i.{rms_norm1, attention.{q,k,v,out}_proj, rms_norm2, ffn.{gate,up,down}_proj}``,
           ``rms_norm``. ``qkv`` is ``[q; k; v]`` along dim 0; ``gate = fc1``, ``up = fc3``, ``down = fc2``.
           ``Aimv2Model`` (LiT) prefixes them with ``vision_model.``.
``timm``   timm's ``aimv2_*``: ``patch_embed.{proj,norm}``, ``pos_embed [1, N, D]``,
           ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1_g, mlp.fc1_x, mlp.fc2}``, ``norm``
           (``fc1_g = fc1`` the gate, ``fc1_x = fc3`` the up projection).

:func:`to_layout` / :func:`from_layout` convert an encoder state dict (our keys are Apple's) to / from a layout,
:func:`detect_layout` tells the layout from the keys, and the ``_spec_from_*`` helpers read an encoder's shape
off the tensors or a ``config.json``. :mod:`aimv2.weights` reads the files, :mod:`aimv2.pretrained` loads them
into an encoder.
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection

import torch

from .config import EncoderConfig

LAYOUTS = ("hf", "apple", "timm")

# Released sizes: width, depth, heads, MLP hidden (head_dim 128 everywhere); timm names them aimv2_<size>_...
_SIZES = {"large": (1024, 24, 8, 2816), "huge": (1536, 24, 12, 4096), "1b": (2048, 24, 16, 5632),
          "3b": (3072, 24, 24, 8192)}
_HEAD_DIM = 128
_TIMM_ARCH = re.compile(r"aimv2_(large|huge|1b|3b)_patch(\d{1,9})_(\d{1,9})")
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Defaults of transformers' Aimv2VisionConfig (and of the remote-code AIMv2Config), for fields a config.json omits.
_HF_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 8,
                "num_channels": 3, "image_size": 224, "patch_size": 14, "rms_norm_eps": 1e-5}
_BIAS_FLAGS = ("qkv_bias", "mlp_bias", "use_bias", "attention_bias", "proj_bias")

# Key prefixes of the multi-tower (LiT) checkpoints: the vision tower's prefix and the layout it implies.
_TOWER_PREFIXES = (("vision_model.", "hf"), ("image_encoder.", "apple"))
# Keys of the other towers of a LiT checkpoint (text encoder, projections, logit scale): skipped.
_OTHER_TOWERS = ("text_model.", "text_encoder.", "visual_projection.", "text_projection.", "image_projector.",
                 "text_projector.", "logit_scale", "log_logit_scale")

# ---------------------------------------------------------------------------------------------------------
# Key mapping: our (= Apple's) names <-> each layout's names
# ---------------------------------------------------------------------------------------------------------

_OUR_BLOCK = re.compile(r"trunk\.blocks\.(\d+)\.(.+)")
_POS = "preprocessor.pos_embed"

_BLOCK_PREFIX = {"hf": "encoder.layers.{}.", "timm": "blocks.{}."}
_BLOCK_NAMES = {
    "hf": {"norm_1.weight": ("rms_norm1.weight",),
           "attn.qkv.weight": ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"),
           "attn.proj.weight": ("attention.out_proj.weight",),
           "norm_2.weight": ("rms_norm2.weight",),
           "mlp.fc1.weight": ("ffn.gate_proj.weight",),
           "mlp.fc2.weight": ("ffn.down_proj.weight",),
           "mlp.fc3.weight": ("ffn.up_proj.weight",)},
    "timm": {"norm_1.weight": ("norm1.weight",),
             "attn.qkv.weight": ("attn.qkv.weight",),
             "attn.proj.weight": ("attn.proj.weight",),
             "norm_2.weight": ("norm2.weight",),
             "mlp.fc1.weight": ("mlp.fc1_g.weight",),
             "mlp.fc2.weight": ("mlp.fc2.weight",),
             "mlp.fc3.weight": ("mlp.fc1_x.weight",)},
}
_TOP_NAMES = {
    "hf": {"preprocessor.patchifier.proj.weight": "embeddings.patch_embed.weight",
           "preprocessor.patchifier.proj.bias": "embeddings.patch_embed.bias",
           "preprocessor.patchifier.norm.weight": "embeddings.rms_norm.weight",
           _POS: "embeddings.position_embedding.weight",
           "trunk.post_trunk_norm.weight": "rms_norm.weight"},
    "timm": {"preprocessor.patchifier.proj.weight": "patch_embed.proj.weight",
             "preprocessor.patchifier.proj.bias": "patch_embed.proj.bias",
             "preprocessor.patchifier.norm.weight": "patch_embed.norm.weight",
             _POS: "pos_embed",
             "trunk.post_trunk_norm.weight": "norm.weight"},
}
# Per layout: (patch conv weight, block-key regex, block-0 gate key, position-embedding key) for shape inference.
_SHAPE_KEYS = {
    "apple": ("preprocessor.patchifier.proj.weight", re.compile(r"trunk\.blocks\.(\d+)\."),
              "trunk.blocks.0.mlp.fc1.weight", _POS),
    "hf": ("embeddings.patch_embed.weight", re.compile(r"encoder\.layers\.(\d+)\."),
           "encoder.layers.0.ffn.gate_proj.weight", "embeddings.position_embedding.weight"),
    "timm": ("patch_embed.proj.weight", re.compile(r"blocks\.(\d+)\."), "blocks.0.mlp.fc1_g.weight", "pos_embed"),
}
_CONV_BIAS = {"apple": "preprocessor.patchifier.proj.bias", "hf": "embeddings.patch_embed.bias",
              "timm": "patch_embed.proj.bias"}


def _layout_names(key: str, layout: str) -> tuple[str, ...]:
    """The layout's key(s) holding our tensor ``key`` (three for HF's split q/k/v, else one)."""
    if layout == "apple":
        return (key,)
    m = _OUR_BLOCK.fullmatch(key)
    try:
        if m:
            prefix = _BLOCK_PREFIX[layout].format(m.group(1))
            return tuple(prefix + name for name in _BLOCK_NAMES[layout][m.group(2)])
        return (_TOP_NAMES[layout][key],)
    except KeyError:  # only if the encoder gains a tensor this module does not know
        raise ValueError(f"no {layout} name for encoder tensor {key!r}; aimv2.layouts needs updating") from None


def to_layout(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our encoder state dict -> the same tensors under ``layout``'s names (views: nothing is copied).

    ``hf`` splits each ``attn.qkv.weight [3D, D]`` into q/k/v ``[D, D]`` and stores the learned position
    embedding as ``[N, D]`` instead of ``[1, N, D]``; ``apple`` is the identity; ``timm`` only renames.
    Dtypes and devices are kept. Works on meta tensors too (for shape bookkeeping).
    """
    _check_layout(layout)
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        names = _layout_names(key, layout)
        if len(names) == 3:
            parts = t.chunk(3, dim=0)
        elif layout == "hf" and key == _POS:
            parts = (t[0],)
        else:
            parts = (t,)
        out.update(zip(names, parts))
    return out


def from_layout(tensors: dict[str, torch.Tensor], cfg: EncoderConfig, layout: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_layout` for an encoder of shape ``cfg``: ``layout``'s tensors -> our keys.

    Expects the keys and shapes :func:`to_layout` produces (:mod:`aimv2.weights` checks them strictly first);
    q/k/v are concatenated as ``[q; k; v]`` along dim 0 and an HF position table ``[N, D]`` becomes
    ``[1, N, D]``. Dtypes are kept.
    """
    _check_layout(layout)
    out = {}
    for key in _meta_state(cfg):
        names = _layout_names(key, layout)
        parts = [tensors[n] for n in names]
        if len(parts) == 3:
            out[key] = torch.cat(parts, dim=0)
        elif layout == "hf" and key == _POS:
            out[key] = parts[0].unsqueeze(0)
        else:
            out[key] = parts[0]
    return out


def encoder_shapes(cfg: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``AIMv2Encoder(cfg).state_dict()``, in its order, without building the model
    (tests/test_pretrained.py checks this table against the model)."""
    d, h, p = cfg.dim, cfg.mlp_hidden, cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.pos_embed == "learned":
        shapes[_POS] = (1, cfg.num_patches, d)
    shapes.update({"preprocessor.patchifier.proj.weight": (d, cfg.in_chans, p, p),
                   "preprocessor.patchifier.proj.bias": (d,), "preprocessor.patchifier.norm.weight": (d,)})
    block = {"norm_1.weight": (d,), "attn.qkv.weight": (3 * d, d), "attn.proj.weight": (d, d), "norm_2.weight": (d,),
             "mlp.fc1.weight": (h, d), "mlp.fc2.weight": (d, h), "mlp.fc3.weight": (h, d)}
    for i in range(cfg.depth):
        shapes.update({f"trunk.blocks.{i}.{k}": s for k, s in block.items()})
    shapes["trunk.post_trunk_norm.weight"] = (d,)
    return shapes


def _meta_state(cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """The encoder's state dict for ``cfg`` as meta tensors (keys and shapes, no memory)."""
    return {k: torch.empty(s, device="meta") for k, s in encoder_shapes(cfg).items()}


def _check_layout(layout) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


class WeightsError(ValueError):
    """Weights that cannot be loaded: an unreadable or malformed file or ``config.json``, an unknown key layout,
    tensors or a configuration that do not fit an :class:`~aimv2.model.AIMv2Encoder`."""


# ---------------------------------------------------------------------------------------------------------
# Layout detection and the checkpoint's shape
# ---------------------------------------------------------------------------------------------------------

def detect_layout(keys: Collection[str]) -> str:
    """``"hf"``, ``"apple"`` or ``"timm"`` from a state dict's keys (tower prefixes already removed).

    The layout whose characteristic key prefixes most keys carry; WeightsError (a ValueError) when none does.
    """
    votes = {"hf": 0, "apple": 0, "timm": 0}
    for k in keys:
        if k.startswith(("embeddings.", "encoder.layers.")):
            votes["hf"] += 1
        elif k.startswith(("preprocessor.", "trunk.")):
            votes["apple"] += 1
        elif k.startswith(("patch_embed.", "blocks.")) or k == "pos_embed":
            votes["timm"] += 1
    best = max(votes.values())
    winners = [name for name, n in votes.items() if n == best]
    if best == 0 or len(winners) > 1:
        sample = ", ".join(list(keys)[:4])
        raise WeightsError(f"cannot tell the key layout (transformers Aimv2VisionModel, Apple's original or "
                           f"timm) of a state dict with keys {sample}, ...")
    return winners[0]


def _split_towers(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Keep the vision tower of a multi-tower checkpoint: (tensors without the prefix, prefix, stray keys).

    Stray keys are outside the prefix and not another tower's: they are reported as unexpected.
    """
    for prefix, _ in _TOWER_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            stray = [k for k in sd if not k.startswith(prefix) and not k.startswith(_OTHER_TOWERS)]
            return inner, prefix, stray
    return sd, "", []


def _spec_from_shapes(sd: dict[str, torch.Tensor], layout: str) -> dict:
    """What the tensor shapes say, as far as they say it: dim, in_chans, patch_size (the patch conv
    ``[D, C, p, p]``), depth, mlp_hidden, pos_embed, and image_size for a square learned table. num_heads and
    norm_eps are not in the shapes. A malformed tensor is left to the strict key/shape check."""
    conv_key, block_re, gate_key, pos_key = _SHAPE_KEYS[layout]
    spec: dict = {}
    conv = sd.get(conv_key)
    if conv is not None and conv.dim() == 4 and conv.shape[-1] == conv.shape[-2]:
        spec.update(dim=conv.shape[0], in_chans=conv.shape[1], patch_size=conv.shape[-1])
    # a block index of more than 9 digits is out of range anyway (and int() refuses thousands of digits)
    blocks = [int(i) if len(i := m.group(1)) <= 9 else 10 ** 9 for k in sd if (m := block_re.match(k))]
    if blocks:
        spec["depth"] = max(blocks) + 1
    gate = sd.get(gate_key)
    if gate is not None and gate.dim() == 2:
        spec["mlp_hidden"] = gate.shape[0]
    pos = sd.get(pos_key)
    spec["pos_embed"] = "sincos" if pos is None else "learned"
    if pos is not None and pos.dim() >= 2 and "patch_size" in spec:
        g = math.isqrt(pos.shape[-2])
        if g > 0 and g * g == pos.shape[-2]:
            spec["image_size"] = g * spec["patch_size"]
    return spec


# Sane upper bounds on an encoder shape read from a config.json or a checkpoint's tensors: far above every
# released AIMv2 (1024 <= dim <= 3072, depth 24, 224-448 px), low enough that a corrupt or hostile file cannot make
# the loader build millions of modules or exhaust memory before a single tensor is compared.
MAX_DEPTH = 1024
MAX_DIM = 65536
MAX_HEADS = MAX_DIM
MAX_MLP_HIDDEN = 4 * MAX_DIM
MAX_CHANNELS = 1024
MAX_IMAGE_SIZE = 16384
MAX_PATCH_SIZE = MAX_IMAGE_SIZE
MAX_NORM_EPS = 1.0
MAX_MLP_RATIO = 64.0
_LIMITS = {"dim": MAX_DIM, "depth": MAX_DEPTH, "num_heads": MAX_HEADS, "mlp_hidden": MAX_MLP_HIDDEN,
           "in_chans": MAX_CHANNELS, "image_size": MAX_IMAGE_SIZE, "patch_size": MAX_PATCH_SIZE}


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_field(value, name: str, source: str, upper: int) -> int:
    """``value`` as an int in ``[1, upper]`` (an integral float such as ``64.0`` is accepted), else WeightsError
    naming ``source`` and ``name``."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WeightsError(f"{source}: {name} must be a positive integer, got {_show(value)} "
                           f"({type(value).__name__})")
    if not 1 <= value <= upper:
        raise WeightsError(f"{source}: {name} must lie in [1, {upper}], got {value}")
    return value


def _float_field(value, name: str, source: str, upper: float) -> float:
    """``value`` as a finite float in ``(0, upper]``, else WeightsError naming ``source`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightsError(f"{source}: {name} must be a number, got {_show(value)} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= upper):
        raise WeightsError(f"{source}: {name} must be a finite number in (0, {upper}], got {value}")
    return value


def _side(value, name: str, source: str) -> int:
    """A square side: an int or a ``[h, w]`` pair with ``h == w``, in ``[1, MAX_IMAGE_SIZE]``."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise WeightsError(f"{source}: {name} {_show(value)} is not square; AIMv2Encoder needs a square {name}")
        value = value[0]
    return _int_field(value, name, source, MAX_IMAGE_SIZE)


def check_spec(spec: dict, source: str, names: dict[str, str] | None = None) -> dict:
    """Check an encoder shape (EncoderConfig field names, any subset) before anything is built from it.

    Every integer field present must be an int in ``[1, its MAX_*]``, ``norm_eps`` a finite float in
    ``(0, MAX_NORM_EPS]``, ``pos_embed`` "learned" or "sincos"; ``dim`` divisible by ``num_heads``, a learned
    table's ``image_size`` divisible by ``patch_size``, a sin-cos encoder's ``dim`` by 4. ``names`` maps our
    field names to the ones ``source`` spells (a config.json's), for the message. Raises WeightsError (a
    ValueError) naming ``source`` and the field; returns ``spec``.
    """
    names = names or {}

    def name(f: str) -> str:
        return names.get(f, f)

    for f, upper in _LIMITS.items():
        if f in spec:
            spec[f] = _int_field(spec[f], name(f), source, upper)
    if "norm_eps" in spec:
        spec["norm_eps"] = _float_field(spec["norm_eps"], name("norm_eps"), source, MAX_NORM_EPS)
    if "pos_embed" in spec and spec["pos_embed"] not in ("learned", "sincos"):
        raise WeightsError(f"{source}: pos_embed must be 'learned' or 'sincos', got {_show(spec['pos_embed'])}")
    dim, heads = spec.get("dim"), spec.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        raise WeightsError(f"{source}: {name('dim')} {dim} is not divisible by {name('num_heads')} {heads}")
    size, patch = spec.get("image_size"), spec.get("patch_size")
    if spec.get("pos_embed") == "learned" and size is not None and patch is not None and size % patch:
        raise WeightsError(f"{source}: {name('image_size')} {size} is not a multiple of {name('patch_size')} "
                           f"{patch} (a learned position embedding needs a whole grid of patches)")
    if spec.get("pos_embed") == "sincos" and dim is not None and dim % 4:
        raise WeightsError(f"{source}: {name('dim')} {dim} is not divisible by 4, which the 2-D sin-cos position "
                           f"embedding of a native-resolution encoder needs")
    return spec


_HF_NAMES = {"dim": "hidden_size", "mlp_hidden": "intermediate_size", "depth": "num_hidden_layers",
             "num_heads": "num_attention_heads", "in_chans": "num_channels", "image_size": "image_size",
             "patch_size": "patch_size", "norm_eps": "rms_norm_eps"}
_TIMM_NAMES = {"dim": "model_args.embed_dim", "depth": "model_args.depth", "num_heads": "model_args.num_heads",
               "in_chans": "model_args.in_chans", "patch_size": "model_args.patch_size",
               "image_size": "model_args.img_size / pretrained_cfg.input_size",
               "mlp_hidden": "model_args.mlp_ratio * embed_dim"}


def _spec_from_json(d: dict, layout: str | None, source: str) -> dict:
    """What config.json says, in EncoderConfig field names (only the fields it sets or implies), every field
    type- and range-checked (:func:`check_spec`). Any problem is a WeightsError naming ``source`` and the
    field. ``layout`` None: not yet known (an HF config without ``is_native`` then leaves ``pos_embed`` unset)."""
    if not isinstance(d, dict):
        raise WeightsError(f"{source} must hold a JSON object, got {type(d).__name__}")
    if "architecture" in d and "hidden_size" not in d:  # timm's config.json
        return _spec_from_timm_json(d, source)
    if isinstance(d.get("vision_config"), dict):  # transformers' Aimv2Config (LiT): the vision tower's part
        d = d["vision_config"]
    if not any(k in d for k in ("hidden_size", "model_type", "num_hidden_layers")):
        raise WeightsError(f"{source} is neither a transformers / ml-aim config (hidden_size, num_hidden_layers, "
                           f"...) nor a timm config (architecture, pretrained_cfg)")
    _refuse_unsupported(d, source)
    g = {k: d.get(k, v) for k, v in _HF_DEFAULTS.items()}
    spec: dict = {"dim": g["hidden_size"], "mlp_hidden": g["intermediate_size"], "depth": g["num_hidden_layers"],
                  "num_heads": g["num_attention_heads"], "in_chans": g["num_channels"],
                  "image_size": _side(g["image_size"], "image_size", source),
                  "patch_size": _side(g["patch_size"], "patch_size", source), "norm_eps": g["rms_norm_eps"]}
    if "is_native" in d:
        if not isinstance(d["is_native"], bool):
            raise WeightsError(f"{source}: is_native must be true or false, got {_show(d['is_native'])}")
        spec["pos_embed"] = "sincos" if d["is_native"] else "learned"
    elif layout == "hf":
        spec["pos_embed"] = "learned"  # Aimv2VisionConfig's default is_native=False
    # Apple's original config has no such flag: the native model is the one without preprocessor.pos_embed.
    return check_spec(spec, source, _HF_NAMES)


def _spec_from_timm_json(d: dict, source: str) -> dict:
    args = d.get("model_args") or {}
    pcfg = d.get("pretrained_cfg") or {}
    if not isinstance(args, dict) or not isinstance(pcfg, dict):
        raise WeightsError(f"{source}: model_args and pretrained_cfg must be JSON objects")
    _refuse_unsupported(args, source)
    spec: dict = {"pos_embed": "learned", "norm_eps": 1e-5}  # timm's aimv2_* use RmsNorm(eps=1e-5)
    m = _TIMM_ARCH.fullmatch(str(d.get("architecture", "")).split(".")[0])
    if m:
        dim, depth, heads, hidden = _SIZES[m.group(1)]
        spec.update(dim=dim, depth=depth, num_heads=heads, mlp_hidden=hidden,
                    patch_size=_int_field(int(m.group(2)), "architecture's patch size", source, MAX_PATCH_SIZE),
                    image_size=_int_field(int(m.group(3)), "architecture's image size", source, MAX_IMAGE_SIZE))
    size = pcfg.get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 3:
        c, h, w = size
        spec.update(in_chans=_int_field(c, "pretrained_cfg.input_size[0]", source, MAX_CHANNELS),
                    image_size=_side([h, w], "pretrained_cfg.input_size", source))
    renames = {"embed_dim": "dim", "depth": "depth", "num_heads": "num_heads", "in_chans": "in_chans"}
    spec.update({ours: _int_field(args[theirs], f"model_args.{theirs}", source, _LIMITS[ours])
                 for theirs, ours in renames.items() if theirs in args})
    if "patch_size" in args:
        spec["patch_size"] = _side(args["patch_size"], "model_args.patch_size", source)
    if "img_size" in args:
        spec["image_size"] = _side(args["img_size"], "model_args.img_size", source)
    if "mlp_ratio" in args and "dim" in spec:
        ratio = _float_field(args["mlp_ratio"], "model_args.mlp_ratio", source, MAX_MLP_RATIO)
        hidden = int(spec["dim"] * ratio)  # timm's rule
        spec["mlp_hidden"] = _int_field(hidden, "model_args.mlp_ratio * embed_dim", source, MAX_MLP_HIDDEN)
    return check_spec(spec, source, _TIMM_NAMES)


def _refuse_unsupported(d: dict, source: str) -> None:
    on = [f for f in _BIAS_FLAGS if d.get(f)]
    if on:
        raise WeightsError(f"{source} sets {', '.join(f'{f}=True' for f in on)}: AIMv2Encoder's attention and MLP "
                           f"linears have no bias (every released AIMv2 has qkv_bias=False, mlp_bias=False)")
    act = d.get("hidden_act", d.get("act_layer"))
    if act is not None and act not in ("silu", "swish"):
        raise WeightsError(f"{source} sets hidden_act={act!r}: AIMv2Encoder's SwiGLU uses silu")


def config_json(cfg: EncoderConfig, layout: str, dtype: str) -> dict:
    """The ``config.json`` of an encoder of shape ``cfg`` saved in ``layout`` (see ``save_encoder``)."""
    if layout == "timm":
        arch = "aimv2_large_patch14_224"  # timm's create_model(arch, **model_args) overrides its shape
        for size, shape in _SIZES.items():
            if shape == (cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden) and cfg.patch_size == 14 \
                    and cfg.image_size in (224, 336, 448):
                arch = f"aimv2_{size}_patch14_{cfg.image_size}"
        ratio = cfg.mlp_hidden / cfg.dim
        if int(cfg.dim * ratio) != cfg.mlp_hidden:  # timm computes int(dim * mlp_ratio)
            ratio = (cfg.mlp_hidden + 0.5) / cfg.dim
        return {"architecture": arch, "num_classes": 0, "num_features": cfg.dim, "global_pool": "avg",
                "model_args": {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
                               "embed_dim": cfg.dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                               "mlp_ratio": ratio},
                "pretrained_cfg": {"input_size": [cfg.in_chans, cfg.image_size, cfg.image_size],
                                   "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0,
                                   "crop_mode": "center", "mean": list(_OPENAI_CLIP_MEAN),
                                   "std": list(_OPENAI_CLIP_STD), "num_classes": 0, "pool_size": None,
                                   "first_conv": "patch_embed.proj", "classifier": "head"}}
    common = {"hidden_size": cfg.dim, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.depth,
              "num_attention_heads": cfg.num_heads, "num_channels": cfg.in_chans, "image_size": cfg.image_size,
              "patch_size": cfg.patch_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
              "attention_dropout": 0.0, "qkv_bias": False}
    if layout == "hf":
        return {"architectures": ["Aimv2VisionModel"], "model_type": "aimv2_vision_model", **common,
                "mlp_bias": False, "initializer_range": 0.02, "use_head": False,
                "is_native": cfg.pos_embed == "sincos", "dtype": dtype}
    return {"architectures": ["AIMv2Model"], "model_type": "aimv2", **common, "projection_dropout": 0.0,
            "use_bias": False, "torch_dtype": dtype}
