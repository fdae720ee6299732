"""Caption tokenizers: a dependency-free byte tokenizer and a SentencePiece (SigLIP-style) tokenizer.

Both follow the conventions of the tokenizer AIMv2 was trained with (SigLIP's SentencePiece model, used
through L3M's ``HFTokenizer``):

- text is cleaned (HTML entities unescaped, whitespace collapsed, stripped) and lower-cased;
- the EOS id is appended, and a caption longer than ``context_length`` is truncated so that the EOS is
  still its last token;
- batches are right-padded to ``context_length`` with ``pad_id``.

SigLIP's tokenizer uses ``pad = eos = "</s>" = 1`` and AIMv2's text loss ignores id 1, so by default the
EOS is never supervised. Both tokenizers here default to that convention (``pad_id == eos_id``).
"""

from __future__ import annotations

import abc
import html
import os
import re
import string
from collections.abc import Sequence

import torch

from ._extras import require

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "build_tokenizer",
    "clean_text",
]

_WHITESPACE = re.compile(r"\s+")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_text(text: str, *, lower: bool = True) -> str:
    """Unescape HTML entities (twice, as open_clip does), collapse whitespace, strip, and lower-case."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = html.unescape(html.unescape(text))
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower() if lower else text


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
    ``vocab_size`` is 259.
    """

    BOS_ID, EOS_ID, UNK_ID, OFFSET = 0, 1, 2, 3

    def __init__(self, context_length: int = 77, lower: bool = True):
        self.context_length = _check_context_length(context_length)
        self.lower = bool(lower)
        self.vocab_size = 256 + self.OFFSET
        self.eos_id = self.EOS_ID
        self.pad_id = self.EOS_ID

    def _clean(self, text: str) -> str:
        return clean_text(text, lower=self.lower)

    def _encode_clean(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def _special_ids(self) -> frozenset[int]:
        return frozenset({self.BOS_ID, self.EOS_ID, self.UNK_ID, self.pad_id})

    def _decode_ids(self, ids: list[int]) -> str:
        return bytes(i - self.OFFSET for i in ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (e.g. SigLIP's ``spiece.model``, vocab 32000) as a ``Tokenizer``.

    Args:
        model_file: path to the ``.model`` file; FileNotFoundError names it when missing.
        context_length: row length of batches (77 for AIMv2).
        lower: lower-case text after cleaning (AIMv2: True).
        pad_id: padding id; defaults to the model's EOS id (SigLIP: pad = eos = 1, ignored by the loss).
        strip_punctuation: drop ASCII punctuation before encoding, as Hugging Face's ``SiglipTokenizer``
            does in its ``canonicalize_text``. Off by default.

    ``sentencepiece`` is imported here, lazily; ImportError says how to install it. A model without an EOS
    piece raises ValueError. ``vocab_size`` is ``sp.get_piece_size()``.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        context_length: int = 77,
        lower: bool = True,
        pad_id: int | None = None,
        *,
        strip_punctuation: bool = False,
    ):
        self.context_length = _check_context_length(context_length)
        self.model_file = os.fspath(model_file)
        if not os.path.isfile(self.model_file):
            raise FileNotFoundError(f"SentencePiece model_file not found: {self.model_file!r}")
        sentencepiece = require("sentencepiece", "SentencePieceTokenizer")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        self.lower = bool(lower)
        self.strip_punctuation = bool(strip_punctuation)
        self.vocab_size = int(self.sp.get_piece_size())
        self.eos_id = int(self.sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"model_file {self.model_file!r} has no EOS piece; train it with eos_id >= 0")
        if pad_id is None:
            pad_id = self.eos_id
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
        if not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be in [0, {self.vocab_size}), got {pad_id}")
        self.pad_id = pad_id
        self._special = frozenset(
            {pad_id} | {i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        )

    def _clean(self, text: str) -> str:
        text = clean_text(text, lower=self.lower)
        if self.strip_punctuation:
            text = _WHITESPACE.sub(" ", text.translate(_PUNCTUATION)).strip()
        return text

    def _encode_clean(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def _special_ids(self) -> frozenset[int]:
        return self._special

    def _decode_ids(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def build_tokenizer(spec: str | os.PathLike, context_length: int = 77) -> Tokenizer:
    """Tokenizer from a spec: ``"bytes"`` -> ByteTokenizer; a path ending in ``.model`` ->
    SentencePieceTokenizer (FileNotFoundError if it does not exist). Anything else raises ValueError."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a str or path, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec == "bytes":
        return ByteTokenizer(context_length=context_length)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec, context_length=context_length)
    raise ValueError(f"spec must be 'bytes' or a path to a SentencePiece .model file, got {spec!r}")
