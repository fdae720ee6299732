"""``aimv2-extract``: features of a set of images from an AIMv2 encoder, written to one safetensors file.

``aimv2-extract --pretrained apple/aimv2-large-patch14-224 --data images/ --out feats.safetensors`` writes the
final (normed) patch features of every readable image; ``--layers=-1,-4 --pool mean`` writes the token-mean of
blocks 23 and 20 instead. See :func:`build_parser` for the flags and :mod:`aimv2.cli` for the exit statuses.

The data (``--data``):

- a folder of images: every image under it, recursively (``aimv2.data``'s folder walk: hidden files and
  links out of the folder are skipped), without labels; captions beside them are ignored. A folder whose images
  all lie in subfolders and that has no captions is read as class folders (``aimv2.data.ClassFolder``): the
  labels are the sorted subfolder indices and the class names are in the metadata.
- webdataset shards (a ``.tar``, a folder of them, a glob or a brace pattern), a CSV / TSV or a JSONL file: what
  ``aimv2.data.open_source`` reads (these need a caption per sample, as for training: a sample without one is
  skipped as unreadable). A shard's ``.cls`` member is its label.

Each image goes through ``aimv2.data.EvalTransform(image_size, crop_pct)`` (shorter side resized bicubically,
center crop) and the normalization (``--normalize``: released weights are CLIP-normalized, a training run uses
its own ``--normalize``), then the encoder (eval mode, no grad, bidirectional attention).

The output file (safetensors; tensors are in row order of the kept images):

- ``features`` (default, no ``--layers``): the encoder's output, ``(N_img, L, D)`` with ``--pool tokens``
  (``L = (S / p)^2`` patch tokens) or ``(N_img, D)`` with ``--pool mean`` (mean over the tokens, in fp32, then
  cast); or ``layer_<i>`` for each block ``i`` that ``--layers`` names (absolute index), the block's output
  (after the final RMSNorm with ``--norm``, the default, so that the last block's is ``features``).
- ``labels`` int64 ``(N_img,)`` when the data has labels (class folders, shards with ``.cls`` members; -1 for a
  sample without one).
- metadata (strings): ``keys`` (JSON list: each row's sample key, a path or ``shard:key``), ``skipped`` (JSON
  list of ``{"key", "reason"}``), ``num_images``, ``num_skipped``, ``tensors`` and ``layers`` (JSON lists),
  ``pool``, ``norm``, ``image_size``, ``crop_pct``, ``normalize``, ``dtype``, ``model``, ``data``, and
  ``classes`` (JSON) for class folders; ``skipped_truncated`` when the skipped list was too long for the header
  (it then holds its first entries; the sidecar has all).

Unreadable images (corrupt, truncated, missing; ``aimv2.data.BadSample``) are skipped, as training skips them:
counted, listed in the metadata and in a sidecar ``OUT.skipped.json`` (``OUT`` without ``.safetensors``; a stale
one from an earlier run is removed), and reported in one line on stderr. No readable image at all is an
operational error (exit 1) and writes nothing.

Memory and disk: features are written batch by batch to one part file per tensor (in a temporary folder beside
the output), so memory holds one batch of images and features whatever the number of images, plus each image's
key, index and label (tens of bytes each). At the end the part files are assembled behind the safetensors header
into a temporary file that replaces ``--out`` atomically (``os.replace``); each part file is deleted once copied,
so the disk holds at most the output plus its largest tensor twice. An interrupted run leaves ``--out`` as it was.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .cli import OperationalError, Parser, UsageError, check_backend, one_line, resolve_device, run_main
from .data.transforms import NORMALIZATIONS

PROG = "aimv2-extract"
POOLS = ("tokens", "mean")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Sample keys and the skipped list go into the safetensors header, which readers cap at 100 MB: the keys may take
# MAX_KEYS_BYTES (checked before anything runs), the skipped list MAX_SKIPPED_BYTES (beyond that the metadata holds
# its first entries and says so; the sidecar always holds all).
MAX_KEYS_BYTES = 64 << 20
MAX_SKIPPED_BYTES = 16 << 20
_REASON_CHARS = 300
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
_COPY_CHUNK = 16 << 20


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

class ImageFiles:
    """Every image file under ``root``, recursively, in ``aimv2.data``'s walk order (a folder's files sorted, then
    its subfolders sorted; hidden entries, links out of ``root``, FIFOs and devices skipped), without labels.
    ``raw(i)`` reads and decodes image ``i`` (a ``RawSample`` with an empty caption and label -1) or raises
    ``BadSample``; ``key(i)`` is its path. Raises ValueError when there is no image."""

    classes = None

    def __init__(self, root: str | os.PathLike[str]):
        from .data.paths import _check_dir, _image_ext, _walk

        self.root = _check_dir(root)
        self._images = [os.path.join(rel, name) for rel, files in _walk(self.root) for name in files
                        if _image_ext(name)]
        if not self._images:
            raise ValueError(f"aimv2: data path {self.root} contains no images")

    def __len__(self) -> int:
        return len(self._images)

    def key(self, index: int) -> str:
        """The image's path."""
        return os.path.join(self.root, self._images[index])

    def raw(self, index: int) -> Any:
        """Image ``index`` decoded to RGB, as a ``RawSample``; ``BadSample`` when it cannot be read."""
        from .data.decode import RawSample, _read_file, decode_image

        path = self.key(index)
        return RawSample(image=decode_image(_read_file(path, "image")), caption="", key=path)

    def __repr__(self) -> str:
        return f"ImageFiles({self.root!r}, {len(self)} images)"


def open_images(path: str) -> Any:
    """The image source of ``--data PATH`` (see the module docstring): :class:`ImageFiles`, a ``ClassFolder``, or
    what ``aimv2.data.open_source`` opens for shards, CSV and JSONL. Raises FileNotFoundError, ValueError
    (nothing usable there), OSError."""
    from .data import ClassFolder, open_source
    from .data.paths import _image_ext, _walk

    if not os.path.isdir(path) or any(n.endswith(".tar") and not n.startswith(".") for n in os.listdir(path)):
        return open_source(path)
    listing = _walk(path)
    at_root = any(_image_ext(n) for rel, files in listing if not rel for n in files)
    captioned = False  # some image has a same-stem .txt / .json beside it (open_source's test)
    for _, files in listing:
        stems = {os.path.splitext(n)[0] for n in files if n.lower().endswith((".txt", ".json"))}
        captioned = captioned or any(_image_ext(n) and os.path.splitext(n)[0] in stems for n in files)
    if not at_root and not captioned and any(_image_ext(n) for _, files in listing for n in files):
        return ClassFolder(path)
    return ImageFiles(path)


class _Items(torch.utils.data.Dataset):
    """``(index, image float32 (3, S, S) or None, skip reason or None, label)`` of each sample (DataLoader-safe:
    the source and the transform pickle)."""

    def __init__(self, source: Any, transform: Any):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None, int]:
        from .data import BadSample

        try:
            raw = self.source.raw(index)
            return index, self.transform(raw.image), None, int(getattr(raw, "label", -1))
        except BadSample as exc:
            return index, None, exc.reason[:_REASON_CHARS], -1



# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------

class SafetensorsStreamWriter:
    """Write a safetensors file whose tensors grow along dim 0, batch by batch, in bounded memory.

    :meth:`append` writes each batch's bytes to a part file per tensor in ``work_dir``; :meth:`finish` writes the
    header (shapes known by then) and copies the parts behind it into a temporary file beside ``path`` that then
    replaces ``path`` (``os.replace``), deleting each part once copied. Little-endian hosts only (safetensors'
    byte order). :meth:`discard` removes everything this writer wrote (``path`` is left as it was)."""

    def __init__(self, path: str | os.PathLike[str], work_dir: str | os.PathLike[str]):
        if sys.byteorder != "little":
            raise OperationalError("aimv2-extract writes safetensors on little-endian machines only")
        self.path, self.work_dir = Path(path), Path(work_dir)
        self._parts: dict[str, tuple[Any, torch.dtype, tuple[int, ...], int]] = {}

    def append(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s rows to tensor ``name`` (its dtype and trailing shape fixed by the first batch)."""
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not one of {list(_ST_DTYPES)}")
        part = self._parts.get(name)
        if part is None:
            f = open(self.work_dir / f"{len(self._parts)}.part", "wb")
            part = (f, t.dtype, tuple(t.shape[1:]), 0)
        f, dtype, tail, rows = part
        if t.dtype != dtype or tuple(t.shape[1:]) != tail:
            raise ValueError(f"{name}: batch of {t.dtype} {tuple(t.shape)} does not extend {dtype} (N, *{tail})")
        f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._parts[name] = (f, dtype, tail, rows + t.shape[0])

    def rows(self, name: str) -> int:
        """Rows written so far to tensor ``name`` (0 before its first batch)."""
        return self._parts[name][3] if name in self._parts else 0

    def finish(self, metadata: dict[str, str]) -> Path:
        """Write the file (tensors in the order first appended) with ``metadata``; returns its path."""
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, (f, dtype, tail, rows) in self._parts.items():
            f.close()
            size = rows * math.prod(tail) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [rows, *tail], "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors' own writer pads
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(len(blob).to_bytes(8, "little"))
                out.write(blob)
                for f, *_rest in self._parts.values():
                    part = Path(f.name)
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, _COPY_CHUNK)
                    part.unlink()
                out.flush()
                os.fsync(out.fileno())
            _chmod_default(tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path

    def discard(self) -> None:
        """Close and delete the part files."""
        for f, *_rest in self._parts.values():
            f.close()
            Path(f.name).unlink(missing_ok=True)
        self._parts.clear()


def _chmod_default(path: str) -> None:
    """Give a ``mkstemp`` file (created 0600) the mode a plain ``open`` would: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_json_atomic(path: Path, obj: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        _chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sidecar_path(out: str | os.PathLike[str]) -> Path:
    """Where the skipped-images list of output ``out`` goes: ``out`` without ``.safetensors``, plus
    ``.skipped.json``."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(f"{stem}.skipped.json")


# ---------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------

def parse_layers(text: str) -> int | list[int]:
    """``--layers``: timm's ``indices``. A bare integer ``n >= 1`` is the last ``n`` blocks; a comma-separated
    list (``0,11,-1``; a single index: ``5,``) or one negative number (``-1``) names blocks, negative from the
    end. Raises UsageError for anything else."""
    s = text.strip()
    try:
        if "," not in s:
            n = int(s)
            return [n] if n < 0 else n
        items = [p.strip() for p in s.split(",")]
        if items[-1] == "":
            items = items[:-1]
        return [int(p) for p in items]
    except ValueError:
        raise UsageError(f"--layers must be n (the last n blocks) or comma-separated block indices such as "
                         f"'0,-1', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``aimv2-extract`` argument parser."""
    p = Parser(prog=PROG, description="Features of a set of images from an AIMv2 encoder, written to a "
                                      "safetensors file (see the module docstring of aimv2.extract_cli).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", metavar="PATH", help="released weights (a folder with config.json + "
                                                          "model.safetensors, any layout, or a weights file)")
    src.add_argument("--checkpoint", metavar="RUN", help="a training run folder or checkpoint of aimv2-train")
    p.add_argument("--data", metavar="PATH", required=True,
                   help="a folder of images (class subfolders give labels), webdataset shards (.tar, a folder "
                        "of them, a glob, a brace pattern), a CSV/TSV or a JSONL file")
    p.add_argument("--out", metavar="FILE", required=True, help="the safetensors file to write (replaced)")
    f = p.add_argument_group("features")
    f.add_argument("--layers", type=str, default=None,
                   help="timm-style block indices: n = the last n blocks, or a list such as --layers=0,-1 "
                        "(negative from the end; one index: --layers=5, or --layers=-1); written as layer_<i>. "
                        "Default: the encoder's output, written as 'features'")
    f.add_argument("--pool", choices=POOLS, default="tokens",
                   help="tokens: (N_img, L, D) patch tokens; mean: (N_img, D) their mean (default tokens)")
    f.add_argument("--norm", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the trunk's final RMSNorm to each output (default; the last block's then equals "
                        "the encoder's output). --no-norm: the raw block outputs (timm's norm=False)")
    f.add_argument("--image-size", type=int, default=None,
                   help="side of the square input (a multiple of the patch size; default: the encoder's)")
    f.add_argument("--crop-pct", type=float, default=1.0,
                   help="center-crop share: the shorter side is resized to image-size / crop-pct (default 1.0, "
                        "as HF/timm AIMv2; ml-aim uses 0.875)")
    f.add_argument("--normalize", choices=tuple(NORMALIZATIONS), default=None,
                   help="pixel statistics (default: the encoder's own: clip for --pretrained, the run's training "
                        "--normalize for --checkpoint, imagenet when it has none)")
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=64, help="images per forward (default %(default)s)")
    r.add_argument("--workers", type=int, default=None,
                   help="image-decoding worker processes (default: min(8, CPUs) on CUDA, 0 on the CPU)")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    r.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="compute (autocast; weights stay fp32) and storage dtype of the features (default: "
                        "bf16 on CUDA, fp32 on the CPU)")
    r.add_argument("--backend", default="auto", help="op backend of the encoder (default auto)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from aimv2_kernels import BACKENDS

    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.image_size is not None and args.image_size < 1:
        p.error(f"--image-size must be positive, got {args.image_size}")
    if not (math.isfinite(args.crop_pct) and 0 < args.crop_pct <= 1):
        p.error(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.backend not in BACKENDS:
        p.error(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------

def load_encoder(args: argparse.Namespace) -> tuple[Any, str, str]:
    """The encoder the flags name, with a description and its own normalization: ``(encoder, description,
    normalize)``. Raises UsageError (a missing path, a training run given as --pretrained) or
    OperationalError (unreadable or unfitting weights / checkpoints)."""
    if args.checkpoint is not None:
        from .checkpoint import CheckpointError, find_checkpoint, load_trained_encoder, read_state

        path = args.checkpoint
        if not Path(path).exists():
            raise UsageError(f"--checkpoint {path}: no such file or directory")
        try:
            ckpt = find_checkpoint(Path(path))
            state = read_state(ckpt)
            enc, cfg = load_trained_encoder(ckpt, backend=args.backend)
        except CheckpointError as exc:
            raise OperationalError(f"--checkpoint {path}: {one_line(exc)}") from None
        train_config = state.get("train_config") if isinstance(state, dict) else None
        normalize = train_config.get("normalize") if isinstance(train_config, dict) else None
        return enc, f"checkpoint {ckpt} ({cfg.name})", normalize if normalize in NORMALIZATIONS else "imagenet"
    from .pretrained import WeightsError, is_training_run, load_pretrained_encoder

    path = args.pretrained
    if not Path(path).exists():
        raise UsageError(f"--pretrained {path}: no such file or directory")
    if is_training_run(path):
        raise UsageError(f"--pretrained {path}: a training run (aimv2-train's checkpoints), not released weights; "
                         f"use --checkpoint {path}")
    try:
        enc = load_pretrained_encoder(path, backend=args.backend)
    except (WeightsError, OSError) as exc:
        raise OperationalError(f"--pretrained {path}: {one_line(exc)}") from None
    return enc, f"pretrained {path}", "clip"


def _check_out(path: str) -> Path:
    """``--out``: a folder is a usage error; a folder that cannot be created or written an operational one.
    Nothing is written to ``path`` itself here."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"--out {path}: is a folder; give the path of the .safetensors file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OperationalError(f"--out {path}: cannot be written: {one_line(exc)}") from None
    return out


def _open_data(path: str) -> Any:
    try:
        return open_images(path)
    except FileNotFoundError:
        raise UsageError(f"--data {path}: no such file or directory") from None
    except ValueError as exc:  # no images there, or a path of unknown kind
        raise UsageError(f"--data {path}: {one_line(exc)}") from None
    except OSError as exc:
        raise OperationalError(f"--data {path}: {one_line(exc)}") from None


def _fit(entries: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """The longest prefix of ``entries`` whose JSON is at most ``limit`` bytes (about)."""
    total = 2
    for k, e in enumerate(entries):
        total += len(json.dumps(e)) + 2
        if total > limit:
            return entries[:k]
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    """``aimv2-extract``: exit status 0; 2 after a usage error, 1 after an operational error (see aimv2.cli)."""
    parser = build_parser()
    try:  # argparse's errors (and --help) exit through SystemExit: returned as the status here
        args = parser.parse_args(None if argv is None else list(argv))
        _check_args(parser, args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return run_main(PROG, _run, args)


def _run(args: argparse.Namespace) -> int:
    from ._extras import require
    from .data import ClassFolder, EvalTransform, Normalize, list_batches
    from .model import feature_take_indices

    device = resolve_device(args.device)
    check_backend(args.backend, device, ("prefix_attention",))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1)
                                                             if device.type == "cuda" else 0)
    layers_arg = None if args.layers is None else parse_layers(args.layers)
    out = _check_out(args.out)
    source = _open_data(args.data)
    enc, desc, own_normalize = load_encoder(args)
    cfg = enc.cfg
    try:
        take = [cfg.depth - 1] if layers_arg is None else feature_take_indices(cfg.depth, layers_arg)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--layers {args.layers}: {exc} (the encoder has {cfg.depth} blocks)") from None
    names = ["features"] if layers_arg is None else [f"layer_{i}" for i in take]
    image_size = args.image_size or cfg.image_size
    if image_size % cfg.patch_size:
        raise UsageError(f"--image-size {image_size} is not a multiple of the patch size {cfg.patch_size}")
    normalize = args.normalize or own_normalize
    keys = [source.key(i) for i in range(len(source))]
    if len(json.dumps(keys)) > MAX_KEYS_BYTES:
        raise UsageError(f"--data {args.data}: the keys of its {len(keys)} samples are over the {MAX_KEYS_BYTES}-"
                         f"byte limit of a safetensors header; extract a subset per file (e.g. some shards)")

    tqdm = require("tqdm.auto", "aimv2-extract's progress bar").tqdm
    norm_fn = Normalize(*NORMALIZATIONS[normalize])
    items = _Items(source, EvalTransform(image_size, crop_pct=args.crop_pct))
    enc = enc.to(device).eval()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    kept: list[int] = []
    labels: list[int] = []
    skipped: list[dict[str, str]] = []
    work_dir = tempfile.mkdtemp(prefix=f".{out.name}.parts-", dir=out.parent)
    writer = SafetensorsStreamWriter(out, work_dir)
    try:
        with tqdm(total=len(items), unit="img", desc="features", dynamic_ncols=True,
                  disable=None if args.progress else True) as bar, torch.no_grad():
            for batch in list_batches(items, args.batch_size, workers):
                good = [b for b in batch if b[1] is not None]
                skipped.extend({"key": keys[i], "reason": reason} for i, _, reason, _ in batch if reason is not None)
                bar.update(len(batch))
                if not good:
                    continue
                x = norm_fn(torch.stack([b[1] for b in good]), inplace=True).to(device, non_blocking=True)
                with autocast:
                    outs = enc.forward_intermediates(x, take, norm=args.norm, intermediates_only=True,
                                                     stop_early=True)
                for name, y in zip(names, outs):
                    y = y.float().mean(1) if args.pool == "mean" else y
                    try:
                        writer.append(name, y.to(dtype))
                    except OSError as exc:  # e.g. the disk is full
                        raise OperationalError(f"--out {args.out}: {one_line(exc)}") from None
                kept.extend(b[0] for b in good)
                labels.extend(b[3] for b in good)
        if not kept:
            raise OperationalError(f"--data {args.data}: no readable image ({len(skipped)} skipped of {len(items)})")
        classes = getattr(source, "classes", None)
        has_labels = isinstance(source, ClassFolder) or any(v >= 0 for v in labels)
        listed = _fit(skipped, MAX_SKIPPED_BYTES)
        meta = {"format": "pt", "keys": json.dumps([keys[i] for i in kept]), "skipped": json.dumps(listed),
                "num_images": str(len(kept)), "num_skipped": str(len(skipped)), "tensors": json.dumps(names),
                "layers": json.dumps(take), "pool": args.pool, "norm": json.dumps(args.norm),
                "image_size": str(image_size), "crop_pct": repr(args.crop_pct), "normalize": normalize,
                "dtype": str(dtype).replace("torch.", ""), "model": desc, "data": str(args.data)}
        if classes is not None:
            meta["classes"] = json.dumps(list(classes))
        if len(listed) < len(skipped):
            meta["skipped_truncated"] = f"the first {len(listed)}; all in {sidecar_path(out).name}"
        try:
            if has_labels:
                writer.append("labels", torch.tensor(labels, dtype=torch.int64))
            writer.finish(meta)
            side = sidecar_path(out)
            if skipped:
                _write_json_atomic(side, skipped)
            elif side.is_file():
                side.unlink()  # a stale list from an earlier run would describe another file
        except OSError as exc:
            raise OperationalError(f"--out {args.out}: {one_line(exc)}") from None
    finally:
        writer.discard()
        shutil.rmtree(work_dir, ignore_errors=True)
    if skipped:
        examples = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:3])
        print(f"{PROG}: skipped {len(skipped)} unreadable images of {len(items)}; e.g. {examples}; all in "
              f"{sidecar_path(out)}", file=sys.stderr)
    print(f"wrote {out}: {', '.join(names)} of {len(kept)} images ({args.pool}, {'normed' if args.norm else 'raw'}"
          f", {str(dtype).replace('torch.', '')}, {image_size} px, {normalize} normalization) from {desc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
