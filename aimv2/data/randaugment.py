"""RandAugment, ColorJitter and the attentive probe's training augmentation of the AIMv2 paper (Table A2).

The paper trains its attentive probe on images augmented on the fly: RandomResizedCrop 224 (scale 0.08-1,
ratio 3/4-4/3, bicubic), a horizontal flip (p 0.5), ColorJitter 0.3 and RandAugment ``rand-m9-mstd0.5-inc1``
in timm's notation. This module writes those with PIL, drawing every random number from a
``numpy.random.Generator`` (as ``aimv2.data.transforms`` does), so an image's augmentation is a function of that
generator's seed only. The semantics are timm's (``timm/data/auto_augment.py`` and ``transforms_factory.py``,
timm 1.0.31, read for this module; no code is copied, and the random streams differ: timm draws from Python's
``random`` and ``numpy.random``, this module from the generator it is given).

RandAugment (:class:`RandAugment`, :func:`parse_rand_augment`). ``rand-m9-mstd0.5-inc1`` reads: magnitude
``m = 9`` on a 0-10 scale, each op's magnitude drawn ``N(9, 0.5)`` then clipped to ``[0, 10]`` (``mmax``,
default 10), the "increasing" op set (every op gets stronger as the magnitude grows), ``n = 2`` ops per image
(timm's default) chosen uniformly **with replacement** among the 15 ops, each then applied with probability
``p = 0.5`` (timm's default). Per op, with ``level = magnitude / 10`` (the value at ``m = 9`` in brackets;
"±": the sign is drawn, + or - with probability 1/2 each):

====================  =======================================================  ====================
op                    argument                                                 at m = 9
====================  =======================================================  ====================
AutoContrast          none (``ImageOps.autocontrast``)
Equalize              none (``ImageOps.equalize``)
Invert                none (``ImageOps.invert``)
Rotate                ± ``30 level`` degrees (``Image.rotate``)                ±27°
PosterizeIncreasing   keep ``4 - int(4 level)`` bits (``ImageOps.posterize``)  1 bit (0 at m = 10)
SolarizeIncreasing    invert pixels ``>= 256 - int(256 level)``                threshold 26
SolarizeAdd           ``+ int(110 level)`` (<= 128) to pixels ``< 128``        +99
ColorIncreasing       ``ImageEnhance.Color``, ``max(0.1, 1 ± 0.9 level)``      1.81 or 0.19
ContrastIncreasing    ``ImageEnhance.Contrast``, the same factor               1.81 or 0.19
BrightnessIncreasing  ``ImageEnhance.Brightness``, the same factor             1.81 or 0.19
SharpnessIncreasing   ``ImageEnhance.Sharpness``, the same factor              1.81 or 0.19
ShearX                affine ``(1, ±0.3 level, 0, 0, 1, 0)``                   ±0.27
ShearY                affine ``(1, 0, 0, ±0.3 level, 1, 0)``                   ±0.27
TranslateXRel         shift by ± ``0.45 level`` of the width                   ±40.5% of the width
TranslateYRel         shift by ± ``0.45 level`` of the height                  ±40.5% of the height
====================  =======================================================  ====================

``inc0`` (the original set) replaces the four "Increasing" enhancements by unsigned factors ``1.8 level + 0.1``
(1.72 at m = 9), ``PosterizeIncreasing`` by ``Posterize`` (keep ``int(4 level)`` bits, 8 or more: unchanged) and
``SolarizeIncreasing`` by ``Solarize`` (threshold ``min(256, int(256 level))``); in that set a larger magnitude
is not always stronger. Geometric ops (Rotate, Shear, Translate) resample bicubically (timm's
``interpolation='bicubic'``; its ``'random'`` default would pick bilinear or bicubic per op) and fill the
uncovered area with the normalization mean in 0-255 (timm's ``img_mean``: ``round(255 * mean)``, (124, 116,
104) for ImageNet's). Draws per image: ``n`` op indices (``integers``), then per op ``random()`` (applied when
``<= p``, as timm skips when ``> p``) and, when applied, the magnitude (``normal(m, mstd)``; ``uniform(0, m)``
for ``mstd > 100``, timm's "infinite" std; none when ``mstd = 0``) and, for a signed op, ``random()`` (negated
when ``> 0.5``).

ColorJitter (:class:`ColorJitter`): torchvision's, on PIL images: brightness, contrast and saturation factors
drawn uniformly in ``[max(0, 1 - 0.3), 1 + 0.3]`` and applied in a random order (``ImageEnhance.Brightness``,
``Contrast`` and ``Color``, as torchvision's PIL functions). Hue 0: timm expands a scalar ``color_jitter`` to
``(b, c, s)`` without hue, and the paper gives one number (0.3); a non-zero ``hue`` shifts the HSV hue by
``U(-hue, hue)`` turns, as torchvision does. Draws: a permutation of the 4 (``permutation(4)``), then a factor
per non-zero component, in the order brightness, contrast, saturation, hue.

The whole probe recipe (:class:`ProbeTrainTransform`): ``TrainTransform`` (RandomResizedCrop bicubic + flip) ->
RandAugment -> ColorJitter -> float32 ``(3, S, S)`` in ``[0, 1]``, timm's order (crop and flip, then the
"secondary" RandAugment and colour jitter). NOTE: timm's ``create_transform`` turns colour jitter *off* when
RandAugment is on (unless ``force_color_jitter``); the paper's table lists both, so both are applied here
(``color_jitter=0`` gives timm's default behaviour).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from .decode import Image, LazyImage, to_rgb
from .transforms import IMAGENET_MEAN, TrainTransform, to_tensor

__all__ = [
    "RAND_INCREASING_OPS",
    "RAND_OPS",
    "PAPER_RAND_AUGMENT",
    "OpDraw",
    "op_argument",
    "apply_op",
    "parse_rand_augment",
    "RandAugment",
    "ColorJitter",
    "ProbeTrainTransform",
    "fill_of",
    "to_pil",
]

# timm's _RAND_INCREASING_TRANSFORMS ('inc1') and _RAND_TRANSFORMS ('inc0'), in timm's order (Cutout is not
# among them: timm does it as random erasing, which the paper's probe recipe does not use).
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                       "TranslateYRel")
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
PAPER_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # AIMv2 Table A2 (timm notation)

_LEVEL_DENOM = 10.0  # timm: magnitudes are on a 0-10 scale
_TRANSLATE_PCT = 0.45  # timm's default 'translate_pct' of the relative translations
_NO_ARGUMENT = frozenset({"AutoContrast", "Equalize", "Invert"})
_SIGNED = frozenset({"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                     "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
_ENHANCE = {"Color": "Color", "Contrast": "Contrast", "Brightness": "Brightness", "Sharpness": "Sharpness"}
_ALL_OPS = frozenset(RAND_INCREASING_OPS) | frozenset(RAND_OPS)
_BICUBIC = Image.Resampling.BICUBIC


def fill_of(mean: Sequence[float] = IMAGENET_MEAN) -> tuple[int, int, int]:
    """The fill colour of the geometric ops for a normalization ``mean`` in ``[0, 1]``: ``round(255 * mean)``
    per channel, at most 255 (timm's ``img_mean``); ``(124, 116, 104)`` for ImageNet's mean."""
    values = tuple(min(255, round(255 * float(m))) for m in mean)
    if len(values) != 3 or min(values) < 0:
        raise ValueError(f"mean must be 3 values in [0, 1], got {tuple(mean)!r}")
    return values  # type: ignore[return-value]


def _check_name(name: str) -> str:
    if name not in _ALL_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; choose one of {sorted(_ALL_OPS)}")
    return name


def op_argument(name: str, magnitude: float, *, negate: bool = False) -> float | int | None:
    """The argument op ``name`` gets at ``magnitude`` (on timm's 0-10 scale, clipped to ``[0, 10]`` by the
    caller): degrees (Rotate), bits to keep (Posterize*), a threshold (Solarize*), an amount to add
    (SolarizeAdd), an enhancement factor (Color/Contrast/Brightness/Sharpness*), a shear factor, a fraction of
    the side (Translate*Rel); None for AutoContrast, Equalize and Invert. ``negate`` flips the sign of a signed
    op (Rotate, Shear*, Translate*, the four "Increasing" enhancements, whose factor is ``1 - 0.9 level``
    then, at least 0.1) and is ignored by the others. The table is in the module docstring."""
    _check_name(name)
    if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float, np.floating, np.integer)) \
            or not math.isfinite(magnitude) or magnitude < 0:
        raise ValueError(f"magnitude must be a finite number >= 0, got {magnitude!r}")
    level = float(magnitude) / _LEVEL_DENOM
    sign = -1.0 if negate and name in _SIGNED else 1.0
    if name in _NO_ARGUMENT:
        return None
    if name == "Rotate":
        return sign * 30.0 * level
    if name == "Posterize":
        return int(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "Solarize":
        return min(256, int(level * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(level * 256))
    if name == "SolarizeAdd":
        return min(128, int(level * 110))
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/Sharpness: 1.0 is the identity
        return max(0.1, 1.0 + sign * 0.9 * level)
    if name in _ENHANCE:
        return level * 1.8 + 0.1
    if name in ("ShearX", "ShearY"):
        return sign * 0.3 * level
    return sign * _TRANSLATE_PCT * level  # TranslateXRel / TranslateYRel


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * 3)


def apply_op(img: Image.Image, name: str, magnitude: float, *, negate: bool = False,
             fill: tuple[int, int, int] = fill_of(), resample: Image.Resampling = _BICUBIC) -> Image.Image:
    """Op ``name`` at ``magnitude`` (0-10, see :func:`op_argument`) applied to an RGB PIL image; a new image
    (the same object when the op leaves it as it is: Posterize with 8 bits or more). ``fill``: the colour of
    the area a geometric op uncovers; ``resample``: their interpolation (bicubic, as the paper's recipe)."""
    from PIL import ImageEnhance, ImageOps

    if not isinstance(img, Image.Image):
        raise TypeError(f"img must be a PIL.Image.Image, got {type(img).__name__}")
    img = to_rgb(img)
    arg = op_argument(name, magnitude, negate=negate)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, resample=resample, fillcolor=fill)
    if name.startswith("Posterize"):
        return img if arg >= 8 else ImageOps.posterize(img, arg)
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        return _solarize_add(img, arg)
    base = name.removesuffix("Increasing")
    if base in _ENHANCE:
        return getattr(ImageEnhance, _ENHANCE[base])(img).enhance(arg)
    w, h = img.size
    matrix = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
              "TranslateXRel": (1, 0, arg * w, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, arg * h)}[name]
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def parse_rand_augment(config: str) -> dict[str, float | int | bool]:
    """timm's RandAugment string -> keyword arguments of :class:`RandAugment`.

    ``"rand"`` then dash-separated sections in any order: ``m<float>`` magnitude (default 10), ``n<int>`` ops
    per image (2), ``p<float>`` probability of applying each chosen op (0.5), ``mstd<float>`` std of the
    magnitude's normal noise (0; above 100: uniform in ``[0, m]``, timm's "infinite" std), ``mmax<float>``
    upper clip of the magnitude (10), ``inc<0|1>`` the increasing op set (0). timm's ``t`` (weighted op
    choice) is not supported. ``"rand-m9-mstd0.5-inc1"`` -> ``magnitude=9, magnitude_std=0.5,
    increasing=True``. Raises ValueError naming the bad section."""
    if not isinstance(config, str):
        raise TypeError(f"config must be a str, got {type(config).__name__}")
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config must start with 'rand', got {config!r}")
    out: dict[str, float | int | bool] = {}
    keys = {"mstd": "magnitude_std", "mmax": "magnitude_max", "inc": "increasing", "m": "magnitude",
            "n": "num_ops", "p": "prob"}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?|\.\d+)", part)
        if match is None:
            raise ValueError(f"RandAugment config {config!r}: cannot read section {part!r} (known: m, n, p, "
                             f"mstd, mmax, inc followed by a number)")
        key, value = match.group(1), match.group(2)
        if key in ("n", "inc"):
            if not value.isdigit():
                raise ValueError(f"RandAugment config {config!r}: {key} needs an integer, got {value!r}")
            out[keys[key]] = bool(int(value)) if key == "inc" else int(value)
        else:
            out[keys[key]] = float(value)
    return out


@dataclasses.dataclass(frozen=True)
class OpDraw:
    """One chosen op of one image: ``name``, whether it is ``applied`` (the ``p`` draw), its ``magnitude``
    (None when not applied) and ``negate`` (the sign draw of a signed op; False otherwise)."""
    name: str
    applied: bool
    magnitude: float | None = None
    negate: bool = False


class RandAugment:
    """RandAugment as timm's ``rand-...`` transforms (see the module docstring for every op and its mapping).

    ``ra(img, rng)`` -> the augmented RGB PIL image: ``num_ops`` ops chosen uniformly with replacement, each
    applied with probability ``prob`` at a magnitude drawn ``N(magnitude, magnitude_std)`` clipped to
    ``[0, magnitude_max]``. :meth:`draw` makes the draws alone; equal generators give equal images.

    Args:
        magnitude: on timm's 0-10 scale (9 in the paper's recipe).
        num_ops: ops per image (2).
        prob: probability of applying each chosen op (0.5).
        magnitude_std: std of the magnitude noise (0.5 in the paper); 0: fixed; above 100 (or inf): uniform in
            ``[0, magnitude]``.
        magnitude_max: upper clip of the drawn magnitude (timm's default 10).
        increasing: the "increasing" op set (``inc1``, the paper's) or the original one.
        fill: colour of the area a geometric op uncovers (:func:`fill_of`; default ImageNet's mean).
        resample: interpolation of the geometric ops (bicubic).
    """

    def __init__(self, magnitude: float = 9.0, num_ops: int = 2, prob: float = 0.5, magnitude_std: float = 0.5,
                 magnitude_max: float = _LEVEL_DENOM, increasing: bool = True,
                 fill: tuple[int, int, int] = fill_of(), resample: Image.Resampling = _BICUBIC):
        for name, value in (("magnitude", magnitude), ("magnitude_std", magnitude_std),
                            ("magnitude_max", magnitude_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0 \
                    or (name != "magnitude_std" and math.isinf(value)):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be an int >= 0, got {num_ops!r}")
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        if len(fill) != 3 or any(not 0 <= int(c) <= 255 for c in fill):
            raise ValueError(f"fill must be 3 ints in [0, 255], got {fill!r}")
        self.magnitude, self.num_ops, self.prob = float(magnitude), num_ops, float(prob)
        self.magnitude_std = math.inf if magnitude_std > 100 else float(magnitude_std)
        self.magnitude_max, self.increasing = float(magnitude_max), bool(increasing)
        self.ops = RAND_INCREASING_OPS if increasing else RAND_OPS
        self.fill, self.resample = tuple(int(c) for c in fill), resample

    @classmethod
    def from_config(cls, config: str = PAPER_RAND_AUGMENT, **kwargs: object) -> RandAugment:
        """From timm's string (:func:`parse_rand_augment`), e.g. ``"rand-m9-mstd0.5-inc1"``; ``kwargs``:
        ``fill``, ``resample``. timm's defaults fill in what the string leaves out (magnitude 10, 2 ops,
        p 0.5, no magnitude noise, the original op set)."""
        parsed = {"magnitude": 10.0, "num_ops": 2, "prob": 0.5, "magnitude_std": 0.0, "increasing": False,
                  **parse_rand_augment(config)}
        return cls(**parsed, **kwargs)  # type: ignore[arg-type]

    def draw(self, rng: np.random.Generator) -> list[OpDraw]:
        """The random choices for one image, in the order :meth:`__call__` applies them (see the module
        docstring for the order of the draws)."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        picks = rng.integers(0, len(self.ops), size=self.num_ops)
        out = []
        for k in picks:
            name = self.ops[int(k)]
            if rng.random() > self.prob:
                out.append(OpDraw(name, False))
                continue
            m = self.magnitude
            if math.isinf(self.magnitude_std):
                m = rng.uniform(0.0, self.magnitude)
            elif self.magnitude_std > 0:
                m = rng.normal(self.magnitude, self.magnitude_std)
            m = max(0.0, min(float(m), self.magnitude_max))
            negate = bool(rng.random() > 0.5) if name in _SIGNED else False
            out.append(OpDraw(name, True, m, negate))
        return out

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """``img`` (a PIL image, converted to RGB) with the ops :meth:`draw` picks applied in turn."""
        img = to_rgb(img)
        for op in self.draw(rng):
            if op.applied:
                img = apply_op(img, op.name, op.magnitude, negate=op.negate, fill=self.fill,
                               resample=self.resample)
        return img

    def __repr__(self) -> str:
        return (f"RandAugment(magnitude={self.magnitude}, num_ops={self.num_ops}, prob={self.prob}, "
                f"magnitude_std={self.magnitude_std}, magnitude_max={self.magnitude_max}, "
                f"increasing={self.increasing})")


def _adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's PIL ``adjust_hue``: the HSV hue channel shifted by ``factor`` turns (uint8, wrapping)."""
    h, s, v = img.convert("HSV").split()
    hue = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        hue += np.int32(factor * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


class ColorJitter:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` on PIL images, drawing from a numpy
    generator: factors ``U[max(0, 1 - x), 1 + x]`` (hue: ``U[-hue, hue]``), applied in a random order; a
    component of 0 is left out (no draw). ``jitter(img, rng)`` -> RGB PIL image.

    Brightness, contrast and saturation are ``ImageEnhance.Brightness``, ``Contrast`` and ``Color`` (what
    torchvision's PIL functions call), hue an HSV shift. Default 0.3 / 0.3 / 0.3 / 0: the paper's
    ``ColorJitter 0.3`` as timm reads a scalar (no hue).
    """

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.0):
        for name, value, high in (("brightness", brightness, math.inf), ("contrast", contrast, math.inf),
                                  ("saturation", saturation, math.inf), ("hue", hue, 0.5)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                raise ValueError(f"{name} must be a number in [0, {high}], got {value!r}")
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)

    def draw(self, rng: np.random.Generator) -> tuple[list[int], list[float | None]]:
        """``(order, factors)``: the order of the 4 adjustments (0 brightness, 1 contrast, 2 saturation, 3 hue)
        and their factors (None for a component of 0)."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        order = [int(k) for k in rng.permutation(4)]
        factors: list[float | None] = []
        for value in (self.brightness, self.contrast, self.saturation):
            factors.append(float(rng.uniform(max(0.0, 1.0 - value), 1.0 + value)) if value > 0 else None)
        factors.append(float(rng.uniform(-self.hue, self.hue)) if self.hue > 0 else None)
        return order, factors

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """``img`` jittered (a PIL image, converted to RGB)."""
        from PIL import ImageEnhance

        img = to_rgb(img)
        order, factors = self.draw(rng)
        for k in order:
            f = factors[k]
            if f is None:
                continue
            if k == 3:
                img = _adjust_hue(img, f)
            else:
                img = getattr(ImageEnhance, ("Brightness", "Contrast", "Color")[k])(img).enhance(f)
        return img

    def __repr__(self) -> str:
        return (f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue})")


def to_pil(img: torch.Tensor) -> Image.Image:
    """float ``(3, H, W)`` in ``[0, 1]`` -> RGB PIL image (``round(255 x)``, clipped). Exact inverse of
    ``to_tensor`` on its outputs (``v / 255`` in float32 rounds back to ``v``)."""
    if not isinstance(img, torch.Tensor) or not img.is_floating_point() or img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"img must be a float tensor (3, H, W), got "
                         f"{tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
    arr = (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(arr.numpy(), "RGB")


class ProbeTrainTransform:
    """The AIMv2 paper's probe augmentation (Table A2): RandomResizedCrop + flip, RandAugment, ColorJitter.

    ``transform(img, rng)`` -> float32 ``(3, image_size, image_size)`` in ``[0, 1]`` (normalization is the
    caller's). ``img``: a PIL image, a ``LazyImage`` (decoded at a reduced JPEG size when the crop allows:
    ``TrainTransform``'s draft) or a float tensor ``(3, H, W)`` in ``[0, 1]`` (cropped and resized in float,
    then rounded to 8 bits for the PIL ops). Draws from ``rng``, in order: the crop and the flip
    (``TrainTransform``), RandAugment's, ColorJitter's.

    Args:
        image_size: output side (224 in the paper).
        scale, ratio: RandomResizedCrop's ranges (0.08-1, 3/4-4/3); bicubic.
        flip: horizontal flip probability (0.5).
        rand_augment: timm string (``"rand-m9-mstd0.5-inc1"``), a :class:`RandAugment`, or None (none).
        color_jitter: a :class:`ColorJitter`, a number ``x`` (brightness = contrast = saturation = x, no hue),
            or None / 0 (none).
        mean: normalization mean in ``[0, 1]`` the trunk will see; the fill of RandAugment's geometric ops
            when ``rand_augment`` is a string (:func:`fill_of`).
        draft: ``TrainTransform``'s reduced-size JPEG decoding (None: its default).
    """

    def __init__(self, image_size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5,
                 rand_augment: str | RandAugment | None = PAPER_RAND_AUGMENT,
                 color_jitter: float | ColorJitter | None = 0.3, mean: Sequence[float] = IMAGENET_MEAN,
                 draft: bool | None = None):
        self.crop = TrainTransform(image_size, scale=scale, ratio=ratio, flip=flip, draft=draft)
        if isinstance(rand_augment, str):
            rand_augment = RandAugment.from_config(rand_augment, fill=fill_of(mean))
        if rand_augment is not None and not isinstance(rand_augment, RandAugment):
            raise TypeError(f"rand_augment must be a str, a RandAugment or None, got {type(rand_augment).__name__}")
        if isinstance(color_jitter, (int, float)) and not isinstance(color_jitter, bool):
            color_jitter = ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else None
        if color_jitter is not None and not isinstance(color_jitter, ColorJitter):
            raise TypeError(f"color_jitter must be a number, a ColorJitter or None, got "
                            f"{type(color_jitter).__name__}")
        self.rand_augment, self.color_jitter = rand_augment, color_jitter
        self.image_size = self.crop.image_size

    def __call__(self, img: Image.Image | LazyImage | torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``img`` augmented: float32 ``(3, image_size, image_size)`` in ``[0, 1]``."""
        out = self.crop(img, rng)
        if self.rand_augment is None and self.color_jitter is None:
            return out
        pil = to_pil(out)
        if self.rand_augment is not None:
            pil = self.rand_augment(pil, rng)
        if self.color_jitter is not None:
            pil = self.color_jitter(pil, rng)
        return to_tensor(pil)

    def __repr__(self) -> str:
        return (f"ProbeTrainTransform(crop={self.crop!r}, rand_augment={self.rand_augment!r}, "
                f"color_jitter={self.color_jitter!r})")
