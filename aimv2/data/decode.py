"""One sample of real data: the decoded record, the error a bad sample raises, captions and image decoding.

A sample that cannot be used (a corrupt, truncated or missing image, a missing or empty caption) raises
``BadSample`` with a one-line ``reason``, so the loader can skip and count it. Images are decoded with Pillow
and converted to RGB by ``to_rgb`` (no mode is rejected).
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from .._extras import require

Image = require("PIL.Image", "aimv2.data (image decoding)")

__all__ = ["BadSample", "RawSample", "to_rgb", "decode_image"]

_WHITE = (255, 255, 255, 255)


class BadSample(Exception):
    """A sample that cannot be used: ``reason`` says why in one line (a corrupt, truncated or missing image,
    a missing or empty caption); ``key`` names the sample (``source.key(i)``) when known."""

    def __init__(self, reason: str, key: str | None = None):
        reason = str(reason).replace("\n", " ")
        super().__init__(reason if key is None else f"{key}: {reason}")
        self.reason, self.key = reason, key

    def __reduce__(self):
        return (BadSample, (self.reason, self.key))


@dataclasses.dataclass
class RawSample:
    """A decoded sample: ``image`` a PIL image of mode ``"RGB"``, ``caption`` a stripped non-empty string,
    ``key`` where it came from (shard or file, and key or line), ``label`` a class index or -1."""

    image: Image.Image
    caption: str
    key: str
    label: int = -1


def _clean_caption(text: str) -> str:
    text = text.strip()
    if not text:
        raise BadSample("empty caption")
    return text


def _decode_text(data: bytes) -> str:
    # Lenient: one undecodable byte should not cost the sample (it becomes U+FFFD).
    return data.decode("utf-8-sig", errors="replace")


def _json_caption(data: bytes | str, field: str, what: str) -> str:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise BadSample(f"malformed {what}: {exc}") from None
    if not isinstance(obj, dict):
        raise BadSample(f"{what} is a {type(obj).__name__}, not an object")
    if field not in obj or obj[field] is None:
        raise BadSample(f"no caption ({what} has no field {field!r})")
    value = obj[field]
    if not isinstance(value, str):
        raise BadSample(f"caption field {field!r} of {what} is a {type(value).__name__}, not a string")
    return value


# --------------------------------------------------------------------------------------------------------
# Decoding and colour
# --------------------------------------------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as a PIL image of mode ``"RGB"`` (the same object when it already is). No mode is rejected:

    - transparency (``RGBA``, ``RGBa``, ``LA``, ``La``, ``PA``, and ``P`` or ``L``/``RGB`` with a
      ``transparency`` entry) is composited over **white** (transparent pixels become white, never the
      arbitrary colour stored under them);
    - ``I;16*`` and ``I`` (16-bit greyscale, e.g. 16-bit PNGs) are scaled from ``[0, 65535]`` to
      ``[0, 255]`` (``round(v / 257)``, clipped);
    - ``F`` (float greyscale) follows Pillow's convention: values on the ``[0, 255]`` scale, clipped;
    - ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` use Pillow's ``convert("RGB")``.

    Embedded ICC profiles and EXIF orientation are ignored (as torchvision's default loader does).
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"img must be a PIL.Image.Image, got {type(img).__name__}")
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 (H, W): mode L
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 (H, W): mode L
    if mode == "La":  # premultiplied grey + alpha: Pillow cannot convert it, so un-premultiply by hand
        arr = np.asarray(img).astype(np.float64)
        alpha = arr[..., 1]
        grey = np.where(alpha > 0, arr[..., 0] * 255.0 / np.maximum(alpha, 1.0), 0.0)
        img = Image.fromarray(np.stack([np.clip(np.rint(grey), 0, 255), alpha], -1).astype(np.uint8))  # LA
        mode = "LA"
    if mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (any format Pillow reads) to a fully loaded ``"RGB"`` PIL image; a corrupt,
    truncated or oversized (Pillow's decompression-bomb limit) image raises ``BadSample``."""
    if not data:
        raise BadSample("empty image file")
    try:
        img = Image.open(io.BytesIO(data))  # in memory: nothing to close
        img.load()  # decode now: a truncated file fails here, not later in a transform
        return to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise BadSample(f"image too large: {exc}") from None
    except Exception as exc:  # Pillow raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
        raise BadSample(f"cannot decode image: {type(exc).__name__}: {exc}") from None


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadSample(f"missing {what} file {path}") from None
    except OSError as exc:
        raise BadSample(f"cannot read {what} file {path}: {exc}") from None
