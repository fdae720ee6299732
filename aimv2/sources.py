"""Real image-caption sources and the image transforms of the AIMv2 recipe.

Sources (all map-style, ``len(src)`` samples, read one at a time with ``src.raw(i) -> RawSample``):

- ``TarShards``: webdataset tar shards (a directory of ``*.tar``, one ``.tar``, a glob, a list, or a brace
  pattern ``"shard-{000..009}.tar"``). Members are grouped into samples by webdataset key (the member path up
  to the first dot of its basename); the image is the ``jpg``/``jpeg``/``png``/``webp`` member, the caption
  the ``.txt`` member or a field of the ``.json`` one, the label an optional ``.cls`` member.
- ``ImageFolderCaptions``: images with a same-stem ``.txt`` (or ``.json``) caption beside them, recursively.
- ``CSVSource`` / ``JSONLSource``: one row (line) per sample, naming the image file and holding the caption.
- ``ClassFolder``: ``root/<class name>/<images>``; label = sorted class index, caption = class name.
- ``open_source(path)`` picks one of these from the path.

A sample that cannot be used (a corrupt, truncated or missing image, a missing or empty caption) is still
indexed, and reading it raises ``BadSample`` with a one-line ``reason``, so the loader can skip and count it.
Images are decoded with Pillow and converted to RGB by ``to_rgb`` (no mode is rejected). Nothing here draws
random numbers of its own: the transforms take the ``numpy.random.Generator`` to draw from, so a sample's
augmentation is a function of that generator's seed only.

File handles are opened lazily in the process that reads (``os.getpid()`` is remembered; after a fork the
child opens its own), and are never pickled, so a source can be handed to ``torch.utils.data.DataLoader``
workers with any start method. Tar members are read with ``os.pread`` (no shared file offset), so reading
from several threads is safe too.

Transforms (output float32 ``(3, H, W)`` in ``[0, 1]``; normalization is ``data.Normalize``'s job):

- ``TrainTransform``: torchvision's ``RandomResizedCrop`` (scale 0.4-1, ratio 3/4-4/3, bicubic) then a
  horizontal flip with probability 0.5, the AIMv2 pre-training augmentation (docs/aimv2-reference.md §1).
- ``EvalTransform``: resize the shorter side to ``round(image_size / crop_pct)`` (bicubic), center crop.
- ``native_grid`` / ``fit_and_pad``: the native-resolution canvas (docs/aimv2-reference.md §2): an image resized to fit
  a ``rows x cols`` patch canvas keeping its aspect ratio, placed top left, zero-padded.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import re
import threading
import time
import warnings
import zipfile
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "BadSample",
    "RawSample",
    "TarShards",
    "ImageFolderCaptions",
    "CSVSource",
    "JSONLSource",
    "ClassFolder",
    "open_source",
    "to_rgb",
    "to_tensor",
    "decode_image",
    "random_resized_crop_box",
    "TrainTransform",
    "EvalTransform",
    "native_grid",
    "fit_and_pad",
    "IMAGE_EXTENSIONS",
]

# Image extensions, in the order a tar sample with several image members picks from.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_IMAGE_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}
IMAGE_COLUMNS = ("image", "image_path", "filepath", "path", "file", "filename", "img")
CAPTION_COLUMNS = ("caption", "text", "txt")
_BICUBIC = Image.Resampling.BICUBIC
_WHITE = (255, 255, 255, 255)
_MAX_OPEN_SHARDS = 64  # per process


# --------------------------------------------------------------------------------------------------------
# Samples and errors
# --------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _brace_expand(pattern: str) -> list[str]:
    """``"a-{000..002}.tar"`` -> ``["a-000.tar", "a-001.tar", "a-002.tar"]``; ``{x,y}`` lists; several braces
    expand left to right. Zero-padded ranges keep their width; a brace without ``..`` or ``,`` is literal."""
    for m in _BRACE.finditer(pattern):
        body = m.group(1)
        rng = _RANGE.match(body)
        if rng:
            a, b = rng.group(1), rng.group(2)
            lo, hi = int(a), int(b)
            padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
            width = max(len(a), len(b)) if padded else 0
            step = 1 if hi >= lo else -1
            items = [str(v).zfill(width) for v in range(lo, hi + step, step)]
        elif "," in body:
            items = body.split(",")
        else:
            continue
        head, tail = pattern[:m.start()], pattern[m.end():]
        return [out for item in items for out in _brace_expand(head + item + tail)]
    return [pattern]


def _is_brace(path: str) -> bool:
    return any(_RANGE.match(m.group(1)) or "," in m.group(1) for m in _BRACE.finditer(path))


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _expand_shards(paths) -> list[str]:
    """The shard files named by ``paths`` (see ``TarShards``), in order; FileNotFoundError / ValueError."""
    if isinstance(paths, (str, os.PathLike)):
        items = [paths]
    elif isinstance(paths, (list, tuple)):
        if not paths:
            raise ValueError("paths is empty")
        items = list(paths)
    else:
        raise TypeError(f"paths must be a path, a glob, a brace pattern or a list of them, got {type(paths).__name__}")
    shards = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"paths must hold str or os.PathLike entries, got {type(item).__name__}")
        for path in _brace_expand(os.fspath(item)):
            if _has_glob(path):
                matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
                if not matches:
                    raise FileNotFoundError(f"aimv2: data path {path} matches no files")
                shards.extend(matches)
            elif os.path.isdir(path):
                tars = sorted(os.path.join(path, n) for n in os.listdir(path)
                              if n.endswith(".tar") and not n.startswith(".")
                              and os.path.isfile(os.path.join(path, n)))
                if not tars:
                    raise ValueError(f"aimv2: data path {path} contains no .tar shards")
                shards.extend(tars)
            elif os.path.exists(path):
                shards.append(path)
            else:
                raise FileNotFoundError(f"aimv2: data path {path} does not exist")
    return shards


def _check_path(path, name: str, folder: bool) -> str:
    """``path`` (str or PathLike) as a str; a one-line error when it is missing or not a folder / file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"aimv2: data path {path} does not exist")
    if folder != os.path.isdir(path) or (not folder and not os.path.isfile(path)):
        raise ValueError(f"aimv2: data path {path} is not a {'directory' if folder else 'file'}")
    return path


def _check_dir(root) -> str:
    return _check_path(root, "root", folder=True)


def _check_file(path) -> str:
    return _check_path(path, "path", folder=False)


def _walk(root: str) -> list[tuple[str, list[str]]]:
    """``(relative dir, sorted file names)`` for every non-hidden directory under ``root`` (``""`` for the
    root itself), in sorted depth-first order; follows directory symlinks, each real directory once."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a second link to a directory already listed
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        out.append(("" if rel == "." else rel, sorted(f for f in filenames if not f.startswith("."))))
    return out


def _image_ext(name: str) -> bool:
    return os.path.splitext(name)[1][1:].lower() in _IMAGE_RANK


# --------------------------------------------------------------------------------------------------------
# Tar headers
# --------------------------------------------------------------------------------------------------------

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


def _tar_number(field: bytes) -> int:
    """A tar header number: NUL/space-terminated octal, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field and field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``"<len> key=value\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_members(path: str):
    """Yield ``(name, data offset, size)`` of every regular file member of the uncompressed tar at ``path``,
    from its headers alone (``seek`` over the data): ustar, GNU (long names ``L``, base-256 sizes) and pax
    (``path`` / ``size`` records) headers, like ``tarfile`` but about 10x faster, which matters at
    thousands of shards. The archive ends at the first all-zero block or at the end of the file. A first
    header that is not a tar header raises ValueError; a bad header later stops the scan with a warning
    (the members before it are kept). A member whose data runs past the end of the file is yielded (its
    read then fails as truncated) and ends the scan."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        offset, long_name, pax, global_pax = 0, None, {}, {}
        while True:
            f.seek(offset)
            hdr = f.read(_BLOCK)
            if len(hdr) < _BLOCK or hdr == _ZERO_BLOCK:
                if offset == 0 and file_size and hdr != _ZERO_BLOCK:
                    raise ValueError(f"aimv2: {path} is not a readable uncompressed tar file (shorter than a header)")
                if 0 < len(hdr) < _BLOCK:  # some bytes, but not a whole header
                    warnings.warn(f"aimv2: {path}: truncated inside a header at byte {offset}", stacklevel=4)
                return
            problem = None
            try:
                checksum = _tar_number(hdr[148:156])
                unsigned = 256 + sum(hdr) - sum(hdr[148:156])  # the checksum field itself counts as 8 spaces
                if checksum != unsigned and checksum != unsigned - 256 * sum(
                        1 for b in hdr[:148] + hdr[156:] if b > 127):
                    problem = "bad header checksum"  # (the second form: some old tars sum signed bytes)
                size = _tar_number(hdr[124:136])
            except ValueError as exc:
                problem = f"bad header ({exc})"
            if problem is not None:
                if offset == 0:
                    raise ValueError(f"aimv2: {path} is not a readable uncompressed tar file ({problem})")
                warnings.warn(f"aimv2: {path}: stopped indexing at byte {offset} ({problem})", stacklevel=4)
                return
            kind = hdr[156:157]
            data = offset + _BLOCK
            if kind in (b"x", b"X", b"g", b"L", b"K"):  # a header for the next member: read its data
                f.seek(data)
                payload = f.read(size)
                if kind == b"L":
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"g":
                    global_pax.update(_pax_records(payload))
                else:
                    pax.update(_pax_records(payload))
                offset = data + -(-size // _BLOCK) * _BLOCK
                continue
            fields = {**global_pax, **pax}
            if "size" in fields:
                size = int(fields["size"])
            if kind in _REGULAR:
                if "path" in fields:
                    name = fields["path"]
                elif long_name is not None:
                    name = long_name
                else:
                    name = hdr[0:100].split(b"\0", 1)[0]
                    if hdr[257:263] == b"ustar\0" and hdr[345] != 0:  # POSIX ustar: name = prefix/name
                        name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
                    name = name.decode("utf-8", "surrogateescape")
                yield name, data, size
            long_name, pax = None, {}
            offset = data + -(-size // _BLOCK) * _BLOCK
            if offset > file_size:
                warnings.warn(f"aimv2: {path}: truncated inside the member at byte {data - _BLOCK}", stacklevel=4)
                return


# The tar index cache: a shard's member list, written once and reused while the shard is unchanged.
INDEX_CACHE_ENV = "AIMV2_INDEX_CACHE"
_INDEX_CACHE_VERSION = 1
_FINGERPRINT_BYTES = 4096  # the first block of members: one small read per shard
_SETTLED_NS = 3_000_000_000  # a shard modified in the last 3 s may still be changing: not cached
_cache_warned: set[str] = set()


def index_cache_dir(index_cache=None) -> str | None:
    """Where ``TarShards`` keeps its index cache, or None when caching is off.

    ``index_cache``: None reads ``$AIMV2_INDEX_CACHE`` (``off`` or ``0`` turns caching off), else uses
    ``$XDG_CACHE_HOME/aimv2/tar-index`` (``~/.cache/aimv2/tar-index``); False turns it off; a path is used
    as the directory.
    """
    if index_cache is False:
        return None
    if index_cache is None or index_cache is True:
        env = os.environ.get(INDEX_CACHE_ENV)
        if env is not None and env.strip().lower() in ("off", "0", "false", "no", ""):
            return None
        if env:
            return os.path.expanduser(env)
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "aimv2", "tar-index")
    if isinstance(index_cache, (str, os.PathLike)):
        return os.fspath(index_cache)
    raise TypeError(f"index_cache must be None, a bool or a path, got {type(index_cache).__name__}")


def _cached_tar_members(path: str, cache_dir: str | None) -> list[tuple[str, int, int]]:
    """``list(_tar_members(path))``, read from ``cache_dir`` when a fresh entry is there, else scanned and
    stored.

    An entry is one ``.npz`` per shard (named by a hash of the shard's absolute path) that records the shard's
    size, mtime, inode and a hash of its first 4 KiB; any change to them makes it stale. Only a shard left
    untouched for 3 s is stored, so a later rewrite cannot share its mtime unless the mtime is set by hand. A
    shard whose scan warned (damaged) is not stored, so the warning comes again on every start. An unwritable
    cache directory warns once and the index is then only kept in memory.
    """
    if cache_dir is None:
        return list(_tar_members(path))
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = np.array([st.st_size, st.st_mtime_ns, st.st_ino, _INDEX_CACHE_VERSION], dtype=np.int64)
    with open(real, "rb") as f:
        digest = np.frombuffer(hashlib.sha256(f.read(_FINGERPRINT_BYTES)).digest(), dtype=np.uint8)
    real_b = real.encode("utf-8", "surrogateescape")
    entry = os.path.join(cache_dir, hashlib.sha256(real_b).hexdigest() + ".npz")
    try:
        with np.load(entry, allow_pickle=False) as z:
            if (np.array_equal(z["stamp"], stamp) and np.array_equal(z["digest"], digest)
                    and z["path"].tobytes() == real_b):
                names = z["names"].tobytes().decode("utf-8", "surrogateescape").split("\0") if len(z["sizes"]) else []
                return list(zip(names, z["offsets"].tolist(), z["sizes"].tolist(), strict=True))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, old format or torn: rescan
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        members = list(_tar_members(path))
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=4)
    if caught or any("\0" in n for n, _, _ in members):  # damaged, or a name the format cannot hold
        return members
    if time.time_ns() - st.st_mtime_ns < _SETTLED_NS:  # still being written, or a rewrite could keep its mtime
        return members
    tmp = f"{entry}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, stamp=stamp, digest=digest, path=np.frombuffer(real_b, dtype=np.uint8),
                     names=np.frombuffer("\0".join(n for n, _, _ in members).encode("utf-8", "surrogateescape"),
                                         dtype=np.uint8),
                     offsets=np.array([o for _, o, _ in members], dtype=np.int64),
                     sizes=np.array([n for _, _, n in members], dtype=np.int64))
        os.replace(tmp, entry)  # atomic: ranks writing the same entry at once leave one whole file
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if cache_dir not in _cache_warned:
            _cache_warned.add(cache_dir)
            warnings.warn(f"aimv2: cannot write the tar index cache in {cache_dir} ({exc}); shards will be "
                          f"rescanned on every start (set {INDEX_CACHE_ENV} to a writable folder, or 'off')",
                          stacklevel=4)
    return members


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------

class _Source:
    """Shared parts: index checking, single-shard defaults, ``__repr__``."""

    classes: list[str] | None = None
    shards: list[str]

    def __len__(self) -> int:
        return self._n

    def _index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        i = int(index) + (self._n if index < 0 else 0)
        if not 0 <= i < self._n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of size {self._n}")
        return i

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_of(self, index: int) -> int:
        """Which of ``self.shards`` sample ``index`` comes from (always 0 for a single-file source)."""
        self._index(index)
        return 0

    def raw(self, index: int) -> RawSample:
        """Sample ``index`` decoded (negative indices count from the end); raises ``BadSample`` (with ``key``
        set) when it cannot be used, IndexError / TypeError for a bad index."""
        i = self._index(index)
        try:
            return self._raw(i)
        except BadSample as exc:
            if exc.key is None:
                raise BadSample(exc.reason, self.key(i)) from None
            raise

    def _raw(self, i: int) -> RawSample:
        raise NotImplementedError

    def key(self, index: int) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        where = self.shards[0] if len(self.shards) == 1 else f"{len(self.shards)} shards"
        return f"{type(self).__name__}({where!r}, {self._n} samples)"


# Columns of TarShards._rows: image, caption member, .json member, .cls member (offset and size; -1 = absent).
_IMG_OFF, _IMG_LEN, _CAP_OFF, _CAP_LEN, _JSON_OFF, _JSON_LEN, _CLS_OFF, _CLS_LEN = range(8)


class TarShards(_Source):
    """Webdataset tar shards, read by member offset.

    Args:
        paths: a directory (its ``*.tar`` files, sorted), one ``.tar`` file, a glob (sorted matches), a brace
            pattern (``"shard-{000..009}.tar"``, in expansion order), or a list of these.
        caption_key: the extension of the caption member (default ``"txt"``); when a sample lacks it, the
            ``json_field`` of its ``.json`` member is used. ``"json"`` reads the caption from the json only.
        json_field: the caption field of the ``.json`` member (img2dataset writes ``"caption"``).
        index_cache: where the index cache lives: None (``$AIMV2_INDEX_CACHE``, else
            ``~/.cache/aimv2/tar-index``), False (off) or a directory.

    Samples are grouped by webdataset key: a member ``dir/000123.jpg`` has key ``dir/000123`` and extension
    ``jpg`` (everything after the first dot of the basename; matched case-insensitively). The image is the
    first present of ``IMAGE_EXTENSIONS`` (jpg, jpeg, png, webp, ...); an optional ``.cls`` member gives
    the label. Directories, links, hidden members (basename starting with ``.``) and members with no
    extension are ignored. The index is built by scanning the tar headers (no data is read), about 18 us per
    member, and cached per shard (``index_cache``, see :func:`index_cache_dir`; about 1 us per member to
    reload, 2-core CPU), so later starts and other ranks skip the scan while the shard is unchanged. A sample
    with no image member or no caption is still indexed and raises ``BadSample`` when read, so it is
    counted. Shards must be uncompressed tars (a ``.tar.gz`` cannot be read by offset). A shard whose tail
    is corrupt is indexed up to the damage (with a warning); one that is not a tar at all raises ValueError.

    ``key(i)`` is ``"<shard path>:<webdataset key>"``; ``shard_of(i)`` indexes ``self.shards``.
    """

    def __init__(self, paths, *, caption_key: str = "txt", json_field: str = "caption", index_cache=None):
        self._cache_dir = index_cache_dir(index_cache)
        for name, value in (("caption_key", caption_key), ("json_field", json_field)):
            if not isinstance(value, str) or not value.strip("."):
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        self.caption_key, self.json_field = caption_key.lstrip(".").lower(), json_field
        self.shards = _expand_shards(paths)
        rows, shard_ids, keys, seen = [], [], [], collections.Counter()
        for shard_id, path in enumerate(self.shards):
            for key, row in self._scan(path, seen):
                rows.append(row)
                keys.append(key.encode("utf-8", "surrogateescape"))
                shard_ids.append(shard_id)
        self._n = len(rows)
        self._rows = np.array(rows, dtype=np.int64).reshape(-1, 8)
        self._shard = np.array(shard_ids, dtype=np.int32)
        self._keys = np.array(keys, dtype=bytes) if keys else np.zeros(0, dtype="S1")
        if len(self.shards) == 1:
            where = self.shards[0]
        elif isinstance(paths, (str, os.PathLike)):
            where = f"{os.fspath(paths)} ({len(self.shards)} shards)"
        else:
            where = f"{self.shards[0]} and {len(self.shards) - 1} more shards"
        if self._n == 0:
            raise ValueError(f"aimv2: data path {where} contains no image–caption samples")
        has_caption = (self._rows[:, _CAP_OFF] >= 0) | (self._rows[:, _JSON_OFF] >= 0)
        if not bool(((self._rows[:, _IMG_OFF] >= 0) & has_caption).any()):
            exts = ", ".join(f"{e} ({c})" for e, c in seen.most_common(8))
            raise ValueError(f"aimv2: data path {where} contains no image–caption samples (no sample has both an "
                             f"image and a .{self.caption_key} or .json member; member extensions: {exts})")
        self._pid, self._files, self._lock = os.getpid(), collections.OrderedDict(), threading.Lock()

    def _scan(self, path: str, seen: collections.Counter) -> list[tuple[str, list[int]]]:
        """``[(key, row)]`` of one shard in order of first appearance (see ``_rows`` for the row layout)."""
        groups: dict[str, list[int]] = {}
        ranks: dict[str, int] = {}
        for name, offset, size in _cached_tar_members(path, self._cache_dir):
            slash = name.rfind("/") + 1
            dot = name.find(".", slash)
            if dot <= slash:  # no extension, or a hidden file
                continue
            key, ext = name[:dot], name[dot + 1:].lower()
            seen[ext] += 1
            row = groups.get(key)
            if row is None:
                row = groups[key] = [-1] * 8
            rank = _IMAGE_RANK.get(ext)
            if rank is not None:
                if rank < ranks.get(key, len(_IMAGE_RANK)):
                    ranks[key] = rank
                    row[_IMG_OFF], row[_IMG_LEN] = offset, size
            elif ext == self.caption_key:
                row[_CAP_OFF], row[_CAP_LEN] = offset, size
                if ext == "json":
                    row[_JSON_OFF], row[_JSON_LEN] = offset, size
            elif ext == "json":
                row[_JSON_OFF], row[_JSON_LEN] = offset, size
            elif ext == "cls":
                row[_CLS_OFF], row[_CLS_LEN] = offset, size
        return list(groups.items())

    # -- per-process file handles --------------------------------------------------------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_files"], state["_lock"]
        state["_pid"] = -1
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._files, self._lock = collections.OrderedDict(), threading.Lock()

    def close(self) -> None:
        """Close this process's shard handles (reading again reopens them)."""
        with self._lock:
            files, self._files = self._files, collections.OrderedDict()
        for f in files.values():
            f.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit, or a half-built object
            pass

    def _file(self, shard: int):
        with self._lock:
            if self._pid != os.getpid():  # forked: open our own handles (closing the inherited copies here
                for f in self._files.values():  # does not touch the parent's)
                    f.close()
                self._files, self._pid = collections.OrderedDict(), os.getpid()
            f = self._files.get(shard)
            if f is None:
                try:
                    f = open(self.shards[shard], "rb", buffering=0)
                except OSError as exc:
                    raise BadSample(f"cannot open shard: {exc}") from None
                self._files[shard] = f
                while len(self._files) > _MAX_OPEN_SHARDS:
                    self._files.popitem(last=False)[1].close()
            else:
                self._files.move_to_end(shard)
            return f

    def _read(self, shard: int, offset: int, size: int, what: str) -> bytes:
        f = self._file(shard)
        try:
            if hasattr(os, "pread"):
                data = os.pread(f.fileno(), size, offset)
            else:  # no positional read: serialize seek + read
                with self._lock:
                    f.seek(offset)
                    data = f.read(size)
        except OSError as exc:
            raise BadSample(f"cannot read {what} member: {exc}") from None
        if len(data) != size:
            raise BadSample(f"truncated {what} member ({len(data)} of {size} bytes in the shard)")
        return data

    # -- samples --------------------------------------------------------------------------------------

    def shard_of(self, index: int) -> int:
        return int(self._shard[self._index(index)])

    def key(self, index: int) -> str:
        i = self._index(index)
        return f"{self.shards[self._shard[i]]}:{self._keys[i].decode('utf-8', 'surrogateescape')}"

    def _raw(self, i: int) -> RawSample:
        row, shard = self._rows[i].tolist(), int(self._shard[i])
        if row[_IMG_OFF] < 0:
            raise BadSample("missing image (no jpg/jpeg/png/webp member)")
        if row[_CAP_OFF] >= 0 and self.caption_key != "json":
            caption = _decode_text(self._read(shard, row[_CAP_OFF], row[_CAP_LEN], f".{self.caption_key}"))
        elif row[_JSON_OFF] >= 0:
            caption = _json_caption(self._read(shard, row[_JSON_OFF], row[_JSON_LEN], ".json"),
                                    self.json_field, ".json member")
        else:
            raise BadSample(f"missing caption (no .{self.caption_key} or .json member)")
        caption = _clean_caption(caption)
        label = -1
        if row[_CLS_OFF] >= 0:
            try:
                label = int(_decode_text(self._read(shard, row[_CLS_OFF], row[_CLS_LEN], ".cls")).strip())
            except ValueError:
                label = -1
        image = decode_image(self._read(shard, row[_IMG_OFF], row[_IMG_LEN], "image"))
        return RawSample(image=image, caption=caption, key=self.key(i), label=label)


class ImageFolderCaptions(_Source):
    """Images (any of ``IMAGE_EXTENSIONS``, case-insensitive) under ``root``, recursively, each captioned by
    a same-stem ``.txt`` file beside it (``a/b/x.jpg`` <- ``a/b/x.txt``, extensions in any case) or,
    failing that, by the ``json_field`` of a same-stem ``.json`` file. Images with neither are indexed and
    raise ``BadSample``; caption files with no image are ignored; hidden files and directories are
    skipped. Order: depth first, a directory's files (sorted) before its subdirectories (sorted).
    ``key(i)`` is the image's path. Raises ValueError when no image has a caption."""

    def __init__(self, root, *, json_field: str = "caption", _listing=None):
        self.root = _check_dir(root)
        if not isinstance(json_field, str) or not json_field:
            raise ValueError(f"json_field must be a non-empty str, got {json_field!r}")
        self.json_field, self.shards = json_field, [self.root]
        self._images, self._captions = [], []
        for rel, files in (_walk(self.root) if _listing is None else _listing):
            caps = {}  # (stem, lower-case extension) -> file name
            for name in files:
                stem, ext = os.path.splitext(name)
                if ext.lower() in (".txt", ".json"):
                    caps.setdefault((stem, ext.lower()), name)
            for name in files:
                if not _image_ext(name):
                    continue
                stem = os.path.splitext(name)[0]
                cap = caps.get((stem, ".txt"), caps.get((stem, ".json")))
                self._images.append(os.path.join(rel, name))
                self._captions.append(None if cap is None else os.path.join(rel, cap))
        self._n = len(self._images)
        if not any(c is not None for c in self._captions):
            raise ValueError(f"aimv2: data path {self.root} contains no image–caption samples ({self._n} images, "
                             f"none with a same-stem .txt or .json caption beside it)")

    def key(self, index: int) -> str:
        return os.path.join(self.root, self._images[self._index(index)])

    def _raw(self, i: int) -> RawSample:
        cap = self._captions[i]
        if cap is None:
            raise BadSample("missing caption (no same-stem .txt or .json file)")
        data = _read_file(os.path.join(self.root, cap), "caption")
        if cap.lower().endswith(".json"):
            caption = _json_caption(data, self.json_field, "caption .json")
        else:
            caption = _decode_text(data)
        caption = _clean_caption(caption)
        image = decode_image(_read_file(os.path.join(self.root, self._images[i]), "image"))
        return RawSample(image=image, caption=caption, key=self.key(i))


class ClassFolder(_Source):
    """``root/<class name>/**/<image>``: ``classes`` are the sorted names of ``root``'s non-hidden
    subdirectories (empty ones included, so labels stay stable across splits); a sample's ``label`` is its
    class's index and its caption the class name. Images directly in ``root`` are ignored. ``key(i)`` is
    the image's path. Raises ValueError when there are no class subdirectories or no images in them."""

    def __init__(self, root, *, _listing=None):
        self.root = _check_dir(root)
        self.shards = [self.root]
        listing = _walk(self.root) if _listing is None else _listing
        self.classes = sorted({rel.split(os.sep, 1)[0] for rel, _ in listing if rel})
        index = {c: k for k, c in enumerate(self.classes)}
        self._images, labels = [], []
        for rel, files in listing:
            if not rel:
                continue
            label = index[rel.split(os.sep, 1)[0]]
            for name in files:
                if _image_ext(name):
                    self._images.append(os.path.join(rel, name))
                    labels.append(label)
        order = sorted(range(len(labels)), key=lambda k: labels[k])  # stable: walk order within a class
        self._images = [self._images[k] for k in order]
        self._labels = np.array([labels[k] for k in order], dtype=np.int64)
        self._n = len(self._images)
        if self._n == 0:
            raise ValueError(f"aimv2: data path {self.root} contains no images in class subfolders "
                             f"({len(self.classes)} subfolders)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label_of(self, index: int) -> int:
        """The class index of sample ``index`` (without reading the image)."""
        return int(self._labels[self._index(index)])

    def key(self, index: int) -> str:
        return os.path.join(self.root, self._images[self._index(index)])

    def _raw(self, i: int) -> RawSample:
        label = int(self._labels[i])
        image = decode_image(_read_file(os.path.join(self.root, self._images[i]), "image"))
        return RawSample(image=image, caption=self.classes[label], key=self.key(i), label=label)


def _pick_column(given: str | None, arg: str, candidates: Sequence[str], columns: Sequence[str], path: str,
                 what: str) -> str:
    if given is not None:
        if not isinstance(given, str):
            raise TypeError(f"{arg} must be a str, got {type(given).__name__}")
        if given not in columns:
            raise ValueError(f"{arg} {given!r} is not a {what} of {path} (it has {list(columns)})")
        return given
    lower = {c.strip().lower(): c for c in reversed(list(columns))}  # first spelling wins
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    raise ValueError(f"aimv2: cannot find the {arg.split('_')[0]} {what} of {path} among {list(columns)} "
                     f"(looked for {list(candidates)}); pass {arg}=")


class _RowSource(_Source):
    """CSV / JSONL rows: an image path (relative to the file's folder) and a caption per sample."""

    def _init_rows(self, path: str, images: list, captions: list, lines: list[int], errors: list):
        self.path, self.shards = path, [path]
        self._base = os.path.dirname(os.path.abspath(path))
        self._images, self._caps, self._lines, self._errors = images, captions, lines, errors
        self._n = len(images)
        if self._n == 0:
            raise ValueError(f"aimv2: data path {path} contains no image–caption samples")

    def key(self, index: int) -> str:
        return f"{self.path}:{self._lines[self._index(index)]}"

    def _raw(self, i: int) -> RawSample:
        if self._errors[i] is not None:
            raise BadSample(self._errors[i])
        image, caption = self._images[i], self._caps[i]
        if not isinstance(caption, str):
            raise BadSample("missing caption" if caption is None else
                            f"caption is a {type(caption).__name__}, not a string")
        caption = _clean_caption(caption)
        if not isinstance(image, str) or not image.strip():
            raise BadSample("missing image" if image is None or isinstance(image, str) else
                            f"image path is a {type(image).__name__}, not a string")
        image = image.strip()
        if "://" in image:
            raise BadSample(f"image {image} is a URL (aimv2 does not download)")
        full = image if os.path.isabs(image) else os.path.join(self._base, image)
        return RawSample(image=decode_image(_read_file(full, "image")), caption=caption, key=self.key(i))


class CSVSource(_RowSource):
    """A CSV (or ``.tsv``) file with a header row: one sample per row.

    The image column is ``image_column`` or the first header among ``IMAGE_COLUMNS`` (image, image_path,
    filepath, path, file, filename, img); the caption column ``caption_column`` or the first among
    ``CAPTION_COLUMNS`` (caption, text, txt); header names match case-insensitively. Relative image paths
    resolve against the CSV's folder. ``delimiter`` defaults to a tab for ``.tsv`` and a comma otherwise.
    A row with an empty image or caption is indexed and raises ``BadSample``. ``key(i)`` is
    ``"<csv path>:<line>"``.
    """

    def __init__(self, path, image_column: str | None = None, caption_column: str | None = None, *,
                 delimiter: str | None = None):
        path = _check_file(path)
        if delimiter is None:
            delimiter = "\t" if path.lower().endswith(".tsv") else ","
        elif not isinstance(delimiter, str) or len(delimiter) != 1:
            raise ValueError(f"delimiter must be a one-character str, got {delimiter!r}")
        images, captions, lines = [], [], []
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f, delimiter=delimiter)
            try:
                header = next(reader, None)
                if header is None:
                    raise ValueError(f"aimv2: data path {path} contains no image–caption samples (empty file)")
                image_column = _pick_column(image_column, "image_column", IMAGE_COLUMNS, header, path, "column")
                caption_column = _pick_column(caption_column, "caption_column", CAPTION_COLUMNS, header, path,
                                              "column")
                ic, cc = header.index(image_column), header.index(caption_column)
                for row in reader:
                    if not row:  # a blank line
                        continue
                    images.append(row[ic] if ic < len(row) else None)
                    captions.append(row[cc] if cc < len(row) else None)
                    lines.append(reader.line_num)
            except csv.Error as exc:
                raise ValueError(f"aimv2: {path}: malformed CSV at line {reader.line_num} ({exc})") from None
        self.image_column, self.caption_column = image_column, caption_column
        self._init_rows(path, images, captions, lines, [None] * len(images))


class JSONLSource(_RowSource):
    """A JSON-lines file: one object per non-blank line, one sample per object.

    The image key is ``image_key`` or the first key among ``IMAGE_COLUMNS`` present in any object; the
    caption key ``caption_key`` or the first among ``CAPTION_COLUMNS`` (matched case-insensitively).
    Relative image paths resolve against the file's folder. A malformed line, or an object without the
    image or caption, is indexed and raises ``BadSample``. ``key(i)`` is ``"<jsonl path>:<line>"``.
    """

    def __init__(self, path, image_key: str | None = None, caption_key: str | None = None):
        path = _check_file(path)
        objs, lines, errors, keys = [], [], [], {}
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                lines.append(lineno)
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    objs.append(None)
                    errors.append(f"malformed JSON line: {exc}")
                    continue
                if not isinstance(obj, dict):
                    objs.append(None)
                    errors.append(f"JSON line is a {type(obj).__name__}, not an object")
                    continue
                objs.append(obj)
                errors.append(None)
                for k in obj:
                    keys.setdefault(k, None)
        if objs and keys:
            image_key = _pick_column(image_key, "image_key", IMAGE_COLUMNS, list(keys), path, "key")
            caption_key = _pick_column(caption_key, "caption_key", CAPTION_COLUMNS, list(keys), path, "key")
        if lines and all(e is not None for e in errors):
            raise ValueError(f"aimv2: data path {path} contains no image–caption samples (no line is a JSON object)")
        self.image_key, self.caption_key = image_key, caption_key
        images = [None if o is None else o.get(image_key) for o in objs]
        captions = [None if o is None else o.get(caption_key) for o in objs]
        self._init_rows(path, images, captions, lines, errors)


def open_source(path, **kw) -> _Source:
    """The source for ``path``, detected from it (``kw`` go to the chosen class):

    - a list or tuple, a glob, a brace pattern, a ``.tar`` file, or a directory holding ``*.tar`` files:
      ``TarShards``;
    - a ``.csv`` / ``.tsv`` file: ``CSVSource``; a ``.jsonl`` / ``.ndjson`` file: ``JSONLSource``;
    - a directory where some image has a same-stem ``.txt`` / ``.json`` caption: ``ImageFolderCaptions``;
    - a directory with images in subdirectories and no captions: ``ClassFolder``.

    A missing path raises FileNotFoundError, one with no samples (or of unknown kind) ValueError.
    """
    if isinstance(path, (list, tuple)):
        return TarShards(path, **kw)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str, os.PathLike or a list of shard paths, got {type(path).__name__}")
    path = os.fspath(path)
    if _is_brace(path) or (_has_glob(path) and not os.path.exists(path)):
        return TarShards(path, **kw)
    if not os.path.exists(path):
        raise FileNotFoundError(f"aimv2: data path {path} does not exist")
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext in (".csv", ".tsv"):
            return CSVSource(path, **kw)
        if ext in (".jsonl", ".ndjson"):
            return JSONLSource(path, **kw)
        if ext == ".tar":
            return TarShards(path, **kw)
        raise ValueError(f"aimv2: cannot tell what kind of data {path} holds (expected .csv, .tsv, .jsonl, .tar, "
                         f"a directory, a glob or a brace pattern)")
    if any(n.endswith(".tar") and not n.startswith(".") for n in os.listdir(path)):
        return TarShards(path, **kw)
    listing = _walk(path)
    for _, files in listing:
        stems = {os.path.splitext(n)[0] for n in files if n.lower().endswith((".txt", ".json"))}
        if any(_image_ext(n) and os.path.splitext(n)[0] in stems for n in files):
            return ImageFolderCaptions(path, _listing=listing, **kw)
    if any(rel and any(_image_ext(n) for n in files) for rel, files in listing):
        return ClassFolder(path, _listing=listing, **kw)
    raise ValueError(f"aimv2: data path {path} contains no image–caption samples")


# --------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------

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
    if isinstance(img, Image.Image):
        return img.height, img.width
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


def to_tensor(img, *, out: torch.Tensor | None = None) -> torch.Tensor:
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

    Args:
        image_size: output side.
        scale: range of the crop's fraction of the image area, ``0 < lo <= hi <= 1``.
        ratio: range of the crop's aspect ratio ``w / h``, ``0 < lo <= hi``.
        flip: probability of the horizontal flip, in ``[0, 1]``.
    """

    def __init__(self, image_size: int = 224, scale: tuple[float, float] = (0.4, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5):
        self.image_size = _check_int("image_size", image_size)
        self.scale = _check_pair("scale", scale, 0.0, 1.0)
        self.ratio = _check_pair("ratio", ratio, 0.0, None)
        if isinstance(flip, bool) or not isinstance(flip, (int, float, np.floating)) or not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip must be a probability in [0, 1], got {flip!r}")
        self.flip = float(flip)

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)``: the crop this transform draws from ``rng`` for a ``width x height`` image."""
        width, height = _check_int("width", width), _check_int("height", height)
        return _crop_box(width, height, self.scale, self.ratio, _check_rng(rng))

    def __call__(self, img, rng: np.random.Generator, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``img`` augmented: float32 ``(3, image_size, image_size)`` in ``[0, 1]`` (into ``out`` if given)."""
        h, w = _image_hw(img)
        top, left, ch, cw = self.crop_box(w, h, rng)
        flip = rng.random() < self.flip
        s = self.image_size
        if isinstance(img, Image.Image):
            res = to_rgb(img).resize((s, s), _BICUBIC, box=(left, top, left + cw, top + ch))
            if flip:
                res = res.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return to_tensor(res, out=out)
        res = _resize_tensor(img[:, top:top + ch, left:left + cw], s, s)
        if flip:
            res = res.flip(-1)
        out = _check_out(out, (3, s, s))
        return out.copy_(res)

    def __repr__(self) -> str:
        return f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


class EvalTransform:
    """Evaluation preprocessing: resize the shorter side to ``round(image_size / crop_pct)`` (bicubic, the
    longer side to ``int(short * long / short_in)`` as torchvision's ``Resize(int)``), then center crop
    ``image_size`` (torchvision's ``CenterCrop`` offsets). ``crop_pct=1.0`` is the HF/timm AIMv2 setting,
    0.875 the ml-aim one (docs/aimv2-reference.md §3).

    ``transform(img, rng=None)`` -> float32 ``(3, image_size, image_size)`` in ``[0, 1]``; ``img`` a PIL image
    (any mode) or a float tensor ``(3, H, W)`` in ``[0, 1]``; ``rng`` is ignored (the signature matches
    ``TrainTransform``)."""

    def __init__(self, image_size: int = 224, crop_pct: float = 1.0):
        self.image_size = _check_int("image_size", image_size)
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        self.crop_pct = float(crop_pct)
        self.resize_size = int(round(self.image_size / self.crop_pct))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(w, h)`` of a ``width x height`` image after the shorter-side resize."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, img, rng: np.random.Generator | None = None, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """``img`` resized and center-cropped: float32 ``(3, image_size, image_size)`` (into ``out`` if given)."""
        h, w = _image_hw(img)
        rw, rh = self.resized_size(w, h)
        s = self.image_size
        top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
        if isinstance(img, Image.Image):
            img = to_rgb(img)
            if (rw, rh) != (w, h):
                img = img.resize((rw, rh), _BICUBIC)
            return to_tensor(img.crop((left, top, left + s, top + s)), out=out)
        res = _resize_tensor(img, rh, rw)[:, top:top + s, left:left + s]
        return _check_out(out, (3, s, s)).copy_(res)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, crop_pct={self.crop_pct})"


def native_grid(budget: int) -> tuple[int, int]:
    """The ``(rows, cols)`` patch canvas of a native-resolution patch budget ``budget = 2**n`` (docs/aimv2-reference.md
    §2): ``rows = 2**(n // 2)``, ``cols = 2**(n - n // 2)``, so ``rows * cols == budget`` and the canvas is
    square (even ``n``) or twice as wide as tall (odd ``n``): 128 -> (8, 16), 256 -> (16, 16)."""
    budget = _check_int("budget", budget)
    if budget & (budget - 1):
        raise ValueError(f"budget must be a power of two, got {budget}")
    n = budget.bit_length() - 1
    return 2 ** (n // 2), 2 ** (n - n // 2)


def fit_and_pad(img, grid: tuple[int, int], patch_size: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``img`` on a native-resolution canvas: float32 ``(3, rows * patch_size, cols * patch_size)``.

    The image (a PIL image of any mode, or a float tensor ``(3, H, W)`` in ``[0, 1]``) is resized bicubically
    (PIL's BICUBIC; tensors: antialiased ``F.interpolate``, clamped to ``[0, 1]``) by the largest factor
    that fits it in the canvas, keeping its aspect ratio (sides rounded, each at least one patch and at
    most the canvas), placed at the top left; the rest of the canvas is 0.0 (black in ``[0, 1]`` pixel
    space, before normalization). ``out``: a float32 CPU tensor of the canvas shape to write into."""
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
    if isinstance(img, Image.Image):
        img = to_rgb(img)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _BICUBIC)
        to_tensor(img, out=out[:, :nh, :nw])
    else:
        out[:, :nh, :nw] = _resize_tensor(img, nh, nw)
    return out
