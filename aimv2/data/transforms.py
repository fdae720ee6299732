"""The image transforms of the AIMv2 recipe, and the pixel normalization.

Nothing here draws random numbers of its own: the transforms take the ``numpy.random.Generator`` to draw
from, so a sample's augmentation is a function of that generator's seed only.

Transforms (output float32 ``(3, H, W)`` in ``[0, 1]``; normalization is ``Normalize``'s job):

- ``TrainTransform``: torchvision's ``RandomResizedCrop`` (scale 0.4-1, ratio 3/4-4/3, bicubic) then a
  horizontal flip with probability 0.5, the AIMv2 pre-training augmentation (docs/aimv2-reference.md §1).
- ``EvalTransform``: resize the shorter side to ``round(image_size / crop_pct)`` (bicubic), center crop.
- ``native_grid`` / ``fit_and_pad``: the native-resolution canvas (docs/aimv2-reference.md §2): an image resized to fit
  a ``rows x cols`` patch canvas keeping its aspect ratio, placed top left, zero-padded.
- ``Normalize``: ``(x - mean) / std`` per channel; ``NORMALIZATIONS`` names the statistics a run or a probe
  can pick (ImageNet, CLIP).

Reduced-size JPEG decoding ("draft"). ``TrainTransform`` and ``EvalTransform`` also take a ``LazyImage`` (an
image whose header only has been read: ``open_image``, or a source's ``raw(i, lazy=True)``, which the training
loader uses). They then choose their geometry from the full size in the header first (the crop box, the flip:
the same draws from ``rng`` as for the decoded image, so the same crop), and decode a JPEG at the largest
reduction ``r`` in 1, 2, 4, 8 (libjpeg's DCT scaling, Pillow's ``Image.draft``) that still leaves the crop at
least the output size on both sides (``draft_reduction``: the draft never makes the resize enlarge), then crop
and resize the reduced image with the box divided by ``r``. The pixels differ slightly from a full decode
(libjpeg's scaled inverse DCT keeps each 8x8 block's lowest ``8/r x 8/r`` frequencies, close to an ``r x r``
box average, before the bicubic resize): ``bench/loader_throughput.py`` measures it (its ``draft`` section): on
its ImageNet-like JPEGs, a mean absolute difference of about 0.006 in ``[0, 1]`` units (1.5 of 255) over the
drafted samples, about 0.2 at worst at one pixel of a high-contrast edge. Turn it off with
``draft=False`` on the transform, or for the transforms built with the default ``draft=None`` with the
environment variable ``AIMV2_JPEG_DRAFT=0`` (read when the transform is built); off, a ``LazyImage`` is decoded
at full size and the output is bit-identical to the transform of the fully decoded image. Other formats than
JPEG always decode at full size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .decode import JPEG_REDUCTIONS, Image, LazyImage, jpeg_draft_enabled, to_rgb

__all__ = [
    "to_tensor",
    "random_resized_crop_box",
    "draft_reduction",
    "TrainTransform",
    "EvalTransform",
    "native_grid",
    "fit_and_pad",
    "Normalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "NORMALIZATIONS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The pixel statistics a run or a probe can name: (mean, std) per channel.
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}
_BICUBIC = Image.Resampling.BICUBIC


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_pair(name: str, value, low: float, high: float | None) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers, got {value!r}") from None
    if not (low < a <= b) or (high is not None and b > high) or not math.isfinite(b):
        bound = f"<= {high}" if high is not None else "finite"
        raise ValueError(f"{name} must satisfy {low} < {name}[0] <= {name}[1] ({bound}), got {value!r}")
    return a, b


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _check_tensor_image(img: torch.Tensor, name: str = "img") -> torch.Tensor:
    if not img.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {img.dtype}")
    if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        raise ValueError(f"{name} must be (3, H, W), got {tuple(img.shape)}")
    return img


def _image_hw(img) -> tuple[int, int]:
    if isinstance(img, (Image.Image, LazyImage)):
        return img.size[1], img.size[0]
    if isinstance(img, torch.Tensor):
        _check_tensor_image(img)
        return int(img.shape[1]), int(img.shape[2])
    raise TypeError(f"img must be a PIL.Image.Image or a float tensor (3, H, W), got {type(img).__name__}")


def _check_out(out, shape: tuple[int, int, int]) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != shape \
            or out.device.type != "cpu":
        raise ValueError(f"out must be a float32 CPU tensor of shape {shape}")
    return out


def to_tensor(img: Image.Image | torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``(3, H, W)`` in ``[0, 1]`` (``v / 255``) of a PIL image (any mode, via ``to_rgb``), or of a
    float tensor ``(3, H, W)`` (converted to contiguous float32, no copy when it already is and ``out`` is
    None). ``out``: a float32 CPU tensor ``(3, H, W)`` to write into (returned)."""
    if isinstance(img, torch.Tensor):
        _check_tensor_image(img)
        if out is None:
            return img.to(torch.float32).contiguous()
        return _check_out(out, tuple(img.shape)).copy_(img)
    if not isinstance(img, Image.Image):
        raise TypeError(f"img must be a PIL.Image.Image or a float tensor (3, H, W), got {type(img).__name__}")
    arr = np.asarray(to_rgb(img))  # uint8 (H, W, 3)
    out = _check_out(out, (3, arr.shape[0], arr.shape[1]))
    # NOTE: numpy, not torch: torch's strided uint8 -> float32 copy took 31 ms for 224 px on a loaded 2-core
    # VM, numpy's assignment + in-place divide 0.5 ms (same values: float32 v / 255, correctly rounded).
    view = out.detach().numpy()
    view[...] = arr.transpose(2, 0, 1)
    view /= np.float32(255.0)
    return out


def _check_draft(draft) -> bool:
    if draft is None:
        return jpeg_draft_enabled()
    if not isinstance(draft, bool):
        raise TypeError(f"draft must be a bool or None, got {type(draft).__name__}")
    return draft


def draft_reduction(width: int, height: int, out_width: int, out_height: int) -> int:
    """The largest JPEG reduction ``r`` in 1, 2, 4, 8 at which a ``width x height`` region of the full image,
    ``width / r x height / r`` in the reduced one, is still at least ``out_width x out_height``: a resize of
    that region to the output then never enlarges because of the reduction. 1 when the region is smaller
    than twice the output on either side."""
    width, height = _check_int("width", width), _check_int("height", height)
    out_width, out_height = _check_int("out_width", out_width), _check_int("out_height", out_height)
    return max(r for r in JPEG_REDUCTIONS if r == 1 or (width >= r * out_width and height >= r * out_height))


def _resize_tensor(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bicubic (antialiased) resize of float ``(3, H, W)`` to ``(3, h, w)``, clamped to ``[0, 1]``."""
    img = img.to(torch.float32)
    if tuple(img.shape[1:]) == (h, w):
        return img
    return F.interpolate(img[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0].clamp_(0, 1)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with numpy draws: ``(top, left, h, w)`` of a crop of a
    ``width x height`` image whose area is ``U(scale) * width * height`` and aspect ratio ``w / h`` is
    log-uniform in ``ratio``; 10 attempts, then the central crop with the aspect ratio clamped to ``ratio``.

    Draws per attempt: ``uniform(scale)``, ``uniform(log ratio)``; on success ``integers(top range)`` then
    ``integers(left range)``."""
    width, height = _check_int("width", width), _check_int("height", height)
    scale, ratio = _check_pair("scale", scale, 0.0, 1.0), _check_pair("ratio", ratio, 0.0, None)
    return _crop_box(width, height, scale, ratio, _check_rng(rng))


def _crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
              rng: np.random.Generator) -> tuple[int, int, int, int]:
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """The AIMv2 pre-training augmentation: RandomResizedCrop then a horizontal flip.

    ``transform(img, rng)`` -> float32 ``(3, image_size, image_size)`` in ``[0, 1]``. ``img`` is a PIL image
    (any mode, via ``to_rgb``) or a float tensor ``(3, H, W)`` in ``[0, 1]``. The crop box is torchvision's
    algorithm (``random_resized_crop_box``), then the crop is resized bicubically in one step (PIL:
    ``Image.resize(size, BICUBIC, box=crop)``, which reads the pixels around the box edges as the filter
    needs; tensors: ``F.interpolate(bicubic, antialias=True)``, clamped), then it is flipped left-right
    when ``rng.random() < flip``. Everything random comes from ``rng``, in that order (the flip draw is
    always made), so equal generators give equal outputs.

    ``img`` may also be a ``LazyImage`` (header read, not decoded): the crop box and flip are drawn from its
    full size as above, then a JPEG is decoded at the reduction ``draft_reduction(crop w, crop h, image_size,
    image_size)`` and cropped with the box scaled to it (see the module docstring), unless ``draft`` is off.

    Args:
        image_size: output side.
        scale: range of the crop's fraction of the image area, ``0 < lo <= hi <= 1``.
        ratio: range of the crop's aspect ratio ``w / h``, ``0 < lo <= hi``.
        flip: probability of the horizontal flip, in ``[0, 1]``.
        draft: decode a ``LazyImage`` JPEG at reduced size (True), or always at full size (False); None
            (default): on unless the environment sets ``AIMV2_JPEG_DRAFT=0``.
    """

    def __init__(self, image_size: int = 224, scale: tuple[float, float] = (0.4, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5, *, draft: bool | None = None):
        self.image_size = _check_int("image_size", image_size)
        self.scale = _check_pair("scale", scale, 0.0, 1.0)
        self.ratio = _check_pair("ratio", ratio, 0.0, None)
        if isinstance(flip, bool) or not isinstance(flip, (int, float, np.floating)) or not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip must be a probability in [0, 1], got {flip!r}")
        self.flip = float(flip)
        self.draft = _check_draft(draft)

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)``: the crop this transform draws from ``rng`` for a ``width x height`` image."""
        width, height = _check_int("width", width), _check_int("height", height)
        return _crop_box(width, height, self.scale, self.ratio, _check_rng(rng))

    def __call__(self, img: Image.Image | LazyImage | torch.Tensor, rng: np.random.Generator, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """``img`` augmented: float32 ``(3, image_size, image_size)`` in ``[0, 1]`` (into ``out`` if given)."""
        h, w = _image_hw(img)
        top, left, ch, cw = self.crop_box(w, h, rng)
        flip = rng.random() < self.flip
        s = self.image_size
        box = (left, top, left + cw, top + ch)
        if isinstance(img, LazyImage):
            img, r = img.decode(draft_reduction(cw, ch, s, s) if self.draft and img.reducible else 1)
            if r > 1:  # the same region of the reduced image
                box = (left / r, top / r, (left + cw) / r, (top + ch) / r)
        if isinstance(img, Image.Image):
            res = to_rgb(img).resize((s, s), _BICUBIC, box=box)
            if flip:
                res = res.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return to_tensor(res, out=out)
        res = _resize_tensor(img[:, top:top + ch, left:left + cw], s, s)
        if flip:
            res = res.flip(-1)
        out = _check_out(out, (3, s, s))
        return out.copy_(res)

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"flip={self.flip}, draft={self.draft})")


class EvalTransform:
    """Evaluation preprocessing: resize the shorter side to ``round(image_size / crop_pct)`` (bicubic, the
    longer side to ``int(short * long / short_in)`` as torchvision's ``Resize(int)``), then center crop
    ``image_size`` (torchvision's ``CenterCrop`` offsets). ``crop_pct=1.0`` is the HF/timm AIMv2 setting,
    0.875 the ml-aim one (docs/aimv2-reference.md §3).

    ``transform(img, rng=None)`` -> float32 ``(3, image_size, image_size)`` in ``[0, 1]``; ``img`` a PIL image
    (any mode), a float tensor ``(3, H, W)`` in ``[0, 1]`` or a ``LazyImage``; ``rng`` is ignored (the
    signature matches ``TrainTransform``). A ``LazyImage`` JPEG is decoded at the reduction
    ``draft_reduction(W, H, resized w, resized h)`` when ``draft`` is on (None, the default: unless
    ``AIMV2_JPEG_DRAFT=0``), and the whole reduced image resized as the full one would be."""

    def __init__(self, image_size: int = 224, crop_pct: float = 1.0, *, draft: bool | None = None):
        self.image_size = _check_int("image_size", image_size)
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        self.crop_pct = float(crop_pct)
        self.resize_size = int(round(self.image_size / self.crop_pct))
        self.draft = _check_draft(draft)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(w, h)`` of a ``width x height`` image after the shorter-side resize."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, img: Image.Image | LazyImage | torch.Tensor, rng: np.random.Generator | None = None, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """``img`` resized and center-cropped: float32 ``(3, image_size, image_size)`` (into ``out`` if given)."""
        h, w = _image_hw(img)
        rw, rh = self.resized_size(w, h)
        s = self.image_size
        top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
        r = 1
        if isinstance(img, LazyImage):
            img, r = img.decode(draft_reduction(w, h, rw, rh) if self.draft and img.reducible else 1)
        if isinstance(img, Image.Image):
            img = to_rgb(img)
            if r > 1:  # the whole reduced image: (W / r, H / r) of it, as the full image is (W, H)
                img = img.resize((rw, rh), _BICUBIC, box=(0, 0, w / r, h / r))
            elif (rw, rh) != (w, h):
                img = img.resize((rw, rh), _BICUBIC)
            return to_tensor(img.crop((left, top, left + s, top + s)), out=out)
        res = _resize_tensor(img, rh, rw)[:, top:top + s, left:left + s]
        return _check_out(out, (3, s, s)).copy_(res)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, crop_pct={self.crop_pct}, draft={self.draft})"


def native_grid(budget: int) -> tuple[int, int]:
    """The ``(rows, cols)`` patch canvas of a native-resolution patch budget ``budget = 2**n`` (docs/aimv2-reference.md
    §2): ``rows = 2**(n // 2)``, ``cols = 2**(n - n // 2)``, so ``rows * cols == budget`` and the canvas is
    square (even ``n``) or twice as wide as tall (odd ``n``): 128 -> (8, 16), 256 -> (16, 16)."""
    budget = _check_int("budget", budget)
    if budget & (budget - 1):
        raise ValueError(f"budget must be a power of two, got {budget}")
    n = budget.bit_length() - 1
    return 2 ** (n // 2), 2 ** (n - n // 2)


def fit_and_pad(img: Image.Image | LazyImage | torch.Tensor, grid: tuple[int, int], patch_size: int, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``img`` on a native-resolution canvas: float32 ``(3, rows * patch_size, cols * patch_size)``.

    The image (a PIL image of any mode, a ``LazyImage``, decoded at full size, or a float tensor ``(3, H, W)``
    in ``[0, 1]``) is resized bicubically (PIL's BICUBIC; tensors: antialiased ``F.interpolate``, clamped to
    ``[0, 1]``) by the largest factor that fits it in the canvas, keeping its aspect ratio (sides rounded,
    each at least one patch and at most the canvas), placed at the top left; the rest of the canvas is 0.0
    (black in ``[0, 1]`` pixel space, before normalization). ``out``: a float32 CPU tensor of the canvas
    shape to write into."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be a (rows, cols) pair, got {grid!r}")
    rows, cols = _check_int("grid[0]", grid[0]), _check_int("grid[1]", grid[1])
    p = _check_int("patch_size", patch_size)
    h, w = _image_hw(img)
    canvas_h, canvas_w = rows * p, cols * p
    factor = min(canvas_h / h, canvas_w / w)
    nh = min(canvas_h, max(p, int(round(h * factor))))
    nw = min(canvas_w, max(p, int(round(w * factor))))
    out = _check_out(out, (3, canvas_h, canvas_w))
    out.zero_()
    if isinstance(img, LazyImage):
        img = img.decode(1)[0]
    if isinstance(img, Image.Image):
        img = to_rgb(img)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _BICUBIC)
        to_tensor(img, out=out[:, :nh, :nw])
    else:
        out[:, :nh, :nw] = _resize_tensor(img, nh, nw)
    return out


class Normalize:
    """``(x - mean) / std`` per channel, for float ``(C, H, W)`` or ``(B, C, H, W)`` tensors in ``[0, 1]``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise ValueError(
                f"mean and std must have the same non-zero length, got {len(mean_t)} and {len(std_t)}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {tuple(std_t.tolist())}")
        self.mean, self.std = mean_t, std_t

    def _check(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor")
        if x.dim() not in (3, 4) or x.shape[-3] != self.mean.numel():
            raise ValueError(
                f"x must be (C, H, W) or (B, C, H, W) with C={self.mean.numel()}, got {tuple(x.shape)}"
            )
        shape = (-1, 1, 1)
        return (self.mean.to(x.device, x.dtype).view(shape), self.std.to(x.device, x.dtype).view(shape))

    def __call__(self, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """Normalized ``x`` (same shape and dtype); ``inplace=True`` overwrites and returns ``x``."""
        mean, std = self._check(x)
        # NOTE: in place is ~7x faster on a fresh (256, 3, 112, 112) batch (6.6 vs 48 ms, 2-core CPU):
        # the out-of-place form pays page faults for two new 38 MB tensors.
        return x.sub_(mean).div_(std) if inplace else (x - mean) / std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalization: ``x * std + mean``."""
        mean, std = self._check(x)
        return x * std + mean

    def __repr__(self) -> str:
        return f"Normalize(mean={tuple(self.mean.tolist())}, std={tuple(self.std.tolist())})"
