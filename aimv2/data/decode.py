"""One sample of real data: the decoded record, the error a bad sample raises, captions and image decoding.

A sample that cannot be used (a corrupt, truncated or missing image, a missing or empty caption) raises
``BadSample`` with a one-line ``reason``, so the loader can skip and count it. Images are decoded with Pillow
and converted to RGB by ``to_rgb`` (no mode is rejected).

Limits (module constants, checked before anything that large is read or allocated; over one is a
``BadSample``): ``MAX_IMAGE_PIXELS`` (64 megapixels, from the image header), ``MAX_IMAGE_BYTES`` (256 MiB of
encoded image), ``MAX_CAPTION_BYTES`` (1 MiB: a caption file or member, a JSONL line) and ``MAX_JSON_DEPTH``
(64 levels of JSON nesting).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import stat

import numpy as np

from .._extras import require

Image = require("PIL.Image", "aimv2.data (image decoding)")

__all__ = ["BadSample", "RawSample", "to_rgb", "decode_image", "MAX_IMAGE_PIXELS", "MAX_IMAGE_BYTES",
           "MAX_CAPTION_BYTES", "MAX_JSON_DEPTH"]

_WHITE = (255, 255, 255, 255)

# Limits on one sample, checked before anything of that size is allocated; a sample over one is a BadSample.
MAX_IMAGE_PIXELS = 64_000_000  # declared width x height (read from the header, before decoding)
MAX_IMAGE_BYTES = 256 << 20  # an encoded image file or tar member
MAX_CAPTION_BYTES = 1 << 20  # a caption: a .txt / .json file or member, a JSONL line
MAX_JSON_DEPTH = 64  # nesting of a JSON caption or JSONL line (json.loads recurses: deep nesting is a crash)
# a string (its closing quote optional, so a scan never restarts inside one: linear time) or a bracket
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.S)


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


def _json_depth(text: str) -> int:
    """The deepest ``[`` / ``{`` nesting of JSON ``text`` (brackets inside strings do not count); cheap: a
    text with at most ``MAX_JSON_DEPTH`` brackets is not scanned."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return 0
    depth = deepest = 0
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()[0]
        if c == "[" or c == "{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:  # deep enough to refuse: no need to read on
                    break
        elif c != '"':
            depth -= 1
    return deepest


def _json_loads(data: bytes | str, what: str) -> object:
    """``json.loads(data)`` within the limits: over ``MAX_CAPTION_BYTES``, nested deeper than ``MAX_JSON_DEPTH``
    or malformed raises ``BadSample`` (never RecursionError or MemoryError)."""
    if len(data) > MAX_CAPTION_BYTES:
        raise BadSample(f"{what} of {len(data)} bytes is over the {MAX_CAPTION_BYTES}-byte limit")
    try:
        text = data.decode(json.detect_encoding(data), "surrogatepass") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:  # (what json.loads does with bytes: UTF-8, -16 or -32, BOM or not)
        raise BadSample(f"malformed {what}: {exc}") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise BadSample(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadSample(f"malformed {what}: {exc}") from None
    except (RecursionError, MemoryError):
        raise BadSample(f"{what} is too deeply nested or too large to parse") from None


def _json_caption(data: bytes | str, field: str, what: str) -> str:
    obj = _json_loads(data, what)
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


def decode_image(data: bytes, *, min_side: int | None = None) -> Image.Image:
    """Decode encoded image bytes (any format Pillow reads) to a fully loaded ``"RGB"`` PIL image.

    A corrupt or truncated image raises ``BadSample``, and so does one whose header declares more than
    ``MAX_IMAGE_PIXELS`` pixels (checked before decoding: ``Image.open`` only reads the header) or that
    Pillow's decompression-bomb check refuses. ``min_side``: the caller needs no more than this many pixels on
    either side, so a JPEG at least twice as large on both sides is decoded at a reduced scale (1/2, 1/4 or
    1/8, Pillow's ``Image.draft``) that keeps both sides >= ``min_side``; other formats decode at full size.
    """
    if not data:
        raise BadSample("empty image file")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadSample(f"image file of {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
    try:
        img = Image.open(io.BytesIO(data))  # in memory: nothing to close; reads the header only
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise BadSample(f"image too large: {width}x{height} is {width * height} pixels, over the limit of "
                            f"{MAX_IMAGE_PIXELS}")
        if min_side is not None and img.format == "JPEG" and min(width, height) >= 2 * min_side:
            img.draft(img.mode, (min_side, min_side))  # the largest 1/2^k scale with both sides >= min_side
        img.load()  # decode now: a truncated file fails here, not later in a transform
        return to_rgb(img)
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:
        raise BadSample(f"image too large: {exc}") from None
    except Exception as exc:  # Pillow raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
        raise BadSample(f"cannot decode image: {type(exc).__name__}: {exc}") from None


def _read_file(path: str, what: str, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the regular file ``path``; BadSample when it is missing, unreadable, not a regular file
    (a FIFO or a device would block or never end: it is opened non-blocking and refused) or over ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise BadSample(f"missing {what} file {path}") from None
    except OSError as exc:
        raise BadSample(f"cannot read {what} file {path}: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadSample(f"{what} file {path} is not a regular file")
        if st.st_size > limit:
            raise BadSample(f"{what} file {path} of {st.st_size} bytes is over the {limit}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(st.st_size)  # no more than it had (a file growing meanwhile is read up to there)
    except OSError as exc:
        raise BadSample(f"cannot read {what} file {path}: {exc}") from None
    finally:
        os.close(fd)
