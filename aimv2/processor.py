"""The image processor of AIMv2: images (PIL, numpy, torch) in, the encoder's float32 ``(B, 3, H, W)`` input out.

``AIMv2ImageProcessor`` does what transformers' slow ``CLIPImageProcessor`` does with a released checkpoint's
``preprocessor_config.json`` (and reads and writes that file), with two presets (``build_processor`` /
``AIMv2ImageProcessor.from_preset``):

- ``"released"``: the released checkpoints' config (Hugging Face ``apple/aimv2-*``): convert to RGB, resize the
  shorter side to ``image_size`` (bicubic, ``resample=3``), center crop ``image_size``, rescale by 1/255,
  normalize with the OpenAI CLIP mean and std. Bit-identical to ``CLIPImageProcessor``'s PIL backend (the only
  one when the checkpoints were released; ``CLIPImageProcessorPil`` in transformers 5; ``tests/test_processor.py``
  compares them).
- ``"ml-aim"``: Apple's ml-aim evaluation transform (``aim.v1.torch.data.val_transforms``, which ml-aim's AIMv2
  examples use): resize the shorter side to ``ceil(image_size / 0.875)`` (256 for 224, 384 for 336, 512 for
  448; bicubic), center crop ``image_size`` with torchvision's ``CenterCrop`` offsets, ``ToTensor`` (1/255),
  normalize with the ImageNet mean and std.

``native=True`` gives either preset for the native-resolution (sin-cos) checkpoint, as its hub config does:
``do_resize=False, do_center_crop=False`` (the image keeps its size; see ``patch_fit`` for sides that are not
multiples of the patch size).

The steps, in order (each one switchable, as in transformers):

1. RGB (``do_convert_rgb``): ``aimv2.data.decode.to_rgb``: transparency composited over white (as
   transformers 5's ``convert_to_rgb``), greyscale replicated. With ``do_convert_rgb=False`` an image must
   already be 3-channel RGB.
2. Resize (``do_resize``): ``size`` an int: the shorter side becomes ``size`` and the longer
   ``int(size * long / short)`` (truncated, as transformers' ``get_resize_output_image_size`` and torchvision's
   ``Resize(int)``); ``size`` an ``(h, w)`` pair: exactly that. Pillow's ``Image.resize`` with ``resample`` on
   the 8-bit RGB image (skipped when the size is unchanged: Pillow would return a copy).
3. Center crop (``do_center_crop``) to ``crop_size``. The top-left offset on each axis is ``(H - h) // 2``
   for ``crop_offset="floor"`` (transformers) or ``int(round((H - h) / 2))`` for ``"round"`` (torchvision's
   ``CenterCrop``; Python rounds halves to even): the two differ by one pixel when ``H - h`` is 3 mod 4. A side
   shorter than the crop is zero-padded (black) as each of them does (``"floor"``: ``ceil(d / 2)`` rows before,
   ``"round"``: ``d // 2``).
4. Patch multiple: the encoder needs sides that are multiples of ``patch_size`` (14). ``patch_fit="crop"``
   (default) drops the last ``H % 14`` rows and ``W % 14`` columns, which is what transformers'
   ``Aimv2VisionModel`` does to them (its stride-14 patch conv ignores them), so features match it; ``"pad"``
   pads the bottom and right with black to the next multiple; ``"error"`` raises ValueError. A no-op for the
   presets' square crops (multiples of 14); it matters for ``native=True``.
5. ``x = float32(float64(v) * rescale_factor)`` (``do_rescale``), then ``(x - mean) / std`` in float32
   (``do_normalize``): transformers' exact arithmetic (and, for 1/255, bit-identical to torchvision's
   ``ToTensor`` ``float32(v) / 255``).

Inputs: a ``PIL.Image.Image`` (any mode), a numpy array ``(H, W)`` (greyscale) or ``(H, W, C)`` with C in
1, 3, 4 (1: greyscale, 4: RGBA), a torch tensor ``(C, H, W)`` / ``(H, W, C)`` / ``(H, W)`` (a 3-D tensor whose
first side is 1, 3 or 4 is channels-first), or a list / tuple of those (types may be mixed); a 4-D array
``(B, H, W, C)`` or tensor ``(B, C, H, W)`` / ``(B, H, W, C)`` is a batch. Pixel values: uint8 (or any
integer dtype within ``[0, 255]``), or floating point in ``[0, 1]``, which is quantized to 8 bits first by
rounding to nearest (``round(x * 255)``: ``k / 255`` gives back ``k`` exactly), because the resize works on
8-bit images as the released pipeline's does; so the same pixels give the same output whatever the container.
(transformers' PIL backend truncates ``x * 255`` instead, which can lower a float pixel by one level.)

The module needs numpy and torch only to import (``aimv2.pretrained.save_encoder`` writes the config without
Pillow); processing images needs Pillow (the ``train`` extra).

Known differences from ``CLIPImageProcessor``: its torchvision ("fast") backend resizes with torch and differs
by small amounts (not the released evaluation path); images of modes ``I;16``, ``I``, ``F`` (scaled to 8 bits
here, Pillow's ``convert("RGB")`` there) and ``La`` / ``RGBa`` (premultiplied alpha: composited here).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

__all__ = ["AIMv2ImageProcessor", "build_processor", "PRESETS", "CONFIG_NAME", "OPENAI_CLIP_MEAN",
           "OPENAI_CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD"]

# The same values as aimv2.data.transforms' CLIP_* / IMAGENET_* (NORMALIZATIONS; a test checks): repeated here
# because aimv2.data needs Pillow to import and this module must not (aimv2.pretrained imports it).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS = ("released", "ml-aim")
CONFIG_NAME = "preprocessor_config.json"
ML_AIM_CROP_PCT = 0.875  # ml-aim's val_transforms: Resize(ceil(img_size / 0.875)) then CenterCrop(img_size)
MAX_CONFIG_BYTES = 1 << 20  # a preprocessor_config.json larger than this is refused before it is parsed
MAX_SIDE = 1 << 15  # the largest resize / crop side a config may ask for
CROP_OFFSETS = ("floor", "round")
PATCH_FITS = ("crop", "pad", "error")
# image_processor_type values whose semantics (and defaults for missing keys) are CLIPImageProcessor's.
_CLIP_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor")
# Keys this module writes beyond transformers' CLIPImageProcessor ones; transformers keeps them as inert attributes.
_EXTRA_KEYS = {"aimv2_crop_offset": "floor", "aimv2_patch_size": 14, "aimv2_patch_fit": "crop"}
_RESAMPLE_CODES = (0, 1, 2, 3, 4, 5)  # Pillow's NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING

if TYPE_CHECKING:  # Pillow is imported when images are processed, not with the module
    from PIL import Image

ImageInput = Union["Image.Image", np.ndarray, torch.Tensor]


def _pil():
    from ._extras import require
    return require("PIL.Image", "aimv2.processor (processing images)")


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_int(name: str, value: Any, low: int = 1, high: int = MAX_SIDE) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _check_side_pair(name: str, value: Any) -> int | tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or an (height, width) pair, got {len(value)} values")
        return _check_int(f"{name}[0]", value[0]), _check_int(f"{name}[1]", value[1])
    return _check_int(name, value)


def _check_stats(name: str, value: Any, positive: bool) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel) or one number, got {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise TypeError(f"{name}[{i}] must be a number, got {type(v).__name__}")
        if not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{name}[{i}] must be finite{' and > 0' if positive else ''}, got {v}")
        out.append(float(v))
    return out[0], out[1], out[2]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _pair(side: int | tuple[int, int]) -> tuple[int, int]:
    return (side, side) if isinstance(side, int) else side


def _crop_start(length: int, crop: int, rule: str) -> int:
    """Index of the input row (column) that becomes the crop's first one; negative: zero padding before."""
    if rule == "floor":  # transformers' center_crop: (H - h) // 2, also when padding (ceil(d / 2) before)
        return (length - crop) // 2
    if length >= crop:  # torchvision's CenterCrop: int(round((H - h) / 2.0)), Python's round half to even
        return int(round((length - crop) / 2.0))
    return -((crop - length) // 2)  # torchvision pads (crop - H) // 2 before, the rest after


@dataclass(frozen=True)
class AIMv2ImageProcessor:
    """Images to AIMv2 encoder input: ``processor(images)`` -> float32 CPU tensor ``(B, 3, H, W)``.

    The defaults are the ``"released"`` preset at 224 px. Fields (transformers' ``CLIPImageProcessor`` names;
    the module docstring describes each step):

    Args:
        do_resize: resize (step 2).
        size: an int: the shorter side's target (transformers' ``{"shortest_edge": size}``); an ``(h, w)``
            pair: the exact output size (``{"height": h, "width": w}``).
        resample: Pillow's filter code: 0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic (default), 4 box, 5 Hamming.
        do_center_crop: center crop (step 3).
        crop_size: the crop, an int (square) or an ``(h, w)`` pair (a square pair is stored as an int).
        crop_offset: ``"floor"`` (transformers' offsets) or ``"round"`` (torchvision's ``CenterCrop``).
        do_rescale: multiply the 8-bit values by ``rescale_factor`` (step 5).
        rescale_factor: the factor, > 0 (1/255).
        do_normalize: ``(x - image_mean) / image_std`` per channel (step 5).
        image_mean: 3 numbers (or one for all channels).
        image_std: 3 positive numbers (or one).
        do_convert_rgb: convert every image to RGB (step 1); False requires RGB images.
        patch_size: the encoder's patch size; output sides are made multiples of it (step 4).
        patch_fit: ``"crop"``, ``"pad"`` or ``"error"``: what step 4 does to a side that is not a multiple.

    Raises:
        TypeError / ValueError: a field of the wrong type or out of range, naming it.
    """

    do_resize: bool = True
    size: int | tuple[int, int] = 224
    resample: int = 3
    do_center_crop: bool = True
    crop_size: int | tuple[int, int] = 224
    crop_offset: str = "floor"
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    patch_size: int = 14
    patch_fit: str = "crop"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            put(name, _check_bool(name, getattr(self, name)))
        put("size", _check_side_pair("size", self.size))
        crop = _check_side_pair("crop_size", self.crop_size)
        put("crop_size", crop[0] if isinstance(crop, tuple) and crop[0] == crop[1] else crop)  # (s, s) is s
        if isinstance(self.resample, (bool, np.bool_)) or not isinstance(self.resample, (int, np.integer)):
            raise TypeError(f"resample must be an int (a Pillow filter code), got {type(self.resample).__name__}")
        if int(self.resample) not in _RESAMPLE_CODES:
            raise ValueError(f"resample must be a Pillow filter code in {_RESAMPLE_CODES}, got {self.resample}")
        put("resample", int(self.resample))
        put("crop_offset", _check_choice("crop_offset", self.crop_offset, CROP_OFFSETS))
        rf = self.rescale_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float, np.floating)):
            raise TypeError(f"rescale_factor must be a number, got {type(rf).__name__}")
        if not (math.isfinite(rf) and rf > 0):
            raise ValueError(f"rescale_factor must be finite and > 0, got {rf}")
        put("rescale_factor", float(rf))
        put("image_mean", _check_stats("image_mean", self.image_mean, positive=False))
        put("image_std", _check_stats("image_std", self.image_std, positive=True))
        put("patch_size", _check_int("patch_size", self.patch_size))
        put("patch_fit", _check_choice("patch_fit", self.patch_fit, PATCH_FITS))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str = "released", image_size: int = 224, *, native: bool = False,
                    patch_size: int = 14) -> AIMv2ImageProcessor:
        """The processor of a preset (``PRESETS``: ``"released"``, ``"ml-aim"``, see the module docstring) at
        ``image_size`` (the crop side; 224, 336 or 448 for the released checkpoints).

        ``native=True``: the native-resolution checkpoints' setting, ``do_resize=False, do_center_crop=False``
        (``size`` and ``crop_size`` are still recorded, as in their hub config). ``patch_size``: see step 4.

        Raises:
            TypeError / ValueError: an unknown preset (naming the presets) or a bad ``image_size``.
        """
        name = _check_choice("name", name, PRESETS)
        image_size = _check_int("image_size", image_size)
        native = _check_bool("native", native)
        common = dict(do_resize=not native, do_center_crop=not native, crop_size=image_size, patch_size=patch_size)
        if name == "released":
            return cls(size=image_size, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                       crop_offset="floor", **common)
        # ceil as ml-aim's val_transforms (exact: image_size / 0.875 is 8 * image_size / 7, correctly rounded)
        return cls(size=min(MAX_SIDE, math.ceil(image_size / ML_AIM_CROP_PCT)), image_mean=IMAGENET_MEAN,
                   image_std=IMAGENET_STD, crop_offset="round", **common)

    @classmethod
    def for_encoder(cls, encoder: Any, preset: str = "released") -> AIMv2ImageProcessor:
        """``preset`` for an ``AIMv2Encoder`` (or its ``EncoderConfig``): at its ``image_size`` and
        ``patch_size``, and ``native=True`` when its position embedding is sin-cos (native resolution)."""
        from .config import EncoderConfig
        cfg = getattr(encoder, "cfg", encoder)
        if not isinstance(cfg, EncoderConfig):
            raise TypeError(f"encoder must be an aimv2.model.AIMv2Encoder or an aimv2.config.EncoderConfig, got "
                            f"{type(encoder).__name__}")
        return cls.from_preset(preset, cfg.image_size, native=cfg.pos_embed == "sincos",
                               patch_size=cfg.patch_size)

    # ------------------------------------------------------------------ preprocessor_config.json
    def to_dict(self) -> dict[str, Any]:
        """This processor as a ``preprocessor_config.json`` dict in transformers' ``CLIPImageProcessor`` format
        (``image_processor_type: "CLIPImageProcessor"``, ``size`` as ``{"shortest_edge": n}`` or
        ``{"height", "width"}``, ``crop_size`` as ``{"height", "width"}``).

        Settings transformers has no key for are written as ``aimv2_crop_offset``, ``aimv2_patch_size`` and
        ``aimv2_patch_fit``, and only when they differ from transformers' behaviour (``"floor"``, 14,
        ``"crop"``): the ``"released"`` preset's dict has transformers' keys only. transformers keeps the extra
        keys as attributes without using them (so an ``"ml-aim"`` config loaded there crops with transformers'
        offsets, one pixel off on some images)."""
        crop_h, crop_w = _pair(self.crop_size)
        size = ({"shortest_edge": self.size} if isinstance(self.size, int)
                else {"height": self.size[0], "width": self.size[1]})
        out: dict[str, Any] = {
            "crop_size": {"height": crop_h, "width": crop_w},
            "do_center_crop": self.do_center_crop,
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "CLIPImageProcessor",
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": size,
        }
        for key, default in _EXTRA_KEYS.items():
            value = getattr(self, key[len("aimv2_"):])
            if value != default:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any], *, source: str = "config") -> AIMv2ImageProcessor:
        """The processor of a ``preprocessor_config.json`` dict (``CLIPImageProcessor`` format, as ``to_dict``
        writes and the released checkpoints ship). Keys missing (or null) take ``CLIPImageProcessor``'s
        defaults; unknown keys are ignored (transformers adds bookkeeping keys over versions).

        Args:
            config: the parsed JSON object.
            source: what to name in errors (``from_pretrained`` passes the file).

        Raises:
            ValueError: (naming ``source`` and the key) a value of the wrong type or out of range, another
                processor type than CLIP's, or a setting this processor does not implement (``do_pad``,
                ``size`` with ``longest_edge`` and similar).
        """
        if not isinstance(config, dict):
            raise ValueError(f"{source}: a preprocessor config must be a JSON object, got {type(config).__name__}")
        cfg = {k: v for k, v in config.items() if v is not None}
        kind = cfg.get("image_processor_type", cfg.get("feature_extractor_type", "CLIPImageProcessor"))
        if kind not in _CLIP_TYPES:
            raise ValueError(f"{source}: image_processor_type {kind!r} is not supported: AIMv2ImageProcessor "
                             f"reads CLIPImageProcessor configs ({', '.join(_CLIP_TYPES)})")
        if cfg.get("do_pad"):
            raise ValueError(f"{source}: do_pad=true is not supported by AIMv2ImageProcessor")
        kwargs: dict[str, Any] = {}
        try:
            for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb",
                        "resample", "rescale_factor", "image_mean", "image_std"):
                if key in cfg:
                    kwargs[key] = cfg[key]
            if "size" in cfg:
                kwargs["size"] = _size_from_json("size", cfg["size"], shortest=True)
            if "crop_size" in cfg:
                kwargs["crop_size"] = _size_from_json("crop_size", cfg["crop_size"], shortest=False)
            for key in _EXTRA_KEYS:
                if key in cfg:
                    kwargs[key[len("aimv2_"):]] = cfg[key]
            if isinstance(kwargs.get("image_mean"), list):
                kwargs["image_mean"] = tuple(kwargs["image_mean"])
            if isinstance(kwargs.get("image_std"), list):
                kwargs["image_std"] = tuple(kwargs["image_std"])
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> AIMv2ImageProcessor:
        """Read ``path/preprocessor_config.json`` (``path`` a folder, e.g. a released checkpoint or an export
        of ``aimv2.pretrained.save_encoder``, or a Hugging Face hub id resolved through :mod:`aimv2.hub`) or the
        JSON file ``path`` itself.

        Raises:
            TypeError: ``path`` is not a str / PathLike.
            FileNotFoundError: no such file.
            ValueError: (naming the file) over ``MAX_CONFIG_BYTES``, not UTF-8 JSON, or bad content (``from_dict``).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        file = Path(path)
        if not file.exists():
            from .hub import is_hub_id, resolve

            if is_hub_id(path):
                file = resolve(path)
        if file.is_dir():
            file = file / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"no preprocessor config at {str(file)!r}")
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{file}: {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit of a preprocessor config")
        with open(file, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError(f"{file}: over the {MAX_CONFIG_BYTES}-byte limit of a preprocessor config")
        try:
            config = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{file}: not a JSON preprocessor config: {exc}") from None
        return cls.from_dict(config, source=str(file))

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write ``to_dict()`` as ``path/preprocessor_config.json`` (the folder is created if needed; an existing
        file is replaced). Returns the file's path. ValueError when ``path`` is a file."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"path {str(path)!r} is a file; save_pretrained writes a folder")
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / CONFIG_NAME
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file

    # ------------------------------------------------------------------ geometry
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of a ``height x width`` image after the resize step (itself when ``do_resize`` is off)."""
        height, width = _check_int("height", height, high=1 << 62), _check_int("width", width, high=1 << 62)
        if not self.do_resize:
            return height, width
        if not isinstance(self.size, int):
            return self.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` of the output for a ``height x width`` input: after the resize, the crop and step 4.

        Raises:
            ValueError: ``patch_fit="error"`` and a side is not a multiple of ``patch_size``, or ``"crop"`` and a
                side is shorter than one patch.
        """
        h, w = self.resized_size(height, width)
        if self.do_center_crop:
            h, w = _pair(self.crop_size)
        return self._fit_size(h, w, "image")

    def _fit_size(self, h: int, w: int, name: str) -> tuple[int, int]:
        p = self.patch_size
        if h % p == 0 and w % p == 0:
            return h, w
        if self.patch_fit == "error":
            raise ValueError(f"{name} is {h}x{w} (height x width) after resizing and cropping, not a multiple of "
                             f"patch_size {p} on each side (patch_fit='error'; 'crop' or 'pad' would fix it)")
        if self.patch_fit == "pad":
            return -(-h // p) * p, -(-w // p) * p
        if h < p or w < p:
            raise ValueError(f"{name} is {h}x{w} (height x width) after resizing and cropping, smaller than one "
                             f"{p}x{p} patch; use patch_fit='pad' or resize it")
        return h // p * p, w // p * p

    # ------------------------------------------------------------------ processing
    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Preprocess ``images`` (one image, a list / tuple of images, or a 4-D batch; see the module docstring
        for the accepted types, layouts and value ranges).

        Returns:
            float32 CPU tensor ``(B, 3, H, W)``, contiguous; ``B = 1`` for a single image. ``(H, W)`` is
            ``output_size`` of each input (the crop for the presets).

        Raises:
            TypeError: (naming ``images`` or ``images[i]``) an unsupported type or dtype (bool, complex, object).
            ValueError: (naming it) an empty list or batch, a bad shape (a 5-D tensor, 2 channels, an empty side),
                values out of range (floats outside ``[0, 1]`` or not finite, integers outside ``[0, 255]``),
                a non-RGB image with ``do_convert_rgb=False``, outputs of different sizes in one call (native
                resolution: process such images one at a time), or step 4's errors.
            ImportError: Pillow is missing (``pip install 'aimv2-kernels[train]'``).
        """
        pil = _pil()
        from .data.decode import to_rgb
        out = [self._process(pil, to_rgb, name, img) for name, img in _split(images)]
        shapes = {a.shape for a in out}
        if len(shapes) > 1:
            sizes = sorted({f"{s[1]}x{s[2]}" for s in shapes})
            raise ValueError(f"images give outputs of different sizes ({', '.join(sizes)}, height x width), which "
                             "cannot be one batch: process them one at a time (native resolution) or resize")
        return torch.from_numpy(np.ascontiguousarray(np.stack(out)))

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """The same as calling the processor: float32 ``(B, 3, H, W)`` of ``images``."""
        return self(images)

    def _process(self, pil: Any, to_rgb: Any, name: str, img: Any) -> np.ndarray:
        """One image -> float32 ``(3, H, W)``."""
        if not isinstance(img, pil.Image):
            arr = _to_uint8(name, img)
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[:, :, 0]
            img = pil.fromarray(np.ascontiguousarray(arr))  # uint8 (H, W): L, (H, W, 3): RGB, (H, W, 4): RGBA
        if img.size[0] < 1 or img.size[1] < 1:
            raise ValueError(f"{name} is empty ({img.size[0]}x{img.size[1]})")
        if self.do_convert_rgb:
            img = to_rgb(img)
        elif img.mode != "RGB" or "transparency" in img.info:
            raise ValueError(f"{name} has mode {img.mode!r}; do_convert_rgb=False needs RGB images")
        width, height = img.size
        if self.do_resize:
            h, w = self.resized_size(height, width)
            if (w, h) != (width, height):
                img = img.resize((w, h), resample=self.resample)
        arr = np.asarray(img)  # (H, W, 3) uint8
        if self.do_center_crop:
            arr = self._center_crop(arr)
        arr = self._fit_patches(arr, name)
        x = arr.astype(np.float64) * self.rescale_factor if self.do_rescale else arr
        x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x.transpose(2, 0, 1)

    def _center_crop(self, arr: np.ndarray) -> np.ndarray:
        height, width = arr.shape[:2]
        ch, cw = _pair(self.crop_size)
        top, left = _crop_start(height, ch, self.crop_offset), _crop_start(width, cw, self.crop_offset)
        if top >= 0 and left >= 0 and top + ch <= height and left + cw <= width:
            return arr[top:top + ch, left:left + cw]
        out = np.zeros((ch, cw, arr.shape[2]), arr.dtype)
        y0, y1, x0, x1 = max(top, 0), min(top + ch, height), max(left, 0), min(left + cw, width)
        out[y0 - top:y1 - top, x0 - left:x1 - left] = arr[y0:y1, x0:x1]
        return out

    def _fit_patches(self, arr: np.ndarray, name: str) -> np.ndarray:
        h, w = arr.shape[:2]
        fh, fw = self._fit_size(h, w, name)
        if (fh, fw) == (h, w):
            return arr
        if fh <= h and fw <= w:
            return arr[:fh, :fw]
        out = np.zeros((fh, fw, arr.shape[2]), arr.dtype)
        out[:h, :w] = arr
        return out


def _size_from_json(name: str, value: Any, *, shortest: bool) -> int | tuple[int, int]:
    """transformers' ``size`` / ``crop_size`` forms -> an int (shortest edge / square crop) or ``(h, w)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list):  # legacy (h, w)
        return tuple(value) if len(value) == 2 else value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an int or an object, got {type(value).__name__}")
    keys = {k for k, v in value.items() if v is not None}
    if shortest and keys == {"shortest_edge"}:
        return value["shortest_edge"]
    if keys == {"height", "width"}:
        return value["height"], value["width"]
    want = '{"shortest_edge": n} or {"height": h, "width": w}' if shortest else '{"height": h, "width": w}'
    raise ValueError(f"{name} {value!r} is not supported: AIMv2ImageProcessor reads {want}")


def _split(images: Any) -> list[tuple[str, Any]]:
    """``images`` -> ``[(name for errors, one image), ...]``."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list: pass at least one image")
        out = []
        for i, img in enumerate(images):
            if isinstance(img, (list, tuple)):
                raise TypeError(f"images[{i}] is a {type(img).__name__}: images must be one image or a flat list")
            if isinstance(img, (np.ndarray, torch.Tensor)) and img.ndim == 4:
                raise ValueError(f"images[{i}] is a 4-D batch {tuple(img.shape)}: pass a batch on its own, not "
                                 "inside a list")
            out.append((f"images[{i}]", img))
        return out
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError(f"images is an empty batch {tuple(images.shape)}")
        if isinstance(images, torch.Tensor) and images.shape[1] in (1, 3, 4):  # (B, C, H, W)
            images = images.permute(0, 2, 3, 1)
        elif images.shape[-1] not in (1, 3, 4):
            layout = "(B, C, H, W) or (B, H, W, C)" if isinstance(images, torch.Tensor) else "(B, H, W, C)"
            raise ValueError(f"images is a 4-D batch of shape {tuple(images.shape)}: expected {layout} with C in "
                             "1, 3, 4")
        if isinstance(images, torch.Tensor):
            images = _tensor_to_numpy("images", images)
        return [(f"images[{i}]", img) for i, img in enumerate(images)]
    return [("images", images)]


def _tensor_to_numpy(name: str, t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} has dtype {t.dtype}: images must be uint8 / integer in [0, 255] or float in "
                        "[0, 1]")
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)  # float16 / bfloat16: numpy has no bfloat16
    return t.numpy()


def _to_uint8(name: str, img: Any) -> np.ndarray:
    """A numpy array or torch tensor image -> uint8 ``(H, W)`` or ``(H, W, C)``, C in 1, 3, 4."""
    if isinstance(img, torch.Tensor):
        if img.ndim == 3 and img.shape[0] in (1, 3, 4):  # (C, H, W), torch's convention, also when ambiguous
            img = img.permute(1, 2, 0)
        elif img.ndim == 3 and img.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{name} has shape {tuple(img.shape)}: a 3-D tensor must be (C, H, W) or (H, W, C) "
                             "with C in 1, 3, 4")
        if img.ndim in (2, 3):
            img = _tensor_to_numpy(name, img)
    elif isinstance(img, (str, os.PathLike, bytes)):
        raise TypeError(f"{name} is a {type(img).__name__}: pass decoded images (open files with "
                        "PIL.Image.open)")
    if not isinstance(img, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a PIL.Image.Image, a numpy array or a torch tensor, got "
                        f"{type(img).__name__}")
    if img.ndim not in (2, 3):
        raise ValueError(f"{name} has {img.ndim} dimensions {tuple(img.shape)}: an image is (H, W) or (H, W, C) "
                         "((C, H, W) for a tensor); a batch is 4-D")
    if img.ndim == 3 and img.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name} has shape {tuple(img.shape)}: a numpy image must be (H, W) or (H, W, C) with "
                         "C in 1, 3, 4 (transpose a (C, H, W) array)")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {tuple(img.shape)}")
    kind = img.dtype.kind
    if kind == "u" and img.dtype.itemsize == 1:
        return img
    if kind in "iu":
        lo, hi = int(img.min()), int(img.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{name} has integer values in [{lo}, {hi}]: integer images must be in [0, 255]")
        return img.astype(np.uint8)
    if kind == "f":
        x = img.astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"{name} has values that are not finite (NaN or inf)")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name} has float values in [{lo:g}, {hi:g}]: float images must be in [0, 1] "
                             "(pass uint8 for [0, 255])")
        return np.rint(x * 255.0).astype(np.uint8)
    raise TypeError(f"{name} has dtype {img.dtype}: images must be uint8 / integer in [0, 255] or float in [0, 1]")


def build_processor(preset: str = "released", image_size: int = 224, *, native: bool = False,
                    patch_size: int = 14) -> AIMv2ImageProcessor:
    """``AIMv2ImageProcessor.from_preset(preset, image_size, native=native, patch_size=patch_size)``: the
    ``"released"`` (Hugging Face checkpoints' config) or ``"ml-aim"`` (Apple's evaluation) preprocessing."""
    return AIMv2ImageProcessor.from_preset(preset, image_size, native=native, patch_size=patch_size)
