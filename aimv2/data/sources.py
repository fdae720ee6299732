"""Real image-caption sources (all map-style, ``len(src)`` samples, read one at a time with ``src.raw(i)``).

- ``TarShards``: webdataset tar shards (a directory of ``*.tar``, one ``.tar``, a glob, a list, or a brace
  pattern ``"shard-{000..009}.tar"``). Members are grouped into samples by webdataset key (the member path up
  to the first dot of its basename); the image is the ``jpg``/``jpeg``/``png``/``webp`` member, the caption
  the ``.txt`` member or a field of the ``.json`` one, the label an optional ``.cls`` member.
- ``ImageFolderCaptions``: images with a same-stem ``.txt`` (or ``.json``) caption beside them, recursively.
- ``CSVSource`` / ``JSONLSource``: one row (line) per sample, naming the image file and holding the caption.
- ``ClassFolder``: ``root/<class name>/<images>``; label = sorted class index, caption = class name.
- ``open_source(path)`` picks one of these from the path.

``src.raw(i)`` returns a ``RawSample`` (a PIL image of mode ``"RGB"``, see ``decode``). A sample that cannot be
used is still indexed, and reading it raises ``BadSample`` with a one-line ``reason``, so the loader can skip
and count it. ``src.raw(i, lazy=True)`` reads the image's header only: the sample's image is a ``LazyImage``
that the transform decodes, a JPEG at the reduced size its crop allows (see ``TrainTransform``); its pixel
data is checked when it is decoded. Nothing here draws random numbers.

File handles are opened lazily in the process that reads (``os.getpid()`` is remembered; after a fork the
child opens its own), and are never pickled, so a source can be handed to ``torch.utils.data.DataLoader``
workers with any start method. Tar members are read with ``os.pread`` (no shared file offset), so reading
from several threads is safe too.
"""

from __future__ import annotations

import collections
import csv
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .decode import (
    MAX_CAPTION_BYTES,
    MAX_IMAGE_BYTES,
    BadSample,
    Image,
    LazyImage,
    RawSample,
    _clean_caption,
    _decode_text,
    _json_caption,
    _json_loads,
    _read_file,
    decode_image,
    open_image,
)
from .paths import _IMAGE_RANK, _check_dir, _check_file, _expand_shards, _has_glob, _image_ext, _is_brace, _walk
from .tar_index import _cached_tar_members, index_cache_dir

__all__ = ["TarShards", "ImageFolderCaptions", "CSVSource", "JSONLSource", "ClassFolder", "open_source"]

IMAGE_COLUMNS = ("image", "image_path", "filepath", "path", "file", "filename", "img")
CAPTION_COLUMNS = ("caption", "text", "txt")
_MAX_OPEN_SHARDS = 64  # per process


def _decode(data: bytes, min_side: int | None, lazy: bool) -> Image.Image | LazyImage:
    """The image of a sample: decoded (``decode_image``), or its checked header (``open_image``) when lazy."""
    return open_image(data) if lazy else decode_image(data, min_side=min_side)


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

    def raw(self, index: int, *, min_side: int | None = None, lazy: bool = False) -> RawSample:
        """Sample ``index`` decoded (negative indices count from the end); raises ``BadSample`` (with ``key``
        set) when it cannot be used, IndexError / TypeError for a bad index. ``min_side``: the most pixels the
        caller needs on either side; a big JPEG may then be decoded at a reduced size (see ``decode_image``).
        ``lazy``: read the image's header only (checked as ``open_image`` does) and return it as a
        ``LazyImage`` for the caller to decode (``min_side`` is then ignored)."""
        i = self._index(index)
        if min_side is not None and (isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1):
            raise ValueError(f"min_side must be a positive int or None, got {min_side!r}")
        if not isinstance(lazy, bool):
            raise TypeError(f"lazy must be a bool, got {type(lazy).__name__}")
        try:
            return self._raw(i, min_side, lazy)
        except BadSample as exc:
            if exc.key is None:
                raise BadSample(exc.reason, self.key(i)) from None
            raise

    def caption(self, index: int) -> str:
        """The caption of sample ``index``, read without the image (``aimv2-tokenizer`` reads captions this way):
        what ``raw(index).caption`` is, and the same ``BadSample`` for a sample without an image or a caption.
        A corrupt image is not noticed here (its caption is still a caption)."""
        i = self._index(index)
        try:
            return self._caption(i)
        except BadSample as exc:
            if exc.key is None:
                raise BadSample(exc.reason, self.key(i)) from None
            raise

    def _caption(self, i: int) -> str:
        raise NotImplementedError

    def _raw(self, i: int, min_side: int | None = None, lazy: bool = False) -> RawSample:
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

    def _read(self, shard: int, offset: int, size: int, what: str, limit: int = MAX_CAPTION_BYTES) -> bytes:
        if size > limit:  # checked before anything is allocated
            raise BadSample(f"{what} member of {size} bytes is over the {limit}-byte limit")
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

    def _caption(self, i: int) -> str:
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
        return _clean_caption(caption)

    def _raw(self, i: int, min_side: int | None = None, lazy: bool = False) -> RawSample:
        caption = self._caption(i)
        row, shard = self._rows[i].tolist(), int(self._shard[i])
        label = -1
        if row[_CLS_OFF] >= 0:
            try:
                label = int(_decode_text(self._read(shard, row[_CLS_OFF], row[_CLS_LEN], ".cls")).strip())
            except ValueError:
                label = -1
        image = _decode(self._read(shard, row[_IMG_OFF], row[_IMG_LEN], "image", MAX_IMAGE_BYTES), min_side, lazy)
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

    def _caption(self, i: int) -> str:
        cap = self._captions[i]
        if cap is None:
            raise BadSample("missing caption (no same-stem .txt or .json file)")
        data = _read_file(os.path.join(self.root, cap), "caption", MAX_CAPTION_BYTES)
        if cap.lower().endswith(".json"):
            return _clean_caption(_json_caption(data, self.json_field, "caption .json"))
        return _clean_caption(_decode_text(data))

    def _raw(self, i: int, min_side: int | None = None, lazy: bool = False) -> RawSample:
        caption = self._caption(i)
        image = _decode(_read_file(os.path.join(self.root, self._images[i]), "image"), min_side, lazy)
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

    def _caption(self, i: int) -> str:
        return self.classes[int(self._labels[i])]

    def _raw(self, i: int, min_side: int | None = None, lazy: bool = False) -> RawSample:
        label = int(self._labels[i])
        image = _decode(_read_file(os.path.join(self.root, self._images[i]), "image"), min_side, lazy)
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

    def _caption(self, i: int) -> str:
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
        return caption

    def _raw(self, i: int, min_side: int | None = None, lazy: bool = False) -> RawSample:
        caption = self._caption(i)
        image = self._images[i].strip()
        if "://" in image:
            raise BadSample(f"image {image} is a URL (aimv2 does not download)")
        full = image if os.path.isabs(image) else os.path.join(self._base, image)
        return RawSample(image=_decode(_read_file(full, "image"), min_side, lazy), caption=caption, key=self.key(i))


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


def _bounded_lines(f: Any, limit: int) -> Iterator[str | None]:
    """The lines of text file ``f``, each read into memory only up to ``limit`` characters: a longer line is
    ``None`` (and the rest of it is skipped in chunks), so one giant line cannot exhaust memory."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith("\n"):
            yield line
            continue
        while line and not line.endswith("\n"):  # too long: skip to its end
            line = f.readline(1 << 16)
        yield None


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
            for lineno, line in enumerate(_bounded_lines(f, MAX_CAPTION_BYTES), start=1):
                if line is not None and not line.strip():
                    continue
                lines.append(lineno)
                try:
                    if line is None:
                        raise BadSample(f"JSON line over the {MAX_CAPTION_BYTES}-character limit")
                    obj = _json_loads(line, "JSON line")
                except BadSample as exc:
                    objs.append(None)
                    errors.append(exc.reason)
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


def open_source(path: str | os.PathLike[str] | list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...],
                **kw: Any) -> _Source:
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
