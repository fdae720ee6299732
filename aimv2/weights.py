"""Reading released AIMv2 weights from disk: files, shards and ``config.json``, checked strictly (no model).

:func:`read_pretrained` turns a folder (``config.json`` + ``model.safetensors``, ``pytorch_model.bin`` or a
sharded ``*.index.json``), a bare weights file, or a Hugging Face hub id (``apple/aimv2-large-patch14-224``,
optionally ``@revision``: fetched into, or read from, huggingface_hub's cache by :func:`aimv2.hub.resolve`) in
any layout of :mod:`aimv2.layouts` into an ``EncoderConfig`` and a state dict under our keys;
:meth:`aimv2.model.AIMv2Encoder.from_pretrained` builds the encoder from them. Loading is strict: every tensor
the encoder needs must be there with its shape, and nothing else may be (apart from the other towers of a LiT
checkpoint, which are skipped, and a pooling head, which is dropped only when asked). Any discrepancy raises
:class:`CheckpointMismatchError` listing the keys; every failure that comes from the files is a
:class:`~aimv2.layouts.WeightsError` (a ``ValueError``), and so is every failure to resolve a hub id
(:class:`~aimv2.hub.HubError`; no such repo and not in the cache are also ``FileNotFoundError``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch

from .config import PRESETS, AIMv2Config, EncoderConfig
from .hub import HubCacheMissError, HubError, HubNotFoundError, is_hub_id
from .hub import resolve as resolve_hub
from .layers import resize_pos_embed
from .layouts import (
    _CONV_BIAS,
    _HEAD_DIM,
    _POS,
    _SHAPE_KEYS,
    MAX_IMAGE_SIZE,
    WeightsError,
    _meta_state,
    _spec_from_json,
    _spec_from_shapes,
    _split_towers,
    check_spec,
    detect_layout,
    from_layout,
    to_layout,
)

__all__ = ["WeightsError", "CheckpointMismatchError", "ConfigMismatchError", "HubError", "HubNotFoundError",
           "HubCacheMissError", "read_pretrained", "is_training_run", "is_hub_id", "WEIGHT_FILES"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

class CheckpointMismatchError(WeightsError):
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


class ConfigMismatchError(WeightsError):
    """The weights are of another shape than the ``config`` they were asked to match (every field named)."""


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
        raise WeightsError(f"cannot read checkpoint file {file}: {_one_line(exc)}") from None
    if isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
        for wrapper in ("state_dict", "model", "module"):  # training checkpoints wrap the state dict
            if isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise WeightsError(f"checkpoint file {file} does not hold a state dict (a non-empty mapping of names to "
                           f"tensors)")
    return dict(sd)


def _read_weights(file: Path, blobs: Path | None = None) -> dict[str, torch.Tensor]:
    """A weights file, or a sharded checkpoint's ``*.index.json`` (every shard it lists); ``blobs``: see
    :func:`_shard_path`."""
    if not file.name.endswith(".index.json"):
        return _read_tensor_file(file)
    index = _read_json(file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"shard index {file} has no 'weight_map'")
    out: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_file = _shard_path(file, shard, blobs)
        if not shard_file.is_file():
            raise FileNotFoundError(f"shard {shard_file} listed in {file} does not exist")
        out.update(_read_tensor_file(shard_file))
    return out


def _shard_path(index_file: Path, shard: object, blobs: Path | None = None) -> Path:
    """The file of one ``weight_map`` entry of ``index_file``: a plain relative name inside the checkpoint folder.

    Refused (WeightsError): a non-string or empty name, an absolute path, any ``..`` component, and a name that
    resolves (following symlinks) outside the folder of the index. ``blobs``: for a snapshot of huggingface_hub's
    cache, whose files are symlinks to ``<repo>/blobs/<hash>``, a shard may also resolve to a file directly in
    that folder.
    """
    if not isinstance(shard, str) or not shard or "\x00" in shard:
        raise WeightsError(f"shard index {index_file}: weight_map values must be file names, got {shard!r}")
    rel = Path(shard)
    if rel.is_absolute() or shard.startswith(("/", "\\")) or ".." in rel.parts or ".." in shard.split("\\") \
            or rel.drive:
        raise WeightsError(f"shard index {index_file}: shard {shard!r} is not a file name inside the checkpoint "
                           f"folder (absolute paths and '..' are refused)")
    folder = index_file.parent.resolve()
    target = (index_file.parent / rel).resolve()
    in_blobs = blobs is not None and target.parent == blobs.resolve()
    if not in_blobs and (target == folder or not target.is_relative_to(folder)):
        raise WeightsError(f"shard index {index_file}: shard {shard!r} resolves to {target}, outside the checkpoint "
                           f"folder {folder} (a symlink out of the folder is refused)")
    return index_file.parent / rel if in_blobs else target  # a blob is named by its hash: keep the file's name


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # incl. UnicodeDecodeError, JSONDecodeError, huge ints
        raise WeightsError(f"cannot read {file}: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


# aimv2.checkpoint's layout of a training run: RUN/checkpoints/step_<n>/{state.json, dcp/}; state.pt marks the
# former (pickled) format, still recognised as a run so that its loader can refuse it by name.
_STEP_DIR = re.compile(r"step_\d+")
_STATE_FILES = ("state.json", "state.pt")


def is_training_run(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the output of ``aimv2-train`` rather than released weights: a run folder (with
    ``checkpoints/step_*``), its ``checkpoints`` folder, one ``step_*`` checkpoint, or a checkpoint's
    ``state.json``. Load those with :func:`aimv2.checkpoint.load_trained_encoder`."""
    p = Path(path)
    if p.is_file():
        return p.name in _STATE_FILES and _STEP_DIR.fullmatch(p.parent.name) is not None
    if not p.is_dir():
        return False
    if _STEP_DIR.fullmatch(p.name) and (any((p / f).is_file() for f in _STATE_FILES) or (p / "dcp").is_dir()):
        return True
    roots = [r for r in (p / "checkpoints", p) if r.is_dir()]
    return any(_STEP_DIR.fullmatch(c.name) and any((c / f).is_file() for f in _STATE_FILES)
               for r in roots for c in r.iterdir())


def _resolve(path) -> tuple[Path, Path | None, bool]:
    """``path`` -> (weights file, config.json or None, whether ``path`` is a hub id).

    A string that names no local path but is a hub id (:func:`aimv2.hub.is_hub_id`) is resolved to its snapshot
    folder in huggingface_hub's cache (downloaded when needed and allowed); its errors name the id."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        if not is_hub_id(path):
            raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
        folder = resolve_hub(path)
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                cfg = folder / "config.json"
                return folder / name, (cfg if cfg.is_file() else None), True
        repo_id, _, revision = str(path).partition("@")
        fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise HubCacheMissError(f"hub repo {path}: its cached snapshot {folder} has none of "
                                f"{', '.join(WEIGHT_FILES)} (a partial download?): fetch it with `{fetch}`")
    if is_training_run(p):
        raise WeightsError(f"{str(path)!r} is a training run of aimv2-train (checkpoints/step_*/state.json), not "
                           f"released weights: load its encoder with aimv2.checkpoint.load_trained_encoder(path), "
                           f"which returns (encoder, config)")
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                cfg = p / "config.json"
                return p / name, (cfg if cfg.is_file() else None), False
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} has none of {', '.join(WEIGHT_FILES)}")
    if not (p.name.endswith(".safetensors") or p.name.endswith(_TORCH_SUFFIXES)):
        raise WeightsError(f"checkpoint file {str(path)!r} is neither .safetensors nor a torch file "
                           f"({', '.join(_TORCH_SUFFIXES)}); pass a folder with config.json + model.safetensors")
    return p, None, False


def _name_hub_source(exc: BaseException, hub_id: str) -> None:
    """Prefix ``exc``'s message with ``hub repo ID:`` unless it names the id already (a message about a file of
    the snapshot names the file by its path in the cache); type and attributes are kept."""
    if len(exc.args) == 1 and isinstance(exc.args[0], str) and hub_id not in exc.args[0]:
        exc.args = (f"hub repo {hub_id}: {exc.args[0]}",)


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
        raise ConfigMismatchError(f"checkpoint {source} does not match {what}: " + "; ".join(diffs))


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
# Reading released weights
# ---------------------------------------------------------------------------------------------------------

def read_pretrained(path: str | os.PathLike[str], *, image_size: int | None = None,
                    config: str | AIMv2Config | EncoderConfig | None = None,
                    drop_head: bool = False) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """The encoder shape and the fp32 tensors (under our keys) of released weights, checked strictly.

    Arguments as in :func:`aimv2.pretrained.load_pretrained_encoder` (which builds the encoder from the result);
    ``path`` may also be a Hugging Face hub id ``owner/name[@revision]`` (a ``str`` naming no local path; see
    :mod:`aimv2.hub`: fetched into huggingface_hub's cache, or read from it offline). Hub failures raise
    :class:`~aimv2.hub.HubError` (a WeightsError): :class:`~aimv2.hub.HubNotFoundError` and
    :class:`~aimv2.hub.HubCacheMissError` are also FileNotFoundError; ImportError without huggingface_hub.
    Returns ``(cfg, state_dict)``: ``AIMv2Encoder(cfg).load_state_dict(state_dict, strict=True)`` fits exactly.
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)):
        raise TypeError(f"image_size must be an int or None, got {type(image_size).__name__}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not isinstance(drop_head, bool):
        raise TypeError(f"drop_head must be a bool, got {type(drop_head).__name__}")
    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be at most {MAX_IMAGE_SIZE}, got {image_size}")
    want, what = _wanted_config(config)
    weights_file, config_file, from_hub = _resolve(path)
    if not from_hub:
        return _read_resolved(weights_file, config_file, str(path), image_size, want, what, drop_head)
    snapshots = weights_file.parent.parent  # <cache>/models--owner--name/snapshots/<commit>/<file>
    blobs = snapshots.parent / "blobs" if snapshots.name == "snapshots" else None
    try:
        return _read_resolved(weights_file, config_file, str(path), image_size, want, what, drop_head, blobs)
    except (WeightsError, OSError) as exc:
        _name_hub_source(exc, str(path))
        raise


def _read_resolved(weights_file: Path, config_file: Path | None, source: str, image_size: int | None,
                   want: EncoderConfig | None, what: str, drop_head: bool,
                   blobs: Path | None = None) -> tuple[EncoderConfig, dict]:
    """:func:`read_pretrained` once the path is resolved: ``source`` names it in messages; ``blobs`` is the blob
    folder of a hub snapshot (:func:`_shard_path`)."""
    # config.json first: every field it sets is type- and range-checked before any tensor is read or built.
    json_spec = None
    if config_file is not None:
        try:
            json_spec = _spec_from_json(_read_json(config_file), None, str(config_file))
        except WeightsError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:  # a safety net: _spec_from_json names the field
            raise WeightsError(f"{config_file}: malformed value ({_one_line(exc)})") from None

    raw = _read_weights(weights_file, blobs)
    sd, prefix, stray = _split_towers(raw)
    layout = detect_layout(sd)

    heads = [k for k in sd if k.startswith("head.")]
    if heads and not drop_head:
        shown = ", ".join(prefix + k for k in heads[:4])
        raise WeightsError(f"checkpoint {source} has a pooling/classification head ({len(heads)} tensors: {shown}"
                           f"{', ...' if len(heads) > 4 else ''}) that AIMv2Encoder does not have; pass "
                           f"drop_head=True to load the trunk without it")
    for k in heads:
        del sd[k]
    biases = [k for k in sd if k.endswith(".bias") and k != _CONV_BIAS[layout]]
    if biases:
        shown = ", ".join(prefix + k for k in biases[:4])
        raise WeightsError(f"checkpoint {source} has {len(biases)} bias tensors ({shown}"
                           f"{', ...' if len(biases) > 4 else ''}): AIMv2Encoder's attention and MLP linears have "
                           f"no bias (qkv_bias=False, mlp_bias=False in every released AIMv2)")

    spec = _spec_from_shapes(sd, layout)
    if json_spec is not None:
        if layout == "hf":
            json_spec.setdefault("pos_embed", "learned")  # Aimv2VisionConfig's default is_native=False
        spec.update(json_spec)
    if "dim" not in spec:
        raise WeightsError(f"cannot infer the encoder's shape from {source}: its patch conv "
                           f"{prefix}{_SHAPE_KEYS[layout][0]} [D, C, p, p] is missing or malformed and there is "
                           f"no config.json")
    check_spec(spec, f"checkpoint {source}")  # what the tensors say too (e.g. a block index of 10**7)
    known = dict(spec)
    if want is not None:
        _compare(known, want, what, image_size, source)
    fallback = {"num_heads": (want.num_heads if want else None), "norm_eps": (want.norm_eps if want else 1e-5),
                "image_size": (want.image_size if want else 224)}
    for f, v in fallback.items():
        spec.setdefault(f, v)
    if spec["num_heads"] is None:
        if spec["dim"] % _HEAD_DIM:
            raise WeightsError(f"cannot infer num_heads of {source} from its tensors (dim {spec['dim']} is not a "
                               f"multiple of AIMv2's head_dim {_HEAD_DIM}); pass config= (an EncoderConfig or a "
                               f"preset name)")
        spec["num_heads"] = spec["dim"] // _HEAD_DIM
    if spec["pos_embed"] == "sincos" and spec["image_size"] % spec["patch_size"]:
        spec["image_size"] = spec["patch_size"] * 16  # nominal only: a sin-cos encoder runs at any size
    if not spec.get("depth"):
        raise WeightsError(f"checkpoint {source} has no transformer blocks and no config.json giving their number")
    check_spec(spec, f"checkpoint {source}")  # with the fallbacks and the inferred num_heads
    spec.setdefault("mlp_hidden", None)
    try:
        cfg = EncoderConfig(**spec)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"checkpoint {source}: {exc}") from None

    _check_keys(sd, cfg, layout, source, prefix, stray)
    bad = [prefix + k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise WeightsError(f"checkpoint {source} has non-float tensors: {', '.join(bad[:4])}")
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
    return cfg, ours
