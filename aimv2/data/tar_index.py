"""Tar shards without ``tarfile``: a header-only member scan, and an on-disk cache of each shard's index.

``_tar_members`` lists ``(name, data offset, size)`` of an uncompressed tar's regular members from its
headers alone; ``_cached_tar_members`` keeps that list per shard in the index cache (``index_cache_dir``)
while the shard is unchanged, so later starts and other ranks skip the scan.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator

import numpy as np

__all__ = ["INDEX_CACHE_ENV", "MAX_LONG_NAME_BYTES", "MAX_PAX_HEADER_BYTES", "index_cache_dir"]

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_META = (b"x", b"X", b"g", b"L", b"K")  # headers describing the next member (pax, GNU long name / link)
# Limits on what a header may make the scanner read: a longer record is damage, never allocated.
MAX_LONG_NAME_BYTES = 64 * 1024  # a GNU long name / long link record (``L`` / ``K``); PATH_MAX is 4 KiB
MAX_PAX_HEADER_BYTES = 1 << 20  # a pax extended header (``x`` / ``g``)
_MAX_NUMBER_DIGITS = 20  # a decimal pax number (size, record length): 20 digits hold any 64-bit value


def _tar_number(field: bytes) -> int:
    """A tar header number: NUL/space-terminated octal, or GNU base-256 (first byte 0x80 or 0xff, the latter
    negative). ValueError for anything else (a sign, a non-octal digit)."""
    if field and field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    if any(b < 0x30 or b > 0x37 for b in text):
        raise ValueError(f"not an octal number: {text[:16]!r}")
    return int(text, 8)


def _decimal(text: bytes | str, what: str) -> int:
    """A non-negative decimal number of at most 20 ASCII digits (pax sizes and record lengths)."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    if not raw or len(raw) > _MAX_NUMBER_DIGITS or not raw.isdigit():  # bytes.isdigit: ASCII digits only
        raise ValueError(f"bad {what} {raw[:24]!r}")
    return int(raw)


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``"<len> key=value\\n"`` records of a pax extended header; trailing NUL padding is ignored.
    ValueError for a malformed record (a length that is not a number, runs past the header or does not end
    the record at a newline, a record without ``=``)."""
    out, pos, end = {}, 0, len(data)
    while pos < end:
        if not data[pos:].strip(b"\0"):
            break
        space = data.find(b" ", pos, pos + _MAX_NUMBER_DIGITS + 1)
        if space < 0:
            raise ValueError(f"bad pax record at byte {pos} (no length)")
        length = _decimal(data[pos:space], "pax record length")
        stop = pos + length
        if length <= space + 1 - pos or stop > end or data[stop - 1:stop] != b"\n":
            raise ValueError(f"bad pax record length {length} at byte {pos}")
        key, eq, value = data[space + 1:stop - 1].partition(b"=")
        if not eq or not key:
            raise ValueError(f"bad pax record at byte {pos} (no key=value)")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = stop
    return out


def _tar_members(path: str) -> Iterator[tuple[str, int, int]]:
    """Yield ``(name, data offset, size)`` of every regular file member of the uncompressed tar at ``path``,
    from its headers alone (``seek`` over the data): ustar, GNU (long names ``L``, base-256 sizes) and pax
    (``path`` / ``size`` records) headers, like ``tarfile`` but about 10x faster, which matters at
    thousands of shards.

    The outcomes: members are yielded in order; the archive ends at the first all-zero block or at the end
    of the file. A first header that is not a tar header (bad checksum, a malformed number) raises
    ValueError; any later damage stops the scan with a UserWarning and keeps the members before it:
    a bad header, a negative size, a malformed pax record or size, a long-name record over
    ``MAX_LONG_NAME_BYTES`` or a pax header over ``MAX_PAX_HEADER_BYTES`` (neither is read), and a member
    or record whose data would run past the end of the file (not yielded). Every header is checked against
    the file size before anything is read, and offsets strictly increase, so the scan always ends."""
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
            if problem is not None and offset == 0:
                raise ValueError(f"aimv2: {path} is not a readable uncompressed tar file ({problem})")
            kind = hdr[156:157]
            data = offset + _BLOCK
            if problem is None and kind in _META:
                limit = MAX_LONG_NAME_BYTES if kind in (b"L", b"K") else MAX_PAX_HEADER_BYTES
                what = "long name record" if kind in (b"L", b"K") else "pax header"
                if size < 0:
                    problem = f"{what} of negative size {size}"
                elif size > limit:
                    problem = f"{what} of {size} bytes, over the limit of {limit}"
                elif data + size > file_size:
                    warnings.warn(f"aimv2: {path}: truncated inside the {what} at byte {offset}", stacklevel=4)
                    return
                else:
                    f.seek(data)
                    payload = f.read(size)
                    try:
                        if len(payload) != size:
                            raise ValueError(f"{what} cut short (the file shrank)")
                        if kind == b"L":
                            long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                        elif kind == b"g":
                            global_pax.update(_pax_records(payload))
                        elif kind != b"K":  # a long link name: links are not members, nothing to keep
                            pax.update(_pax_records(payload))
                    except ValueError as exc:
                        problem = str(exc)
                    else:
                        offset = data + -(-size // _BLOCK) * _BLOCK
                        continue
            if problem is None:
                fields = {**global_pax, **pax}
                try:
                    if "size" in fields:
                        size = _decimal(fields["size"], "pax size")
                    if size < 0:
                        raise ValueError(f"negative size {size}")
                except ValueError as exc:
                    problem = str(exc)
            if problem is not None:
                warnings.warn(f"aimv2: {path}: stopped indexing at byte {offset} ({problem})", stacklevel=4)
                return
            if data + size > file_size:  # damaged: not yielded, and nothing after it can be trusted
                warnings.warn(f"aimv2: {path}: truncated inside the member at byte {offset}", stacklevel=4)
                return
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
            offset = data + -(-size // _BLOCK) * _BLOCK  # > offset: the scan moves forward, always


# The tar index cache: a shard's member list, written once and reused while the shard is unchanged.
INDEX_CACHE_ENV = "AIMV2_INDEX_CACHE"
_INDEX_CACHE_VERSION = 2  # 2: members cut by the end of the file are no longer listed
_FINGERPRINT_BYTES = 4096  # the first block of members: one small read per shard
_SETTLED_NS = 3_000_000_000  # a shard modified in the last 3 s may still be changing: not cached
_cache_warned: set[str] = set()


def index_cache_dir(index_cache: bool | str | os.PathLike[str] | None = None) -> str | None:
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
                offsets, sizes = z["offsets"], z["sizes"]
                # an entry is only data (no pickle), but check it as a scan would: members inside the file
                if (offsets.dtype == np.int64 and sizes.dtype == np.int64 and offsets.shape == sizes.shape
                        and bool(np.all((offsets >= _BLOCK) & (offsets % _BLOCK == 0) & (sizes >= 0)
                                        & (sizes <= st.st_size - offsets)))):
                    names = z["names"].tobytes().decode("utf-8", "surrogateescape").split("\0") if len(sizes) else []
                    return list(zip(names, offsets.tolist(), sizes.tolist(), strict=True))
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
