"""Released AIMv2 weights: load them into :class:`~aimv2.model.AIMv2Encoder`, and export an encoder back.

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

Loading is strict: every tensor the encoder needs must be there with its shape, and nothing else may be
(apart from the other towers of a LiT checkpoint, which are skipped, and a pooling head, which is dropped only
when asked). Any discrepancy raises :class:`CheckpointMismatchError` (a ``ValueError``) listing the keys.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch

from aimv2_kernels import BACKENDS

from .config import PRESETS, AIMv2Config, EncoderConfig
from .layers import resize_pos_embed
from .model import AIMv2Encoder

__all__ = ["LAYOUTS", "CheckpointMismatchError", "load_encoder", "save_encoder", "detect_layout",
           "to_layout", "from_layout"]

LAYOUTS = ("hf", "apple", "timm")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

# Released sizes: width, depth, heads, MLP hidden (head_dim 128 everywhere); timm names them aimv2_<size>_...
_SIZES = {"large": (1024, 24, 8, 2816), "huge": (1536, 24, 12, 4096), "1b": (2048, 24, 16, 5632),
          "3b": (3072, 24, 24, 8192)}
_HEAD_DIM = 128
_TIMM_ARCH = re.compile(r"aimv2_(large|huge|1b|3b)_patch(\d+)_(\d+)")
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
        raise ValueError(f"no {layout} name for encoder tensor {key!r}; aimv2.pretrained needs updating") from None


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

    Expects the keys and shapes :func:`to_layout` produces (``load_encoder`` checks them strictly first);
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


def _meta_state(cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """The encoder's state dict for ``cfg`` as meta tensors (keys and shapes, no memory, no init)."""
    with torch.device("meta"):
        return AIMv2Encoder(cfg, backend="reference").state_dict()


def _check_layout(layout) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the encoder: keys missing, unexpected, or of the wrong shape.

    Attributes ``missing``, ``unexpected`` (lists of key names, as spelled in the file) and ``mismatched``
    (list of ``(key, shape in the file, expected shape)``) hold the full lists; the message shows the first few.
    """

    SHOWN = 5

    def __init__(self, source: str, what: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def listing(items: list[str], noun: str) -> str:
            head = ", ".join(items[: self.SHOWN]) + (f", ... ({len(items) - self.SHOWN} more)"
                                                     if len(items) > self.SHOWN else "")
            return f"{len(items)} {noun}{'s' if len(items) != 1 else ''} ({head})"

        parts = []
        if missing:
            parts.append(listing(missing, "missing key"))
        if unexpected:
            parts.append(listing(unexpected, "unexpected key"))
        if mismatched:
            parts.append(listing([f"{k}: {list(got)} in the file vs {list(want)} expected"
                                  for k, got, want in mismatched], "shape mismatch"))
        super().__init__(f"checkpoint {source} does not fit {what}: " + "; ".join(parts))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------

def _read_tensor_file(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` or torch pickle file (weights only), on the CPU."""
    try:
        if file.name.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(str(file), device="cpu")
        else:
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise ValueError(f"cannot read checkpoint file {file}: {_one_line(exc)}") from None
    if isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
        for wrapper in ("state_dict", "model", "module"):  # training checkpoints wrap the state dict
            if isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise ValueError(f"checkpoint file {file} does not hold a state dict (a non-empty mapping of names to "
                         f"tensors)")
    return dict(sd)


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A weights file, or a sharded checkpoint's ``*.index.json`` (every shard it lists)."""
    if not file.name.endswith(".index.json"):
        return _read_tensor_file(file)
    index = _read_json(file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"shard index {file} has no 'weight_map'")
    out: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_file = file.parent / str(shard)
        if not shard_file.is_file():
            raise FileNotFoundError(f"shard {shard_file} listed in {file} does not exist")
        out.update(_read_tensor_file(shard_file))
    return out


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {file}: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _resolve(path) -> tuple[Path, Path | None]:
    """``path`` -> (weights file, config.json or None)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                cfg = p / "config.json"
                return p / name, (cfg if cfg.is_file() else None)
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} has none of {', '.join(WEIGHT_FILES)}")
    if not (p.name.endswith(".safetensors") or p.name.endswith(_TORCH_SUFFIXES)):
        raise ValueError(f"checkpoint file {str(path)!r} is neither .safetensors nor a torch file "
                         f"({', '.join(_TORCH_SUFFIXES)}); pass a folder with config.json + model.safetensors")
    return p, None


# ---------------------------------------------------------------------------------------------------------
# Layout detection and the checkpoint's shape
# ---------------------------------------------------------------------------------------------------------

def detect_layout(keys) -> str:
    """``"hf"``, ``"apple"`` or ``"timm"`` from a state dict's keys (tower prefixes already removed).

    The layout whose characteristic key prefixes most keys carry; ValueError when none does.
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
        raise ValueError(f"cannot tell the key layout (transformers Aimv2VisionModel, Apple's original or "
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
    blocks = [int(m.group(1)) for k in sd if (m := block_re.match(k))]
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


def _side(value, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{source}: {name} {value} is not square; AIMv2Encoder needs a square {name}")
        value = value[0]
    return int(value)


def _spec_from_json(d: dict, layout: str, source: str) -> dict:
    """What config.json says, in EncoderConfig field names (only the fields it sets or implies)."""
    if "architecture" in d and "hidden_size" not in d:  # timm's config.json
        return _spec_from_timm_json(d, source)
    if isinstance(d.get("vision_config"), dict):  # transformers' Aimv2Config (LiT): the vision tower's part
        d = d["vision_config"]
    if not any(k in d for k in ("hidden_size", "model_type", "num_hidden_layers")):
        raise ValueError(f"{source} is neither a transformers / ml-aim config (hidden_size, num_hidden_layers, "
                         f"...) nor a timm config (architecture, pretrained_cfg)")
    _refuse_unsupported(d, source)
    g = {k: d.get(k, v) for k, v in _HF_DEFAULTS.items()}
    spec = {"dim": int(g["hidden_size"]), "mlp_hidden": int(g["intermediate_size"]),
            "depth": int(g["num_hidden_layers"]), "num_heads": int(g["num_attention_heads"]),
            "in_chans": int(g["num_channels"]), "image_size": _side(g["image_size"], "image_size", source),
            "patch_size": _side(g["patch_size"], "patch_size", source), "norm_eps": float(g["rms_norm_eps"])}
    if "is_native" in d:
        spec["pos_embed"] = "sincos" if d["is_native"] else "learned"
    elif layout == "hf":
        spec["pos_embed"] = "learned"  # Aimv2VisionConfig's default is_native=False
    # Apple's original config has no such flag: the native model is the one without preprocessor.pos_embed.
    return spec


def _spec_from_timm_json(d: dict, source: str) -> dict:
    args = d.get("model_args") or {}
    pcfg = d.get("pretrained_cfg") or {}
    if not isinstance(args, dict) or not isinstance(pcfg, dict):
        raise ValueError(f"{source}: model_args and pretrained_cfg must be JSON objects")
    _refuse_unsupported(args, source)
    spec: dict = {"pos_embed": "learned", "norm_eps": 1e-5}  # timm's aimv2_* use RmsNorm(eps=1e-5)
    m = _TIMM_ARCH.fullmatch(str(d.get("architecture", "")).split(".")[0])
    if m:
        dim, depth, heads, hidden = _SIZES[m.group(1)]
        spec.update(dim=dim, depth=depth, num_heads=heads, mlp_hidden=hidden, patch_size=int(m.group(2)),
                    image_size=int(m.group(3)))
    if isinstance(pcfg.get("input_size"), (list, tuple)) and len(pcfg["input_size"]) == 3:
        c, h, w = pcfg["input_size"]
        spec.update(in_chans=int(c), image_size=_side([h, w], "input_size", source))
    renames = {"embed_dim": "dim", "depth": "depth", "num_heads": "num_heads", "in_chans": "in_chans"}
    spec.update({ours: int(args[theirs]) for theirs, ours in renames.items() if theirs in args})
    if "patch_size" in args:
        spec["patch_size"] = _side(args["patch_size"], "patch_size", source)
    if "img_size" in args:
        spec["image_size"] = _side(args["img_size"], "img_size", source)
    if "mlp_ratio" in args and "dim" in spec:
        spec["mlp_hidden"] = int(spec["dim"] * float(args["mlp_ratio"]))  # timm's rule
    return spec


def _refuse_unsupported(d: dict, source: str) -> None:
    on = [f for f in _BIAS_FLAGS if d.get(f)]
    if on:
        raise ValueError(f"{source} sets {', '.join(f'{f}=True' for f in on)}: AIMv2Encoder's attention and MLP "
                         f"linears have no bias (every released AIMv2 has qkv_bias=False, mlp_bias=False)")
    act = d.get("hidden_act", d.get("act_layer"))
    if act is not None and act not in ("silu", "swish"):
        raise ValueError(f"{source} sets hidden_act={act!r}: AIMv2Encoder's SwiGLU uses silu")


# ---------------------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------------------

_COMPARED = ("dim", "depth", "num_heads", "mlp_hidden", "patch_size", "in_chans", "pos_embed", "norm_eps",
             "image_size")


def _wanted_config(config) -> tuple[EncoderConfig | None, str]:
    if config is None:
        return None, ""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"config: unknown preset {config!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return AIMv2Config.from_name(config).encoder, f"preset {config!r}"
    if isinstance(config, AIMv2Config):
        return config.encoder, f"the given config {config.name!r}"
    if isinstance(config, EncoderConfig):
        return config, "the given config"
    raise TypeError(f"config must be None, a preset name, an EncoderConfig or an AIMv2Config, "
                    f"got {type(config).__name__}")


def _compare(known: dict, want: EncoderConfig, what: str, image_size: int | None, source: str) -> None:
    diffs = []
    for f in _COMPARED:
        if f not in known:
            continue
        have, target = known[f], getattr(want, f)
        if f == "image_size":
            if known.get("pos_embed") == "sincos" or want.pos_embed == "sincos":
                continue  # a sin-cos encoder runs at any size: its image_size is nominal
            have = image_size if image_size is not None else have  # the size asked for is what must match
        same = math.isclose(have, target, rel_tol=1e-6) if f == "norm_eps" else have == target
        if not same:
            where = "requested" if f == "image_size" and image_size is not None else "in the checkpoint"
            diffs.append(f"{f} {have} {where} vs {target} in {what}")
    if diffs:
        raise ValueError(f"checkpoint {source} does not match {what}: " + "; ".join(diffs))


def _check_keys(sd: dict[str, torch.Tensor], cfg: EncoderConfig, layout: str, source: str, prefix: str,
                stray: list[str]) -> None:
    expected = {k: tuple(v.shape) for k, v in to_layout(_meta_state(cfg), layout).items()}
    missing = [prefix + k for k in expected if k not in sd]
    unexpected = [prefix + k for k in sd if k not in expected] + stray
    mismatched = [(prefix + k, tuple(sd[k].shape), shape) for k, shape in expected.items()
                  if k in sd and tuple(sd[k].shape) != shape]
    if missing or unexpected or mismatched:
        what = (f"AIMv2Encoder(dim={cfg.dim}, depth={cfg.depth}, num_heads={cfg.num_heads}, "
                f"mlp_hidden={cfg.mlp_hidden}, patch_size={cfg.patch_size}, image_size={cfg.image_size}, "
                f"pos_embed={cfg.pos_embed!r}) in the {layout} layout")
        raise CheckpointMismatchError(source, what, missing, unexpected, mismatched)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

def load_encoder(path, *, image_size: int | None = None, backend: str = "auto", config=None,
                 drop_head: bool = False) -> AIMv2Encoder:
    """Load released (or exported) AIMv2 weights into an :class:`AIMv2Encoder` (eval mode, fp32, CPU).

    Args:
        path: a folder with ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``, or a sharded
            ``*.index.json``) in any of the three layouts (transformers ``Aimv2VisionModel`` / ``Aimv2Model``,
            Apple's original incl. LiT, timm), or a bare ``.safetensors`` / ``.pth`` / ``.bin`` file whose shape
            is inferred from its tensors (``num_heads`` from ``config`` when given, else ``dim / 128``, AIMv2's
            head_dim; a file without a position embedding is the native-resolution sin-cos model).
        image_size: build the encoder for this square resolution instead of the checkpoint's; a learned
            ``[1, N, D]`` position embedding is resized bicubically on its 2-D grid (``resize_pos_embed``).
        backend: the op backend of the encoder (one of ``aimv2_kernels.BACKENDS``).
        config: an ``EncoderConfig``, an ``AIMv2Config`` or a preset name the checkpoint must match; a mismatch
            is refused naming every differing field. It also supplies what a bare file cannot say
            (num_heads, norm_eps).
        drop_head: drop a pooling / classification head (``head.*`` keys: the LiT attention-pooling head, a
            timm classifier) instead of refusing the checkpoint.

    Returns:
        The encoder: parameters fp32 on the CPU, in eval mode; ``encoder.cfg`` is its ``EncoderConfig``.

    Raises:
        FileNotFoundError: ``path`` (or a weights file in the folder) does not exist.
        TypeError: an argument of the wrong type.
        CheckpointMismatchError: (a ValueError) missing / unexpected keys or wrong shapes, all listed.
        ValueError: unreadable files, an unknown layout, a config mismatch, biases or a head
            (without ``drop_head``) the encoder does not have.
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)):
        raise TypeError(f"image_size must be an int or None, got {type(image_size).__name__}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(drop_head, bool):
        raise TypeError(f"drop_head must be a bool, got {type(drop_head).__name__}")
    want, what = _wanted_config(config)
    weights_file, config_file = _resolve(path)
    source = str(path)

    raw = _read_weights(weights_file)
    sd, prefix, stray = _split_towers(raw)
    layout = detect_layout(sd)

    heads = [k for k in sd if k.startswith("head.")]
    if heads and not drop_head:
        shown = ", ".join(prefix + k for k in heads[:4])
        raise ValueError(f"checkpoint {source} has a pooling/classification head ({len(heads)} tensors: {shown}"
                         f"{', ...' if len(heads) > 4 else ''}) that AIMv2Encoder does not have; pass "
                         f"drop_head=True to load the trunk without it")
    for k in heads:
        del sd[k]
    biases = [k for k in sd if k.endswith(".bias") and k != _CONV_BIAS[layout]]
    if biases:
        shown = ", ".join(prefix + k for k in biases[:4])
        raise ValueError(f"checkpoint {source} has {len(biases)} bias tensors ({shown}"
                         f"{', ...' if len(biases) > 4 else ''}): AIMv2Encoder's attention and MLP linears have no "
                         f"bias (qkv_bias=False, mlp_bias=False in every released AIMv2)")

    spec = _spec_from_shapes(sd, layout)
    if config_file is not None:
        spec.update(_spec_from_json(_read_json(config_file), layout, str(config_file)))
    if "dim" not in spec:
        raise ValueError(f"cannot infer the encoder's shape from {source}: its patch conv "
                         f"{prefix}{_SHAPE_KEYS[layout][0]} [D, C, p, p] is missing or malformed and there is "
                         f"no config.json")
    known = dict(spec)
    if want is not None:
        _compare(known, want, what, image_size, source)
    fallback = {"num_heads": (want.num_heads if want else None), "norm_eps": (want.norm_eps if want else 1e-5),
                "image_size": (want.image_size if want else 224)}
    for f, v in fallback.items():
        spec.setdefault(f, v)
    if spec["num_heads"] is None:
        if spec["dim"] % _HEAD_DIM:
            raise ValueError(f"cannot infer num_heads of {source} from its tensors (dim {spec['dim']} is not a "
                             f"multiple of AIMv2's head_dim {_HEAD_DIM}); pass config= (an EncoderConfig or a "
                             f"preset name)")
        spec["num_heads"] = spec["dim"] // _HEAD_DIM
    if spec["pos_embed"] == "sincos" and spec["image_size"] % spec["patch_size"]:
        spec["image_size"] = spec["patch_size"] * 16  # nominal only: a sin-cos encoder runs at any size
    if not spec.get("depth"):
        raise ValueError(f"checkpoint {source} has no transformer blocks and no config.json giving their number")
    spec.setdefault("mlp_hidden", None)
    try:
        cfg = EncoderConfig(**spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {source}: {exc}") from None

    _check_keys(sd, cfg, layout, source, prefix, stray)
    bad = [prefix + k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"checkpoint {source} has non-float tensors: {', '.join(bad[:4])}")
    ours = {k: v.to(torch.float32).contiguous() for k, v in from_layout(sd, cfg, layout).items()}

    if image_size is not None and image_size != cfg.image_size:
        try:
            new_cfg = dataclasses.replace(cfg, image_size=image_size)
        except ValueError as exc:
            raise ValueError(f"image_size: {exc}") from None
        if cfg.pos_embed == "learned":
            g, n = cfg.grid_size, new_cfg.grid_size
            ours[_POS] = resize_pos_embed(ours[_POS], (g, g), (n, n)).contiguous()
        cfg = new_cfg

    with torch.device("meta"):
        encoder = AIMv2Encoder(cfg, backend=backend)
    encoder.load_state_dict(ours, strict=True, assign=True)
    if any(t.is_meta for t in list(encoder.parameters()) + list(encoder.buffers())):
        raise RuntimeError("aimv2.pretrained: the encoder has tensors the checkpoint did not fill")
    return encoder.eval()


def save_encoder(encoder: AIMv2Encoder, path, layout: str = "hf") -> Path:
    """Write ``encoder`` as ``path/config.json`` + ``path/model.safetensors`` in ``layout``.

    ``"hf"`` is loadable by ``transformers.Aimv2VisionModel.from_pretrained(path)`` (``use_head=False``,
    ``is_native`` for a sin-cos encoder); ``"apple"`` is Apple's original keys with an ml-aim style
    ``config.json`` (``model_type: "aimv2"``); ``"timm"`` is timm's keys with a timm ``config.json``
    (``architecture`` + ``model_args``). Tensors keep the encoder's dtype; :func:`load_encoder` reads all
    three back exactly. The folder is created if needed; existing files of those names are replaced.

    Raises:
        TypeError: ``encoder`` is not an AIMv2Encoder.
        ValueError: unknown layout; ``path`` is a file; ``"timm"`` for a sin-cos encoder (timm has no
            native-resolution AIMv2, so an export would silently lose the position embedding) or a
            norm_eps other than timm's 1e-5.
    """
    if not isinstance(encoder, AIMv2Encoder):
        raise TypeError(f"encoder must be an aimv2.model.AIMv2Encoder, got {type(encoder).__name__}")
    _check_layout(layout)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    cfg = encoder.cfg
    if layout == "timm" and cfg.pos_embed == "sincos":
        raise ValueError("layout='timm' cannot hold a sin-cos (native-resolution) encoder: timm's aimv2 models "
                         "only have a learned position embedding; use layout='hf' or 'apple'")
    if layout == "timm" and not math.isclose(cfg.norm_eps, 1e-5, rel_tol=1e-6):
        raise ValueError(f"layout='timm' fixes RmsNorm eps at 1e-5; this encoder has norm_eps {cfg.norm_eps}")
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"path {str(path)!r} is a file; save_encoder writes a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    state = {k: v.detach().to("cpu") for k, v in encoder.state_dict().items()}
    # The q/k/v chunks and the squeezed HF position table are views: safetensors needs each tensor to own
    # its memory, so those (and only those: a 3B model is 11 GB) are copied.
    originals = {id(v) for v in state.values()}
    tensors = {k: v.contiguous() if id(v) in originals else v.clone(memory_format=torch.contiguous_format)
               for k, v in to_layout(state, layout).items()}
    dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    (out_dir / "config.json").write_text(json.dumps(_config_json(cfg, layout, dtype), indent=2) + "\n")
    from safetensors.torch import save_file
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _config_json(cfg: EncoderConfig, layout: str, dtype: str) -> dict:
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
