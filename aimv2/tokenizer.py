"""Caption tokenizers: a dependency-free byte tokenizer and a SentencePiece (SigLIP-style) tokenizer, the text
cleaning both apply, and the sidecar file in which a trained SentencePiece model records its cleaning.

Both follow the conventions of the tokenizer AIMv2 was trained with (SigLIP's SentencePiece model, used
through L3M's ``HFTokenizer``):

- text is cleaned (:class:`TextCleaning`: ``ftfy.fix_text`` when enabled, HTML entities unescaped, whitespace
  collapsed, stripped, lower-cased, optionally ASCII punctuation dropped);
- the EOS id is appended, and a caption longer than ``context_length`` is truncated so that the EOS is
  still its last token;
- batches are right-padded to ``context_length`` with ``pad_id``.

SigLIP's tokenizer uses ``pad = eos = "</s>" = 1`` and AIMv2's text loss ignores id 1, so by default the
EOS is never supervised. Both tokenizers here default to that convention (``pad_id == eos_id``).

**One cleaning, at tokenizer training and at training.** ``aimv2-tokenizer train`` (:mod:`aimv2.tokenizer_cli`)
cleans every caption with a :class:`TextCleaning` and records it in a JSON *sidecar* next to the model,
``<name>.model.json`` (:func:`sidecar_path`; format in :func:`read_sidecar`). :class:`SentencePieceTokenizer`
reads the sidecar and applies exactly that cleaning; a model trained with ftfy refuses to load where ftfy is not
installed instead of cleaning differently. A model without a sidecar (e.g. SigLIP's ``spiece.model``) is cleaned
as before sidecars existed: lower-cased, no punctuation stripping, no ftfy.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import html
import importlib
import json
import math
import os
import re
import stat
import string
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._extras import require

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "TextCleaning",
    "build_tokenizer",
    "clean_text",
    "sidecar_path",
    "read_sidecar",
    "write_sidecar",
    "SIDECAR_FORMAT",
    "SIDECAR_VERSION",
    "FTFY_INSTALL",
]

_WHITESPACE = re.compile(r"\s+")
_PUNCTUATION = str.maketrans("", "", string.punctuation)

# How to install ftfy (an optional dependency, in the 'train' extra).
FTFY_INSTALL = "pip install ftfy (or pip install 'aimv2-kernels[train]')"


def _ftfy_module() -> Any:
    """``import ftfy``; ImportError says how to install it."""
    try:
        return importlib.import_module("ftfy")
    except ImportError as exc:
        raise ImportError(f"ftfy text cleaning needs 'ftfy', which is not installed: {FTFY_INSTALL}") from exc


def _ftfy_available() -> bool:
    try:
        importlib.import_module("ftfy")
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class TextCleaning:
    """How caption text is cleaned before tokenization, the same when a tokenizer is trained and when it is used.

    :meth:`apply` runs, in this order:

    1. ``ftfy.fix_text`` (mojibake, curly quotes, ligatures, ...) when ``ftfy`` is on;
    2. ``html.unescape`` twice (as open_clip does: ``&amp;amp;`` -> ``&``);
    3. whitespace runs collapsed to one space, and the ends stripped;
    4. lower-casing when ``lower``;
    5. ASCII punctuation (``string.punctuation``) dropped when ``strip_punctuation`` (as SigLIP's
       ``canonicalize_text``), then whitespace collapsed and stripped again.

    Args:
        lower: lower-case the text (AIMv2: True).
        strip_punctuation: drop ASCII punctuation (off by default).
        ftfy: apply ``ftfy.fix_text`` first. None (the default) means "when ftfy is importable", decided once,
            when the object is made: the field then holds True or False, so what is recorded is what ran.

    Raises TypeError naming the field when one is not a bool (``ftfy`` may be None).
    """

    lower: bool = True
    strip_punctuation: bool = False
    ftfy: bool | None = None

    def __post_init__(self) -> None:
        for name in ("lower", "strip_punctuation", "ftfy"):
            value = getattr(self, name)
            if name == "ftfy" and value is None:
                object.__setattr__(self, "ftfy", _ftfy_available())
            elif not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool{' or None' if name == 'ftfy' else ''}, "
                                f"got {type(value).__name__}")

    def apply(self, text: str) -> str:
        """``text`` cleaned (see the class docstring for the steps). Raises TypeError when ``text`` is not a str,
        ImportError when ``ftfy`` is on and ftfy is not installed."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.ftfy:
            text = _ftfy_module().fix_text(text)
        text = html.unescape(html.unescape(text))
        text = _WHITESPACE.sub(" ", text).strip()
        if self.lower:
            text = text.lower()
        if self.strip_punctuation:
            text = _WHITESPACE.sub(" ", text.translate(_PUNCTUATION)).strip()
        return text

    def to_dict(self) -> dict[str, bool]:
        """The options as a JSON-ready dict (the ``"cleaning"`` object of a sidecar)."""
        return {"lower": self.lower, "strip_punctuation": self.strip_punctuation, "ftfy": bool(self.ftfy)}

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], where: str = "cleaning") -> TextCleaning:
        """The cleaning of a sidecar's ``"cleaning"`` object: exactly the keys ``lower``, ``strip_punctuation`` and
        ``ftfy``, each a JSON boolean. Anything else raises ValueError naming ``where`` (an unknown option may be a
        cleaning step this version cannot apply, so it is refused, never ignored)."""
        if not isinstance(options, Mapping):
            raise ValueError(f"{where} must be a JSON object, got {type(options).__name__}")
        expected = ("lower", "strip_punctuation", "ftfy")
        unknown = sorted(set(options) - set(expected))
        if unknown:
            raise ValueError(f"{where} has unknown option(s) {unknown} (written by a newer aimv2?); "
                             f"this version applies only {list(expected)}")
        missing = [k for k in expected if k not in options]
        if missing:
            raise ValueError(f"{where} lacks option(s) {missing}")
        for k in expected:
            if not isinstance(options[k], bool):
                raise ValueError(f"{where}.{k} must be true or false, got {options[k]!r}")
        return cls(lower=options["lower"], strip_punctuation=options["strip_punctuation"], ftfy=options["ftfy"])


def clean_text(text: str, *, lower: bool = True, strip_punctuation: bool = False, ftfy: bool = False) -> str:
    """``TextCleaning(lower, strip_punctuation, ftfy).apply(text)``: unescape HTML entities (twice, as open_clip
    does), collapse whitespace, strip, and lower-case; ftfy and punctuation stripping are off by default here, as
    before they existed (pass ``ftfy=None`` for "when installed")."""
    return TextCleaning(lower=lower, strip_punctuation=strip_punctuation, ftfy=ftfy).apply(text)


# --------------------------------------------------------------------------------------------------------
# The sidecar: <name>.model.json
# --------------------------------------------------------------------------------------------------------

SIDECAR_FORMAT = "aimv2-tokenizer"
SIDECAR_VERSION = 1
MAX_SIDECAR_BYTES = 1 << 20  # a sidecar is a few hundred bytes; anything over this is not one
MAX_MODEL_BYTES = 1 << 30  # SentencePiece models are a few MiB (SigLIP's 32k: 0.8 MiB)
# Optional sidecar fields and their JSON types (checked when present; others are kept, unchecked).
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "model_file": (str,), "model_sha256": (str,), "unk_id": (int,), "bos_id": (int, type(None)),
    "model_type": (str,), "character_coverage": (int, float), "source": (str,), "captions": (int,),
    "skipped": (int,), "max_captions": (int, type(None)), "seed": (int,), "versions": (dict,),
    "skipped_reasons": (dict,),
}


def sidecar_path(model_file: str | os.PathLike) -> Path:
    """Where the sidecar of ``model_file`` lives: the model path with ``.json`` appended
    (``tok/shapes.model`` -> ``tok/shapes.model.json``; not ``shapes.json``, which a Hugging Face folder may hold
    as its own ``tokenizer.json``)."""
    if not isinstance(model_file, (str, os.PathLike)):
        raise TypeError(f"model_file must be a str or path, got {type(model_file).__name__}")
    return Path(os.fspath(model_file) + ".json")


def _read_bounded(path: str, limit: int, what: str) -> bytes:
    """The bytes of regular file ``path``, refused (ValueError naming it) when over ``limit`` or not a regular
    file; FileNotFoundError when missing."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{what} {path!r} is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{what} {path!r} is {st.st_size} bytes, over the {limit}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{what} {path!r} is over the {limit}-byte limit")
        return data
    finally:
        os.close(fd)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_sidecar(model_file: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of ``model_file`` (see :func:`sidecar_path`) as a dict, or None when there is none.

    Format (JSON, one object; written by :func:`write_sidecar`)::

        {"format": "aimv2-tokenizer", "version": 1,
         "cleaning": {"lower": true, "strip_punctuation": false, "ftfy": true},
         "vocab_size": 32000, "eos_id": 1, "pad_id": 1, "unk_id": 2, "bos_id": null,
         "model_file": "name.model", "model_sha256": "<hex digest of the .model file>",
         "model_type": "unigram", "character_coverage": 0.9995, "source": "<what it was trained on>",
         "captions": 123456, "skipped": 7, "max_captions": null, "seed": 0,
         "versions": {"sentencepiece": "0.2.0", "ftfy": "6.3.1"}}

    Required: ``format``, ``version`` (1), ``cleaning`` (exactly its three booleans, see
    :meth:`TextCleaning.from_dict`), ``vocab_size``, ``eos_id``, ``pad_id``; the rest are checked for type when
    present. The file is parsed as JSON only, at most 1 MiB. Anything else (not JSON, not an object, a missing
    or mistyped field, another format or a newer version) raises ValueError naming the file.
    """
    path = sidecar_path(model_file)
    if not path.exists():
        return None
    where = f"tokenizer sidecar {str(path)!r}"
    try:
        data = _read_bounded(str(path), MAX_SIDECAR_BYTES, "tokenizer sidecar")
    except OSError as exc:
        raise ValueError(f"{where} cannot be read: {exc}") from None
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{where} is not valid JSON: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None
    _check_record(info, where)
    return info


def _check_record(info: Any, where: str) -> None:
    """ValueError naming ``where`` unless ``info`` is a well-formed sidecar object (see :func:`read_sidecar`)."""
    if not isinstance(info, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(info).__name__}")
    if info.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{where} is not an aimv2 tokenizer sidecar (format {info.get('format')!r}, expected "
                         f"{SIDECAR_FORMAT!r})")
    version = info.get("version")
    if not _is_int(version) or version < 1:
        raise ValueError(f"{where}: version must be a positive int, got {version!r}")
    if version > SIDECAR_VERSION:
        raise ValueError(f"{where} has version {version}, newer than this aimv2 reads ({SIDECAR_VERSION}); "
                         f"upgrade aimv2")
    if "cleaning" not in info:
        raise ValueError(f"{where} lacks 'cleaning'")
    TextCleaning.from_dict(info["cleaning"], f"{where}: cleaning")  # checks it; nothing is imported here
    for name in ("vocab_size", "eos_id", "pad_id"):
        value = info.get(name)
        if not _is_int(value) or value < (1 if name == "vocab_size" else 0):
            raise ValueError(f"{where}: {name} must be a {'positive' if name == 'vocab_size' else 'non-negative'} "
                             f"int, got {value!r}")
    for name, types in _OPTIONAL_FIELDS.items():
        if name in info:
            value = info[name]
            ok = isinstance(value, types) and not isinstance(value, bool)
            if ok and isinstance(value, float) and not math.isfinite(value):
                ok = False
            if not ok:
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ValueError(f"{where}: {name} must be {names}, got {value!r}")
    digest = info.get("model_sha256")
    if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"{where}: model_sha256 must be 64 lower-case hex digits, got {digest!r}")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace`` (readers see
    the old file or the new one, never a part); the temporary file is removed on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        umask = os.umask(0o022)  # mkstemp makes the file 0600: give it the mode open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_sidecar(model_file: str | os.PathLike, cleaning: TextCleaning, *, pad_id: int | None = None,
                  **info: Any) -> Path:
    """Write the sidecar of ``model_file`` (an existing SentencePiece model) atomically and return its path.

    Args:
        model_file: the ``.model`` file; its vocabulary size, EOS, unknown and BOS ids and SHA-256 are read
            from it, so the sidecar always describes the file it sits beside.
        cleaning: the :class:`TextCleaning` the model was trained with (and that must be applied with it).
        pad_id: the padding id batches use; default the model's EOS id (SigLIP: pad = eos = 1).
        info: further JSON fields to record (``source``, ``captions``, ``skipped``, ``model_type``, ...; see
            :func:`read_sidecar` for the known ones, whose types are checked).

    Raises TypeError for a ``cleaning`` that is not a TextCleaning, ValueError for a model without an EOS piece,
    a ``pad_id`` outside the vocabulary or an ``info`` field of the wrong type, OSError when writing fails.
    """
    model_file = os.fspath(model_file)
    record = _sidecar_record(_read_model_bytes(model_file), model_file, cleaning, pad_id, info)
    path = sidecar_path(model_file)
    _atomic_write(path, record)
    return path


def _sidecar_record(data: bytes, model_file: str, cleaning: TextCleaning, pad_id: int | None,
                    info: Mapping[str, Any]) -> bytes:
    """The sidecar (UTF-8 JSON) of the model whose serialized bytes are ``data``, checked as :func:`read_sidecar`
    checks it (a mistyped ``info`` field is a ValueError here, before anything is written)."""
    if not isinstance(cleaning, TextCleaning):
        raise TypeError(f"cleaning must be a TextCleaning, got {type(cleaning).__name__}")
    sp = _load_processor(data, model_file)
    vocab_size, eos_id = int(sp.get_piece_size()), int(sp.eos_id())
    if eos_id < 0:
        raise ValueError(f"model_file {model_file!r} has no EOS piece; train it with eos_id >= 0")
    pad_id = eos_id if pad_id is None else pad_id
    if not _is_int(pad_id) or not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id must be an int in [0, {vocab_size}), got {pad_id!r}")
    versions = {"sentencepiece": getattr(require("sentencepiece", "write_sidecar"), "__version__", None)}
    if cleaning.ftfy:
        versions["ftfy"] = getattr(_ftfy_module(), "__version__", None)
    record: dict[str, Any] = {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "cleaning": cleaning.to_dict(),
        "vocab_size": vocab_size, "eos_id": eos_id, "pad_id": pad_id, "unk_id": int(sp.unk_id()),
        "bos_id": int(sp.bos_id()) if sp.bos_id() >= 0 else None,
        "model_file": os.path.basename(model_file), "model_sha256": hashlib.sha256(data).hexdigest(),
        "versions": versions,
    }
    for key, value in info.items():
        if key in record:
            raise ValueError(f"info field {key!r} is computed from the model and cannot be given")
        record[key] = value
    try:
        text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"info must hold JSON values only: {exc}") from None
    _check_record(json.loads(text), "info")
    return text.encode("utf-8")


def _read_model_bytes(model_file: str) -> bytes:
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"SentencePiece model_file not found: {model_file!r}")
    data = _read_bounded(model_file, MAX_MODEL_BYTES, "SentencePiece model_file")
    if not data:
        raise ValueError(f"SentencePiece model_file {model_file!r} is empty")
    return data


def _load_processor(data: bytes, model_file: str) -> Any:
    sentencepiece = require("sentencepiece", "SentencePieceTokenizer")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except RuntimeError as exc:
        raise ValueError(f"model_file {model_file!r} is not a SentencePiece model ({str(exc).strip()[:200]})"
                         ) from None
    return sp


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (room for a token and the EOS), got {context_length}")
    return context_length


class Tokenizer(abc.ABC):
    """Base class: text -> ids with EOS, and batches of text -> right-padded ``(B, context_length)`` int64.

    Attributes:
        vocab_size: number of ids; every id produced is in ``[0, vocab_size)``.
        eos_id: id appended to every encoded text.
        pad_id: id used for right padding (SigLIP convention: equal to ``eos_id``).
        context_length: length of every row returned by ``__call__``; ``encode`` never returns more ids.
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    context_length: int

    @abc.abstractmethod
    def _encode_clean(self, text: str) -> list[int]:
        """Ids of already cleaned text, without EOS and without truncation."""

    @abc.abstractmethod
    def _special_ids(self) -> frozenset[int]:
        """Ids that ``decode`` drops (pad, EOS and other control ids)."""

    @abc.abstractmethod
    def _decode_ids(self, ids: list[int]) -> str:
        """Text of non-special ids."""

    @abc.abstractmethod
    def _clean(self, text: str) -> str:
        """Normalise text before encoding (cleaning, lower-casing)."""

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` followed by the EOS id, at most ``context_length`` long (no padding).

        A text longer than ``context_length - 1`` tokens is cut so that the EOS stays the last id.
        Raises TypeError when ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._encode_clean(self._clean(text))
        return ids[: self.context_length - 1] + [self.eos_id]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode a batch: returns int64 ``(len(texts), context_length)``, right-padded with ``pad_id``.

        ``texts`` is a list or tuple of str; a bare str raises TypeError (wrap it in a list).
        """
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list or tuple of str, got {type(texts).__name__}")
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a 1-D sequence of ids, skipping pad, EOS and other special ids.

        Raises ValueError for an id outside ``[0, vocab_size)`` or a tensor that is not 1-D.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids contains {i}, outside [0, {self.vocab_size})")
        special = self._special_ids()
        return self._decode_ids([i for i in ids if i not in special])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


class ByteTokenizer(Tokenizer):
    """UTF-8 byte tokenizer with SigLIP-like special ids; needs no model file.

    Ids: 0 ``<s>`` (unused), 1 ``</s>`` (EOS and pad), 2 ``<unk>`` (unused), byte ``b`` -> ``b + 3``.
    ``vocab_size`` is 259. Cleaning: ``TextCleaning(lower=lower, strip_punctuation=False, ftfy=False)`` (no ftfy,
    so a run cleans the same wherever it runs).
    """

    BOS_ID, EOS_ID, UNK_ID, OFFSET = 0, 1, 2, 3

    def __init__(self, context_length: int = 77, lower: bool = True):
        self.context_length = _check_context_length(context_length)
        self.cleaning = TextCleaning(lower=bool(lower), strip_punctuation=False, ftfy=False)
        self.vocab_size = 256 + self.OFFSET
        self.eos_id = self.EOS_ID
        self.pad_id = self.EOS_ID

    @property
    def lower(self) -> bool:
        """Whether text is lower-cased (``self.cleaning.lower``)."""
        return self.cleaning.lower

    def _clean(self, text: str) -> str:
        return self.cleaning.apply(text)

    def _encode_clean(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def _special_ids(self) -> frozenset[int]:
        return frozenset({self.BOS_ID, self.EOS_ID, self.UNK_ID, self.pad_id})

    def _decode_ids(self, ids: list[int]) -> str:
        return bytes(i - self.OFFSET for i in ids).decode("utf-8", errors="replace")


# The cleaning of a model without a sidecar: what SentencePieceTokenizer did before sidecars (no ftfy).
_NO_SIDECAR_CLEANING = TextCleaning(lower=True, strip_punctuation=False, ftfy=False)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (e.g. SigLIP's ``spiece.model``, vocab 32000) as a ``Tokenizer``.

    The cleaning (:class:`TextCleaning`) is the one the model's sidecar ``<model_file>.json`` records (see
    :func:`read_sidecar`; ``aimv2-tokenizer train`` writes it), so text is cleaned exactly as the captions the model
    was trained on; without a sidecar it is ``lower=True, strip_punctuation=False, ftfy=False``. The options below
    override it one by one; an override that differs from the sidecar warns (UserWarning naming the option), since
    the text is then cleaned differently from the tokenizer's training data.

    Args:
        model_file: path to the ``.model`` file; FileNotFoundError names it when missing.
        context_length: row length of batches (77 for AIMv2).
        lower: lower-case text after cleaning; None: the sidecar's (else True).
        pad_id: padding id; None: the sidecar's, else the model's EOS id (SigLIP: pad = eos = 1, ignored by the
            loss).
        strip_punctuation: drop ASCII punctuation before encoding, as Hugging Face's ``SiglipTokenizer`` does in
            its ``canonicalize_text``; None: the sidecar's (else off).
        ftfy: apply ``ftfy.fix_text`` first; None: the sidecar's (else off).

    ``sentencepiece`` is imported here, lazily; ImportError says how to install it. When the cleaning uses ftfy
    (the sidecar says the model was trained with it) and ftfy is not installed, ImportError says so and how to
    install it: the tokenizer never silently cleans differently. A model without an EOS piece, a file that is not
    a SentencePiece model, and a bad sidecar (malformed, or describing another model: its vocabulary size, EOS id
    or SHA-256 differ) raise ValueError naming the file. ``vocab_size`` is ``sp.get_piece_size()``; ``sidecar``
    is the sidecar's dict, or None.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        context_length: int = 77,
        lower: bool | None = None,
        pad_id: int | None = None,
        *,
        strip_punctuation: bool | None = None,
        ftfy: bool | None = None,
    ):
        self.context_length = _check_context_length(context_length)
        if not isinstance(model_file, (str, os.PathLike)):
            raise TypeError(f"model_file must be a str or path, got {type(model_file).__name__}")
        self.model_file = os.fspath(model_file)
        for name, value in (("lower", lower), ("strip_punctuation", strip_punctuation), ("ftfy", ftfy)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool or None, got {type(value).__name__}")
        if not os.path.isfile(self.model_file):
            raise FileNotFoundError(f"SentencePiece model_file not found: {self.model_file!r}")
        require("sentencepiece", "SentencePieceTokenizer")
        data = _read_model_bytes(self.model_file)
        self.sp = _load_processor(data, self.model_file)
        self.vocab_size = int(self.sp.get_piece_size())
        self.eos_id = int(self.sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"model_file {self.model_file!r} has no EOS piece; train it with eos_id >= 0")
        self.sidecar = read_sidecar(self.model_file)
        trained = _NO_SIDECAR_CLEANING
        if self.sidecar is not None:
            self._check_sidecar(data)
            trained = TextCleaning.from_dict(self.sidecar["cleaning"])
        given = {"lower": lower, "strip_punctuation": strip_punctuation, "ftfy": ftfy}
        overrides = {k: v for k, v in given.items() if v is not None}
        if self.sidecar is not None:
            for k, v in overrides.items():
                if v != getattr(trained, k):
                    warnings.warn(f"{self.model_file}: {k}={v} overrides {k}={getattr(trained, k)} of its sidecar "
                                  f"{str(sidecar_path(self.model_file))!r}: text is cleaned differently from the "
                                  f"captions the tokenizer was trained on", UserWarning, stacklevel=2)
        self.cleaning = dataclasses.replace(trained, **overrides)
        if self.cleaning.ftfy and not _ftfy_available():
            if self.sidecar is not None and trained.ftfy:
                raise ImportError(f"{self.model_file} was trained with ftfy text cleaning (its sidecar "
                                  f"{str(sidecar_path(self.model_file))!r} says so), but ftfy is not installed: "
                                  f"{FTFY_INSTALL}; without it captions would be cleaned differently")
            raise ImportError(f"ftfy=True needs 'ftfy', which is not installed: {FTFY_INSTALL}")
        if pad_id is None:
            pad_id = self.sidecar["pad_id"] if self.sidecar is not None else self.eos_id
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
        if not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be in [0, {self.vocab_size}), got {pad_id}")
        self.pad_id = pad_id
        self._special = frozenset(
            {pad_id} | {i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        )

    def _check_sidecar(self, data: bytes) -> None:
        """ValueError naming the sidecar when it describes another model than ``data``."""
        info, where = self.sidecar, f"tokenizer sidecar {str(sidecar_path(self.model_file))!r}"
        digest = info.get("model_sha256")
        if digest is not None and digest != hashlib.sha256(data).hexdigest():
            raise ValueError(f"{where} describes another model than {self.model_file!r} (SHA-256 differs): the model "
                             f"was replaced after the sidecar was written; retrain, or remove the stale sidecar")
        if info["vocab_size"] != self.vocab_size:
            raise ValueError(f"{where} says vocab_size {info['vocab_size']}, but {self.model_file!r} has "
                             f"{self.vocab_size} pieces")
        if info["eos_id"] != self.eos_id:
            raise ValueError(f"{where} says eos_id {info['eos_id']}, but {self.model_file!r} has eos_id {self.eos_id}")
        if not info["pad_id"] < self.vocab_size:
            raise ValueError(f"{where}: pad_id {info['pad_id']} is outside [0, {self.vocab_size})")

    @property
    def lower(self) -> bool:
        """Whether text is lower-cased (``self.cleaning.lower``)."""
        return self.cleaning.lower

    @property
    def strip_punctuation(self) -> bool:
        """Whether ASCII punctuation is dropped (``self.cleaning.strip_punctuation``)."""
        return self.cleaning.strip_punctuation

    def _clean(self, text: str) -> str:
        return self.cleaning.apply(text)

    def _encode_clean(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def _special_ids(self) -> frozenset[int]:
        return self._special

    def _decode_ids(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, cleaning={self.cleaning})"


def build_tokenizer(spec: str | os.PathLike, context_length: int = 77) -> Tokenizer:
    """Tokenizer from a spec: ``"bytes"`` -> ByteTokenizer; a path ending in ``.model`` ->
    SentencePieceTokenizer with the cleaning of its sidecar (FileNotFoundError if it does not exist; ValueError
    for a bad sidecar, ImportError when it needs ftfy and ftfy is missing). Anything else raises ValueError."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a str or path, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec == "bytes":
        return ByteTokenizer(context_length=context_length)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec, context_length=context_length)
    raise ValueError(f"spec must be 'bytes' or a path to a SentencePiece .model file, got {spec!r}")
