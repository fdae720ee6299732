"""One sample of real data: the decoded record, the error a bad sample raises, captions and image decoding.

A sample that cannot be used (a corrupt, truncated or missing image, a missing or empty caption) raises
``BadSample`` with a one-line ``reason``, so the loader can skip and count it. Images are decoded with Pillow
and converted to RGB by ``to_rgb`` (no mode is rejected).

Limits (module constants, checked before anything that large is read or allocated; over one is a
``BadSample``): ``MAX_IMAGE_PIXELS`` (64 megapixels, from the image header), ``MAX_IMAGE_BYTES`` (256 MiB of
encoded image), ``MAX_CAPTION_BYTES`` (1 MiB: a caption file or member, a JSONL line) and ``MAX_JSON_DEPTH``
(64 levels of JSON nesting).

Reduced-size JPEG decoding (the training loader's fast path): ``open_image`` reads and checks the header only
and returns a ``LazyImage``; ``LazyImage.decode(reduce)`` then decodes a JPEG at ``1/reduce`` of its size
(``reduce`` in 1, 2, 4, 8) by libjpeg's DCT scaling (Pillow's ``Image.draft``), which skips most of the inverse
DCT, colour conversion and later resampling work of a full decode. A transform that knows its crop (see
``TrainTransform``) picks the largest reduction that still leaves the crop at least its output size.
``jpeg_draft_enabled`` reads the switch ``AIMV2_JPEG_DRAFT`` (``1``, the default, or ``0``) that sets the
transforms' default.
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

__all__ = ["BadSample", "RawSample", "LazyImage", "to_rgb", "open_image", "decode_image", "jpeg_draft_enabled",
           "JPEG_REDUCTIONS", "JPEG_DRAFT_ENV", "MAX_IMAGE_PIXELS", "MAX_IMAGE_BYTES", "MAX_CAPTION_BYTES",
           "MAX_JSON_DEPTH"]

_WHITE = (255, 255, 255, 255)

# Limits on one sample, checked before anything of that size is allocated; a sample over one is a BadSample.
MAX_IMAGE_PIXELS = 64_000_000  # declared width x height (read from the header, before decoding)
MAX_IMAGE_BYTES = 256 << 20  # an encoded image file or tar member
MAX_CAPTION_BYTES = 1 << 20  # a caption: a .txt / .json file or member, a JSONL line
MAX_JSON_DEPTH = 64  # nesting of a JSON caption or JSONL line (json.loads recurses: deep nesting is a crash)
# a string (its closing quote optional, so a scan never restarts inside one: linear time) or a bracket
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.S)

JPEG_REDUCTIONS = (1, 2, 4, 8)  # the DCT scalings Pillow's draft offers: a JPEG decodes at 1/reduce of its size
JPEG_DRAFT_ENV = "AIMV2_JPEG_DRAFT"  # "0" turns reduced-size JPEG decoding off where a transform's default rules
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


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
    """A decoded sample: ``image`` a PIL image of mode ``"RGB"`` (a ``LazyImage``, not decoded yet, when read
    with ``raw(i, lazy=True)``), ``caption`` a stripped non-empty string, ``key`` where it came from (shard or
    file, and key or line), ``label`` a class index or -1."""

    image: Image.Image | LazyImage
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


def jpeg_draft_enabled() -> bool:
    """Whether reduced-size JPEG decoding is on by default: ``AIMV2_JPEG_DRAFT`` unset or ``1`` (also
    ``true``/``yes``/``on``) is on, ``0`` (``false``/``no``/``off``) off; any other value raises ValueError.
    ``TrainTransform`` and ``EvalTransform`` read it when built with ``draft=None``."""
    value = os.environ.get(JPEG_DRAFT_ENV, "1").strip().lower()
    if value in _TRUE or value == "":
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{JPEG_DRAFT_ENV} must be 1 or 0, got {os.environ[JPEG_DRAFT_ENV]!r}")


def _check_reduce(reduce: int) -> int:
    if isinstance(reduce, bool) or not isinstance(reduce, (int, np.integer)):
        raise TypeError(f"reduce must be an int, got {type(reduce).__name__}")
    if int(reduce) not in JPEG_REDUCTIONS:
        raise ValueError(f"reduce must be one of {JPEG_REDUCTIONS}, got {reduce}")
    return int(reduce)


def _open_checked(data: bytes) -> Image.Image:
    """``Image.open`` of ``data`` (the header only) within the limits; BadSample otherwise."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if not data:
        raise BadSample("empty image file")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadSample(f"image file of {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
    try:
        img = Image.open(io.BytesIO(data))  # in memory: nothing to close; reads the header only
    except Image.DecompressionBombError as exc:
        raise BadSample(f"image too large: {exc}") from None
    except Exception as exc:  # Pillow raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
        raise BadSample(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadSample(f"image too large: {width}x{height} is {width * height} pixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS}")
    return img


def _load(img: Image.Image, reduce: int) -> tuple[Image.Image, int]:
    """Decode the opened, not yet loaded ``img`` (a JPEG at ``1/reduce`` when Pillow's draft allows it) to RGB:
    ``(image, the reduction applied)``; BadSample when the data is corrupt or truncated."""
    try:
        applied = 1
        if reduce > 1 and img.format == "JPEG":
            width, height = img.size
            # Pillow picks the largest 1/2^k <= min(W // w, H // h): asking for (W // r, H // r) gives r exactly
            got = img.draft("RGB", (max(1, width // reduce), max(1, height // reduce)))
            if got is not None:  # None: a JPEG Pillow cannot scale (several tiles): decoded at full size
                applied = int(round(width / got[1][2]))
        img.load()  # decode now: a truncated file fails here, not later in a transform
        return to_rgb(img), applied
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:
        raise BadSample(f"image too large: {exc}") from None
    except Exception as exc:  # Pillow raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
        raise BadSample(f"cannot decode image: {type(exc).__name__}: {exc}") from None


class LazyImage:
    """An encoded image whose header has been read and checked (``open_image``), decoded on demand.

    ``size`` is the full ``(width, height)`` from the header, ``format`` Pillow's name of the format
    (``"JPEG"``, ``"PNG"``, ...). ``decode(reduce)`` decodes to a loaded ``"RGB"`` image (``to_rgb``);
    ``reducible`` tells whether ``reduce > 1`` can take effect (JPEG only). It may be decoded more than once
    (each ``decode`` after the first re-reads the header). Holds the encoded bytes.
    """

    __slots__ = ("_data", "_opened", "size", "format")

    def __init__(self, data: bytes):
        self._opened: Image.Image | None = _open_checked(data)
        self._data = bytes(data)
        self.size: tuple[int, int] = self._opened.size
        self.format: str | None = self._opened.format

    @property
    def width(self) -> int:
        """The full width (pixels), from the header."""
        return self.size[0]

    @property
    def height(self) -> int:
        """The full height (pixels), from the header."""
        return self.size[1]

    @property
    def reducible(self) -> bool:
        """True for a JPEG: ``decode(reduce)`` with ``reduce > 1`` decodes it at reduced size."""
        return self.format == "JPEG"

    def decode(self, reduce: int = 1) -> tuple[Image.Image, int]:
        """``(image, applied)``: the decoded ``"RGB"`` PIL image and the reduction it was decoded at.

        ``reduce`` (1, 2, 4 or 8): a JPEG is decoded by libjpeg's DCT scaling at ``ceil(W / reduce) x
        ceil(H / reduce)``, its pixel ``(x, y)`` covering full-size pixels ``[x * reduce, (x + 1) * reduce)``
        (and the same in y), so a box ``b`` of the full image is ``b / reduce`` there. Other formats, and a
        JPEG Pillow cannot scale, decode at full size (``applied`` 1). Corrupt or truncated data raises
        ``BadSample``; a bad ``reduce`` ValueError / TypeError.
        """
        reduce = _check_reduce(reduce)
        img, self._opened = self._opened, None
        if img is None:
            img = _open_checked(self._data)
        return _load(img, reduce)

    def __reduce__(self):  # pickled as its bytes (the opened Pillow file is not picklable as is)
        return (LazyImage, (self._data,))

    def __repr__(self) -> str:
        return f"LazyImage({self.format}, {self.size[0]}x{self.size[1]}, {len(self._data)} bytes)"


def open_image(data: bytes) -> LazyImage:
    """The header of encoded image bytes, read and checked, without decoding the pixels: a ``LazyImage``.

    Raises ``BadSample`` as ``decode_image`` does for an empty, over-large or unreadable header (the pixel
    data is checked when ``LazyImage.decode`` decodes it); TypeError when ``data`` is not bytes.
    """
    return LazyImage(data)


def decode_image(data: bytes, *, min_side: int | None = None) -> Image.Image:
    """Decode encoded image bytes (any format Pillow reads) to a fully loaded ``"RGB"`` PIL image.

    A corrupt or truncated image raises ``BadSample``, and so does one whose header declares more than
    ``MAX_IMAGE_PIXELS`` pixels (checked before decoding: ``Image.open`` only reads the header) or that
    Pillow's decompression-bomb check refuses. ``min_side``: the caller needs no more than this many pixels on
    either side, so a JPEG at least twice as large on both sides is decoded at a reduced scale (1/2, 1/4 or
    1/8, Pillow's ``Image.draft``) that keeps both sides >= ``min_side``; other formats decode at full size.
    """
    img = _open_checked(data)
    width, height = img.size
    reduce = 1
    if min_side is not None and img.format == "JPEG":
        reduce = max(r for r in JPEG_REDUCTIONS if min(width, height) >= r * min_side or r == 1)
    return _load(img, reduce)[0]


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
