"""``aimv2-tokenizer train``: train a SentencePiece caption tokenizer on the captions of any ``aimv2-train --data``.

``aimv2-tokenizer train --data /shards --out tok/captions.model --vocab-size 32000`` reads the captions of the
source (without decoding its images), cleans each with the same :class:`aimv2.tokenizer.TextCleaning` that
``aimv2-train --tokenizer tok/captions.model`` will apply, trains a SentencePiece model on them and writes
``tok/captions.model`` and its sidecar ``tok/captions.model.json`` (the cleaning, ids, vocabulary size and
source; see :func:`aimv2.tokenizer.read_sidecar`).

Ids, as SigLIP's ``spiece.model`` and :class:`aimv2.tokenizer.ByteTokenizer`: 0 ``<pad>`` (a control piece that
encoding never produces), 1 ``</s>`` (EOS, and the padding id of batches: pad = eos = 1, ``DecoderConfig.pad_id``,
ignored by the text loss), 2 ``<unk>``; no BOS. Pieces fill ids 3 to ``vocab_size - 1``.

Errors follow :mod:`aimv2.cli`: a bad flag, a ``--data`` that does not exist or holds no samples, an ``--out``
that exists (without ``--overwrite``) or a ``--vocab-size`` that does not fit the captions print one line and
exit with status 2; unreadable data (no usable caption at all) or an output that cannot be written, status 1.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._extras import require
from .cli import OperationalError, Parser, UsageError, one_line, run_main
from .tokenizer import (
    FTFY_INSTALL,
    SentencePieceTokenizer,
    TextCleaning,
    _atomic_write,
    _sidecar_record,
    read_sidecar,
    sidecar_path,
)

__all__ = ["train_tokenizer", "caption_reader", "VocabSizeError", "NoCaptionsError", "main", "build_parser"]

PROG = "aimv2-tokenizer"
PAD_PIECE_ID, EOS_ID, UNK_ID = 0, 1, 2  # SentencePiece's <pad>, </s>, <unk>; batches pad with EOS_ID
MAX_SENTENCE_BYTES = 4192  # SentencePiece's max_sentence_length: it drops longer sentences; counted as skipped
MODEL_TYPES = ("unigram", "bpe")
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class VocabSizeError(UsageError):
    """``vocab_size`` does not fit the captions: more pieces than SentencePiece can make of them (``too_large``),
    or fewer than their characters and the special pieces need. ``limit`` is the largest (``too_large``) or
    smallest size that fits.

    A ``ValueError`` (through :class:`aimv2.cli.UsageError`); ``aimv2-tokenizer`` prints it as one line, exit 2."""

    def __init__(self, message: str, *, too_large: bool, limit: int):
        super().__init__(message)
        self.too_large, self.limit = too_large, limit


class NoCaptionsError(OperationalError):
    """The source gave no usable caption (every sample unreadable, or empty after cleaning); exit status 1."""


# --------------------------------------------------------------------------------------------------------
# Captions without images
# --------------------------------------------------------------------------------------------------------

def caption_reader(source: Any) -> tuple[Callable[[int], str], bool]:
    """``(read, decodes_images)``: ``read(i)`` is the raw (uncleaned) caption of sample ``i`` of ``source``, or
    raises ``aimv2.data.BadSample`` (with the sample's key) when the sample cannot be used.

    The bundled shapes (:class:`aimv2.data.ShapesDataset`: the caption of the scene, nothing rendered) and every
    source of :func:`aimv2.data.open_source` (tar shards: the ``.txt``/``.json`` member only; image folders: the
    caption file; CSV / JSONL: the row; class folders: the class name) are read without decoding any image, and
    ``decodes_images`` is False. They apply the checks of ``source.raw(i)`` that need no image (a sample with no
    image member, no caption or an empty one is skipped); a corrupt image is not noticed, as its caption is
    still a caption. Any other source with ``raw(i)`` or ``source[i]`` (a ``Sample``) is read through it, with
    its images decoded, and ``decodes_images`` is True.
    """
    from .data import ShapesDataset
    from .data.sources import _Source

    if isinstance(source, ShapesDataset):
        return (lambda i: source.caption(source.scene(i))), False
    if isinstance(source, _Source):  # tar shards, caption folders, CSV / JSONL, class folders
        return source.caption, False
    if hasattr(source, "raw"):
        return (lambda i: source.raw(i).caption), True
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return (lambda i: source[i].caption), True
    raise TypeError(f"source must be 'shapes', a data path or a source with raw(i) or [i], got "
                    f"{type(source).__name__}")


def _open(source: Any, seed: int) -> tuple[Any, str]:
    """``(source object, description)`` of ``source``: 'shapes', a path (or list of shard paths) for
    ``aimv2.data.open_source``, or a source object, used as it is."""
    if isinstance(source, str) and source == "shapes":
        from .data import build_dataset
        return build_dataset("shapes", split="train", seed=seed), "shapes"
    if isinstance(source, (str, os.PathLike, list, tuple)):
        from .data import open_source
        where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else ", ".join(map(os.fspath, source))
        return open_source(source), where
    return source, repr(source)


class _Counts:
    """What reading the captions met: used captions, skipped samples by reason (the first few keys kept)."""

    def __init__(self) -> None:
        self.used, self.reasons, self.examples = 0, Counter(), []

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def skip(self, reason: str, key: str | None) -> None:
        self.reasons[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{key}: {reason}" if key else reason)


def _captions(read: Callable[[int], str], indices: Sequence[int], cleaning: TextCleaning, counts: _Counts,
              progress: bool, failure: list[BaseException]) -> Iterator[str]:
    """The cleaned captions of ``indices`` (SentencePiece pulls them); skipped ones are counted in ``counts``. An
    exception is kept in ``failure`` too: SentencePiece turns it into a RuntimeError, and the caller re-raises it."""
    from .data import BadSample

    tqdm = require("tqdm.auto", "aimv2-tokenizer's progress bar").tqdm
    bar = tqdm(indices, desc="captions", unit=" captions", disable=None if progress else True, mininterval=0.5)
    try:
        for i in bar:
            try:
                text = cleaning.apply(read(int(i)))
            except BadSample as exc:
                counts.skip(exc.reason, exc.key)
                continue
            if not text:
                counts.skip("empty after cleaning", None)
                continue
            if len(text.encode("utf-8")) > MAX_SENTENCE_BYTES:
                counts.skip(f"over {MAX_SENTENCE_BYTES} bytes after cleaning", None)
                continue
            counts.used += 1
            yield text
    except BaseException as exc:
        failure.append(exc)
        raise
    finally:
        bar.close()
    if progress:
        print(f"{PROG}: training SentencePiece on {counts.used} captions ...", file=sys.stderr, flush=True)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def train_tokenizer(
    source: Any,
    out: str | os.PathLike,
    *,
    vocab_size: int = 32000,
    max_captions: int | None = None,
    cleaning: TextCleaning | None = None,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    num_threads: int | None = None,
    source_name: str | None = None,
) -> Path:
    """Train a SentencePiece caption tokenizer on ``source`` and write ``out`` and its sidecar; return ``out``.

    Args:
        source: what ``aimv2-train --data`` takes: ``"shapes"`` (the bundled data, split train, seeded with
            ``seed``), a path (webdataset shards: a folder, a ``.tar``, a glob, a brace pattern or a list of
            them; a folder of images with caption files; a ``.csv``; a ``.jsonl``), or an already open source
            (anything :func:`caption_reader` reads).
        out: the model file to write, ending in ``.model``; its sidecar is ``out + ".json"``. Missing parent
            folders are created.
        vocab_size: number of pieces, the three special ones included (the tokenizer's ``vocab_size``).
        max_captions: read at most this many samples, a random subset (drawn with ``seed``, read in source
            order); None reads them all (SentencePiece holds every caption in memory while it trains).
        cleaning: the cleaning of every caption, recorded in the sidecar and applied again by
            :class:`aimv2.tokenizer.SentencePieceTokenizer`; default ``TextCleaning()`` (lower-case, no
            punctuation stripping, ftfy when installed).
        model_type: ``"unigram"`` (SigLIP's, the default) or ``"bpe"``.
        character_coverage: fraction of characters the pieces cover, in ``(0, 1]``; rarer ones become ``<unk>``.
        seed: seeds the ``max_captions`` subset, the shapes data and SentencePiece's random generator.
        overwrite: replace an existing ``out`` (and its sidecar); otherwise that is a FileExistsError.
        progress: show a progress bar (tqdm, on stderr) while captions are read.
        num_threads: SentencePiece's training threads; default ``min(16, os.cpu_count())``.
        source_name: how the sidecar's ``source`` names the data; default ``"shapes"``, the path, or the
            ``repr`` of a source object.

    Ids: 0 ``<pad>`` (never produced), 1 ``</s>`` (EOS and padding), 2 ``<unk>``, no BOS.

    Writes the sidecar, then the model (each through a temporary file and ``os.replace``), so a model never
    appears without its sidecar; then loads it back through ``SentencePieceTokenizer``.

    Raises TypeError / ValueError naming the argument for a bad one; FileNotFoundError / ValueError from
    :func:`aimv2.data.open_source` for a path that does not exist or holds no samples; FileExistsError for an
    existing ``out`` without ``overwrite``; :class:`VocabSizeError` (a ValueError) when ``vocab_size`` does not
    fit the captions; :class:`NoCaptionsError` when no sample gave a usable caption; ImportError for a missing
    sentencepiece or tqdm, or ftfy asked for and missing; OSError when writing fails.
    """
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a str or path, got {type(out).__name__}")
    out = Path(os.fspath(out))
    if out.suffix != ".model":
        raise ValueError(f"out must end in .model (build_tokenizer and --tokenizer take such paths), got {str(out)!r}")
    _check_int("vocab_size", vocab_size, 4)
    if max_captions is not None:
        _check_int("max_captions", max_captions, 1)
    _check_int("seed", seed, 0)
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)
    if cleaning is None:
        cleaning = TextCleaning()
    elif not isinstance(cleaning, TextCleaning):
        raise TypeError(f"cleaning must be a TextCleaning or None, got {type(cleaning).__name__}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {list(MODEL_TYPES)}, got {model_type!r}")
    if (isinstance(character_coverage, bool) or not isinstance(character_coverage, (int, float))
            or not (math.isfinite(character_coverage) and 0 < character_coverage <= 1)):
        raise ValueError(f"character_coverage must be a number in (0, 1], got {character_coverage!r}")
    for name, flag in (("overwrite", overwrite), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if not overwrite and (out.exists() or sidecar_path(out).exists()):
        which = out if out.exists() else sidecar_path(out)
        raise FileExistsError(f"{which} exists (pass overwrite=True, --overwrite, to replace it)")
    if cleaning.ftfy:
        cleaning.apply("")  # ImportError now, not after the data is opened, when ftfy is asked for and missing
    spm = require("sentencepiece", "aimv2-tokenizer")
    import numpy as np

    if source_name is not None and not isinstance(source_name, str):
        raise TypeError(f"source_name must be a str or None, got {type(source_name).__name__}")
    src, where = _open(source, seed)
    where = where if source_name is None else source_name
    read, _ = caption_reader(src)
    n = len(src)
    if max_captions is not None and max_captions < n:
        indices = np.sort(np.random.default_rng(seed).choice(n, size=max_captions, replace=False))
    else:
        indices = range(n)

    counts, failure, model = _Counts(), [], io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_captions(read, indices, cleaning, counts, progress, failure), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, character_coverage=float(character_coverage),
            pad_id=PAD_PIECE_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=0,
            num_threads=num_threads or min(16, os.cpu_count() or 1), minloglevel=2,
        )
    except RuntimeError as exc:
        if failure:  # raised while reading the captions: that error, not SentencePiece's wrapping of it
            raise failure[0] from None
        if counts.used == 0:
            raise _no_captions(where, counts) from None
        text = str(exc)
        high, low = _TOO_HIGH.search(text), _TOO_LOW.search(text)
        if high:
            limit = int(high.group(2))
            raise VocabSizeError(f"vocab_size {vocab_size} is too large for these {counts.used} captions "
                                 f"(SentencePiece can make at most {limit} pieces of them): use a vocab_size of at "
                                 f"most {limit}, or train on more captions", too_large=True, limit=limit) from None
        if low:
            limit = int(low.group(2))
            raise VocabSizeError(f"vocab_size {vocab_size} is too small for the {limit} characters and special pieces "
                                 f"these captions need: use a vocab_size of at least {limit}, or a lower "
                                 f"character_coverage", too_large=False, limit=limit) from None
        raise
    if counts.used == 0:
        raise _no_captions(where, counts)

    data = model.getvalue()
    info = {"model_type": model_type, "character_coverage": float(character_coverage), "source": where,
            "captions": counts.used, "skipped": counts.skipped, "max_captions": max_captions, "seed": seed,
            "skipped_reasons": dict(counts.reasons.most_common(10))}
    sidecar = _sidecar_record(data, str(out), cleaning, EOS_ID, info)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(sidecar_path(out), sidecar)  # the sidecar first: a model never stands without its own
    _atomic_write(out, data)
    SentencePieceTokenizer(out)  # reads back: model, sidecar and cleaning agree
    return out


def _no_captions(where: str, counts: _Counts) -> NoCaptionsError:
    reasons = "; ".join(f"{r} ({c})" for r, c in counts.reasons.most_common(3)) or "the source is empty"
    return NoCaptionsError(f"no usable caption in {where}: {counts.skipped} samples skipped ({reasons})")


# --------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``aimv2-tokenizer`` parser (one sub-command, ``train``); its errors are one line, exit status 2."""
    return _parsers()[0]


def _parsers() -> tuple[Parser, Parser]:
    """The parser and its ``train`` sub-parser."""
    p = Parser(prog=PROG, description="Caption tokenizers for aimv2-train --tokenizer.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    t = sub.add_parser("train", help="train a SentencePiece model on the captions of a data source",
                       description="Train a SentencePiece model (and its .model.json sidecar: cleaning, ids, "
                                   "source) on the cleaned captions of --data. Ids: 0 <pad> (unused), 1 </s> "
                                   "(EOS = pad), 2 <unk>, no BOS.")
    t.add_argument("--data", required=True,
                   help="'shapes' (bundled) or a path: webdataset .tar shards (a folder, a file, a glob or "
                        "'shard-{000..009}.tar'), a folder of images with .txt captions, a .csv or a .jsonl")
    t.add_argument("--out", required=True, metavar="PATH.model",
                   help="the model to write; its sidecar is PATH.model.json")
    t.add_argument("--vocab-size", type=int, default=32000, help="pieces, special ones included (default 32000)")
    t.add_argument("--max-captions", type=int, default=None, metavar="N",
                   help="read a random subset of N samples (default: all)")
    t.add_argument("--strip-punctuation", action="store_true",
                   help="drop ASCII punctuation from captions (SigLIP's canonicalize_text); recorded in the sidecar")
    t.add_argument("--no-ftfy", dest="ftfy", action="store_false", default=None,
                   help="do not apply ftfy.fix_text (default: applied when ftfy is installed)")
    t.add_argument("--no-lower", dest="lower", action="store_false", help="keep the captions' case")
    t.add_argument("--model-type", default="unigram", choices=MODEL_TYPES, help="SentencePiece model (default unigram)")
    t.add_argument("--character-coverage", type=float, default=0.9995,
                   help="fraction of characters covered by pieces, in (0, 1] (default 0.9995)")
    t.add_argument("--seed", type=int, default=0, help="seeds the --max-captions subset and SentencePiece")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out and its sidecar")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p, t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; a bad flag value exits with one line and status 2."""
    parser, t = _parsers()
    args = parser.parse_args(argv)  # one sub-command, so args.command == "train"; t's errors name it
    if args.vocab_size < 4:
        t.error(f"--vocab-size must be at least 4 (3 special pieces and one more), got {args.vocab_size}")
    if args.max_captions is not None and args.max_captions < 1:
        t.error(f"--max-captions must be at least 1, got {args.max_captions}")
    if not (math.isfinite(args.character_coverage) and 0 < args.character_coverage <= 1):
        t.error(f"--character-coverage must be in (0, 1], got {args.character_coverage}")
    if args.seed < 0:
        t.error(f"--seed must be >= 0, got {args.seed}")
    if not args.out.endswith(".model"):
        t.error(f"--out must end in .model (what --tokenizer takes), got {args.out!r}")
    if args.data != "shapes" and not any(c in args.data for c in "*{"):
        if not os.path.exists(args.data):
            t.error(f"--data {args.data}: no such file or folder")
    return args


def main(argv: list[str] | None = None) -> int:
    """``aimv2-tokenizer``: exit status 0; 2 after a usage error (bad flag, unusable --data, --out exists,
    --vocab-size that does not fit), 1 after an operational error (no usable caption, a write that fails)."""
    args = parse_args(argv)
    return run_main(PROG, _train, args)


def _train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not args.overwrite and (out.exists() or sidecar_path(out).exists()):
        which = out if out.exists() else sidecar_path(out)
        raise UsageError(f"--out {args.out}: {which} exists; pass --overwrite to replace it and its sidecar")
    cleaning = TextCleaning(lower=args.lower, strip_punctuation=args.strip_punctuation, ftfy=args.ftfy)
    try:  # the documented errors of opening --data: a usage error (missing, no samples) or unreadable
        source, where = _open(args.data, args.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--data {args.data}: {one_line(exc)}") from exc
    except OSError as exc:
        raise OperationalError(f"--data {args.data}: {one_line(exc)}") from exc
    try:
        path = train_tokenizer(source, out, vocab_size=args.vocab_size, max_captions=args.max_captions,
                               cleaning=cleaning, model_type=args.model_type,
                               character_coverage=args.character_coverage, seed=args.seed,
                               overwrite=args.overwrite, progress=args.progress, source_name=where)
    except VocabSizeError as exc:
        if exc.too_large:
            raise UsageError(f"--vocab-size {args.vocab_size} is too large for these captions (SentencePiece can make "
                             f"at most {exc.limit} pieces of them): pass --vocab-size {exc.limit} or less, or more "
                             f"captions") from None
        raise UsageError(f"--vocab-size {args.vocab_size} is too small for the characters of these captions: pass "
                         f"--vocab-size {exc.limit} or more, or a lower --character-coverage") from None
    except FileExistsError as exc:  # --out appeared since the check above
        raise UsageError(f"--out {args.out}: {one_line(exc)}") from None
    except OSError as exc:  # the output folder or file cannot be written
        raise OperationalError(f"--out {args.out}: {one_line(exc)}") from exc
    info = read_sidecar(path)
    c = info["cleaning"]
    reasons = "; ".join(f"{r}: {n}" for r, n in info["skipped_reasons"].items())
    print(f"captions:  {info['captions']} used, {info['skipped']} skipped{f' ({reasons})' if reasons else ''}, "
          f"from {where}")
    print(f"vocab:     {info['vocab_size']} pieces, {info['model_type']}; eos = pad = {info['eos_id']}, "
          f"unk = {info['unk_id']}")
    note = f" (ftfy is not installed: {FTFY_INSTALL})" if args.ftfy is None and not c["ftfy"] else ""
    print(f"cleaning:  lower={c['lower']} strip_punctuation={c['strip_punctuation']} ftfy={c['ftfy']}{note}")
    print(f"model:     {path}")
    print(f"sidecar:   {sidecar_path(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
