"""Data paths: shard lists from directories, globs and brace patterns, folder walks and image file names."""

from __future__ import annotations

import glob
import os
import re
import stat

__all__ = ["IMAGE_EXTENSIONS"]

# Image extensions, in the order a tar sample with several image members picks from.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_IMAGE_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}

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
                if not os.path.isfile(path):  # a FIFO or a device would block the scan, or never end
                    raise ValueError(f"aimv2: data path {path} is not a regular file")
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


def _inside(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` (resolved) or below it."""
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


def _walk(root: str) -> list[tuple[str, list[str]]]:
    """``(relative dir, sorted file names)`` for every non-hidden directory under ``root`` (``""`` for the
    root itself), in sorted depth-first order (a directory before its subdirectories).

    Only what resolves inside ``root`` is listed: a symlink (to a file or a directory) whose target lies
    outside the resolved ``root`` is skipped, as are broken links and anything that is neither a directory
    nor a regular file (FIFOs, sockets, devices would block or never end when read). Each real directory is
    listed once (tracked by ``(st_dev, st_ino)``), so a symlink loop or a second link to a directory ends
    there. Unreadable directories are skipped."""
    real_root = os.path.realpath(root)
    try:
        st = os.stat(real_root)
    except OSError:
        return []
    out: list[tuple[str, list[str]]] = []
    seen = {(st.st_dev, st.st_ino)}
    stack = [("", real_root)]  # (relative path, real path), popped depth first
    while stack:
        rel, real = stack.pop()
        files, dirs = [], []
        try:
            with os.scandir(real) as it:
                entries = list(it)
        except OSError:
            entries = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not _inside(target, real_root):
                        continue  # never out of the data root
                    tst = os.stat(target)
                    if stat.S_ISDIR(tst.st_mode):
                        dirs.append((name, target, (tst.st_dev, tst.st_ino)))
                    elif stat.S_ISREG(tst.st_mode):
                        files.append(name)
                elif entry.is_dir(follow_symlinks=False):
                    dst = entry.stat(follow_symlinks=False)
                    dirs.append((name, entry.path, (dst.st_dev, dst.st_ino)))
                elif entry.is_file(follow_symlinks=False):
                    files.append(name)
            except (OSError, ValueError):  # vanished, a broken link, a loop: skip it
                continue
        out.append((rel, sorted(files)))
        todo = []
        for name, real_dir, ident in sorted(dirs):
            if ident in seen:  # a symlink loop, or a second link to a directory already listed
                continue
            seen.add(ident)
            todo.append((os.path.join(rel, name) if rel else name, real_dir))
        stack.extend(reversed(todo))
    return out


def _image_ext(name: str) -> bool:
    return os.path.splitext(name)[1][1:].lower() in _IMAGE_RANK
