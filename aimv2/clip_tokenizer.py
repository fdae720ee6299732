"""CLIP's byte-level BPE tokenizer, read from a checkpoint's ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``),
for the text tower of AIMv2 LiT (:mod:`aimv2.lit`). Standard library only (no ``regex``, no ``tokenizers``).

The algorithm is OpenAI CLIP's ``SimpleTokenizer`` (and open_clip's, which the released LiT's special tokens
``<start_of_text>`` / ``<end_of_text>`` come from):

1. **Cleaning** (``cleaning="clip"``, the default): ``ftfy.fix_text`` (when ``ftfy`` is on; otherwise Unicode
   NFC, which ftfy also applies), HTML entities unescaped twice, whitespace runs (Python's ``\\s``) collapsed to
   one space, stripped, ``str.lower()``. ``cleaning="transformers"`` is what transformers 5's ``CLIPTokenizer``
   (the ``tokenizers``-backed one, which ``CLIPTokenizer.from_pretrained`` and ``AutoProcessor`` give) does
   instead: NFC, runs of Unicode ``White_Space`` to one space, each character lower-cased on its own (a final
   capital sigma becomes σ, not ς), no ftfy, no HTML unescaping, the special-token strings matched in the raw
   text before cleaning, and the pattern below case-sensitive. The two agree on plain prompts; they differ on
   HTML entities, what ftfy repairs (curly quotes, mojibake, ligatures, full-width forms), U+001C..U+001F,
   U+0345 and a final capital sigma (tests/test_zeroshot.py checks each against its reference on random
   text).
2. **Pre-tokenization** with CLIP's pattern
   ``<special>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (case-insensitive). CLIP uses
   the ``regex`` package for ``\\p{L}`` / ``\\p{N}``; here the two classes are built from ``unicodedata``
   (every code point whose general category starts with ``L``, resp. ``N``) and ``\\s`` is Unicode's
   ``White_Space`` set (what ``regex`` matches; Python's ``re`` would add U+001C..U+001F). The result is the
   same for every character that Python's ``unicodedata`` and the ``regex`` package classify alike: all of them
   except code points assigned after Python's Unicode version (14.0 in Python 3.11, 15.0 in 3.12), which
   ``regex`` may know as letters or digits (tests/test_zeroshot.py compares them with ``regex`` on every
   assigned code point below U+3400 and every 7th above). U+0345 is a quirk of ``regex`` that is reproduced
   (see ``_pattern``).
3. **Byte-level BPE**: each piece's UTF-8 bytes mapped to GPT-2's printable byte alphabet, ``</w>`` appended to
   the last symbol, the merges of ``merges.txt`` applied by rank.
4. ``<bos> tokens <eos>``; a text longer than ``context_length`` keeps its first ``context_length - 2`` tokens and
   still ends with EOS (CLIP's ``truncate=True``); batches are right-padded to ``context_length`` (or to the
   longest row) with ``pad_id``.

Padding: the released ``aimv2-large-patch14-224-lit`` tokenizer config pads with ``<end_of_text>`` (the EOS,
49407); OpenAI's ``clip.tokenize`` pads with 0. Either is harmless for the LiT: its text tower is causal and
pools at the *first* EOS, which no later position can influence. The default ``pad_id`` is the config's
``pad_token`` when there is one, else the EOS id.
"""
from __future__ import annotations

import functools
import html
import importlib
import json
import os
import re
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["CLIPTokenizer", "TokenizerFilesError", "CLEANINGS", "bytes_to_unicode", "letter_number_classes"]

CLEANINGS = ("clip", "transformers")

# Unicode's White_Space property: what the `regex` package's (and tokenizers') \s matches.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITE_SPACE_RUN = re.compile(f"[{_WHITE_SPACE}]+")
_PY_WHITESPACE_RUN = re.compile(r"\s+")  # CLIP's whitespace_clean uses Python's re

MAX_FILE_BYTES = 256 << 20
_CACHE_LIMIT = 1 << 16
_DEFAULT_SPECIALS = (("<|startoftext|>", "<|endoftext|>"), ("<start_of_text>", "<end_of_text>"))


class TokenizerFilesError(ValueError):
    """Tokenizer files that cannot be used: unreadable, malformed, or inconsistent (a merge whose symbols or
    result are not in the vocabulary, a special token without an id)."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's / CLIP's map from the 256 byte values to printable characters (printable Latin-1 bytes map to
    themselves, the rest to U+0100 onwards, in byte order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _ranges(flags: list[bool]) -> str:
    """A ``re`` character-class body for the code points whose flag is set (as ranges)."""
    parts, start = [], None
    for cp, on in enumerate([*flags, False]):
        if on and start is None:
            start = cp
        elif not on and start is not None:
            end = cp - 1
            parts.append(re.escape(chr(start)) if start == end else f"{re.escape(chr(start))}-{re.escape(chr(end))}")
            start = None
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def letter_number_classes() -> tuple[str, str]:
    """``(letters, numbers)``: ``re`` character-class bodies equal to ``\\p{L}`` and ``\\p{N}`` under Python's
    ``unicodedata`` (general categories ``L*`` and ``N*``). Built once (about 0.1 s)."""
    cats = [unicodedata.category(chr(cp))[0] for cp in range(sys.maxunicode + 1)]
    return _ranges([c == "L" for c in cats]), _ranges([c == "N" for c in cats])


def _pattern(specials: Sequence[str], *, clip: bool) -> re.Pattern[str]:
    """CLIP's pre-tokenizer pattern with ``specials`` first: OpenAI's (``clip=True``: compiled with the
    ``regex`` package's IGNORECASE) or transformers' (case-sensitive, on text lower-cased before)."""
    # IGNORECASE matters for the literal alternatives only ("'ſ" is a contraction to CLIP: the long s folds to
    # s). The `regex` package does not widen [\p{L}] by case, but it does widen the negated class
    # [^\s\p{L}\p{N}]: U+0345 (COMBINING GREEK YPOGEGRAMMENI, whose case fold is the letter iota) matches
    # neither, so CLIP drops it like whitespace; the tokenizers library keeps it as a symbol. It is the only
    # such code point (tests/test_zeroshot.py checks the classes code point by code point).
    letters, numbers = letter_number_classes()
    literals = [re.escape(s) for s in sorted(specials, key=len, reverse=True)]
    literals += ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    other = f"[^{_WHITE_SPACE}{chr(0x345) if clip else ''}{letters}{numbers}]+"
    head = "(?i:" + "|".join(literals) + ")" if clip else "|".join(literals)
    return re.compile("|".join([head, f"[{letters}]+", f"[{numbers}]", other]))


def _ftfy_fix() -> Any:
    try:
        return importlib.import_module("ftfy").fix_text
    except ImportError:
        return None


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (see the module docstring for the steps).

    Args:
        vocab: token -> id (``vocab.json``); must hold the special tokens unless ``special_ids`` gives them.
        merges: the BPE merges in rank order, each a pair of symbols (``merges.txt`` without its header).
        bos_token, eos_token: the special tokens' strings (None: ``<|startoftext|>`` / ``<|endoftext|>``, or
            open_clip's ``<start_of_text>`` / ``<end_of_text>`` when the vocabulary has those).
        pad_id: the padding id (None: the EOS id).
        context_length: the length of a row: BOS + up to ``context_length - 2`` tokens + EOS (77 in CLIP).
        cleaning: ``"clip"`` (OpenAI CLIP's) or ``"transformers"`` (transformers 5's CLIPTokenizer).
        ftfy: with ``cleaning="clip"``, apply ``ftfy.fix_text`` first: True requires ftfy (ImportError when it is
            not installed), None (default) uses it when it is installed, False never (NFC instead).
        special_ids: ids of special tokens that are not in ``vocab`` (a tokenizer config's
            ``added_tokens_decoder``).

    Raises TokenizerFilesError for an inconsistent vocabulary or merge list, ValueError / TypeError for a bad
    argument.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_id: int | None = None, context_length: int = 77,
                 cleaning: str = "clip", ftfy: bool | None = None, special_ids: Mapping[str, int] | None = None):
        if cleaning not in CLEANINGS:
            raise ValueError(f"cleaning must be one of {CLEANINGS}, got {cleaning!r}")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (BOS and EOS), got {context_length!r}")
        if ftfy is not None and not isinstance(ftfy, bool):
            raise TypeError(f"ftfy must be a bool or None, got {type(ftfy).__name__}")
        self.encoder: dict[str, int] = {}
        for token, i in vocab.items():
            if not isinstance(token, str) or isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise TokenizerFilesError(f"vocab entries must map strings to non-negative ints, got {token!r}: {i!r}")
            self.encoder[token] = i
        for token, i in (special_ids or {}).items():
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise TokenizerFilesError(f"special token {token!r} has id {i!r}, not a non-negative int")
            self.encoder.setdefault(token, i)
        if not self.encoder:
            raise TokenizerFilesError("the vocabulary is empty")
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            if len(pair) != 2 or not all(isinstance(s, str) and s for s in pair):
                raise TokenizerFilesError(f"merge {rank} must be a pair of non-empty symbols, got {pair!r}")
            a, b = pair
            if a + b not in self.encoder:
                raise TokenizerFilesError(f"merge {rank} ({a!r} {b!r}) makes {a + b!r}, which is not in the "
                                          f"vocabulary")
            self.bpe_ranks.setdefault((a, b), rank)
        if bos_token is None or eos_token is None:
            default = next((p for p in _DEFAULT_SPECIALS if all(t in self.encoder for t in p)), _DEFAULT_SPECIALS[0])
            bos_token = default[0] if bos_token is None else bos_token
            eos_token = default[1] if eos_token is None else eos_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if not isinstance(token, str) or not token:
                raise TypeError(f"{name} must be a non-empty str, got {token!r}")
            if token not in self.encoder:
                raise TokenizerFilesError(f"{name} {token!r} is not in the vocabulary")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id, self.eos_id = self.encoder[bos_token], self.encoder[eos_token]
        if pad_id is None:
            pad_id = self.eos_id
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
        self.pad_id = pad_id
        self.context_length = context_length
        self.cleaning = cleaning
        fix = _ftfy_fix() if cleaning == "clip" and ftfy is not False else None
        if ftfy is True and fix is None:
            raise ImportError("CLIPTokenizer(ftfy=True) needs 'ftfy', which is not installed: pip install ftfy")
        self.ftfy = fix is not None
        self._fix_text = fix
        self._specials = (bos_token, eos_token)
        self._pattern = _pattern(self._specials, clip=cleaning == "clip")
        self._split_specials = re.compile("(" + "|".join(re.escape(s) for s in sorted(self._specials, key=len,
                                                                                       reverse=True)) + ")")
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: dict[str, tuple[str, ...]] = {}

    # ------------------------------------------------------------------ construction from files

    @classmethod
    def from_files(cls, vocab_file: str | os.PathLike[str], merges_file: str | os.PathLike[str],
                   **kwargs: Any) -> CLIPTokenizer:
        """From a ``vocab.json`` and a ``merges.txt`` (a first line starting with ``#version`` is a header);
        ``kwargs`` as the constructor."""
        vocab = _read_json(Path(vocab_file))
        return cls(vocab, _parse_merges(_read_text(Path(merges_file)), str(merges_file)), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, context_length: int | None = None,
                        cleaning: str = "clip", ftfy: bool | None = None) -> CLIPTokenizer:
        """The tokenizer of a checkpoint folder: ``vocab.json`` + ``merges.txt`` (as transformers'
        ``CLIPTokenizer``), else ``tokenizer.json`` (a BPE model). ``tokenizer_config.json`` and
        ``special_tokens_map.json``, when present, name the special tokens (``bos_token``, ``eos_token``,
        ``pad_token``; ``added_tokens_decoder`` gives ids missing from the vocabulary) and the context length
        (``model_max_length``, unless ``context_length`` is given; 77 otherwise).

        ``path`` may also be a Hugging Face hub id (``apple/aimv2-large-patch14-224-lit[@revision]``): its snapshot
        folder in huggingface_hub's cache, fetched when needed and allowed (:func:`aimv2.hub.resolve`).

        Raises FileNotFoundError when the folder has neither file set (or does not exist), TokenizerFilesError for
        unusable files, :class:`aimv2.hub.HubError` (a ValueError) when a hub id cannot be resolved.
        """
        folder = Path(path)
        if not folder.exists():
            from .hub import is_hub_id, resolve
            if is_hub_id(path):
                folder = resolve(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist or is not a folder")
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (folder / name).is_file():
                config.update({k: v for k, v in _read_json(folder / name).items() if v is not None})
        special_ids: dict[str, int] = {}
        added = config.get("added_tokens_decoder")
        if isinstance(added, dict):
            for i, entry in added.items():
                content = entry.get("content") if isinstance(entry, dict) else None
                if isinstance(content, str) and str(i).isdigit():
                    special_ids[content] = int(i)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            merges = _parse_merges(_read_text(folder / "merges.txt"), str(folder / "merges.txt"))
        elif (folder / "tokenizer.json").is_file():
            vocab, merges, more = _from_tokenizer_json(folder / "tokenizer.json")
            for k, v in more.items():
                special_ids.setdefault(k, v)
        else:
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} has neither vocab.json + merges.txt nor "
                                    f"tokenizer.json")
        bos, eos, pad = (_token_name(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        if context_length is None:
            limit = config.get("model_max_length")
            context_length = limit if isinstance(limit, int) and not isinstance(limit, bool) and \
                2 <= limit <= 1 << 16 else 77
        tok = cls(vocab, merges, bos_token=bos, eos_token=eos, context_length=context_length, cleaning=cleaning,
                  ftfy=ftfy, special_ids=special_ids)
        if pad is not None:
            if pad not in tok.encoder:
                raise TokenizerFilesError(f"{folder}: pad_token {pad!r} is not in the vocabulary")
            tok.pad_id = tok.encoder[pad]
        return tok

    # ------------------------------------------------------------------ the steps

    @property
    def vocab_size(self) -> int:
        """One more than the largest id."""
        return max(self.decoder) + 1

    def clean(self, text: str) -> str:
        """Step 1 (``cleaning="clip"``): ftfy / NFC, HTML unescaping, whitespace, ``str.lower``. With
        ``cleaning="transformers"``: NFC, whitespace runs to one space, each character lower-cased on its own (as
        the tokenizers library: a final capital sigma becomes σ, not ς), nothing stripped."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.cleaning == "transformers":  # tokenizers lower-cases character by character (no final sigma)
            return "".join(c.lower() for c in _WHITE_SPACE_RUN.sub(" ", unicodedata.normalize("NFC", text)))
        text = self._fix_text(text) if self._fix_text is not None else unicodedata.normalize("NFC", text)
        text = html.unescape(html.unescape(text)).strip()
        return _PY_WHITESPACE_RUN.sub(" ", text).strip().lower()

    def pre_tokenize(self, text: str) -> list[str]:
        """Step 2 on cleaned text: the pieces CLIP's pattern finds (whitespace between them dropped)."""
        return self._pattern.findall(text)

    def bpe(self, piece: str) -> tuple[str, ...]:
        """Step 3 for one piece: its BPE symbols (the last one ends in ``</w>``)."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        chars = [self._byte_encoder[b] for b in piece.encode("utf-8")]
        word = tuple(chars[:-1]) + (chars[-1] + "</w>",)
        ranks = self.bpe_ranks
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = word
        return word

    def _ids_of(self, cleaned: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pre_tokenize(cleaned):
            if self.cleaning == "clip" and piece in self._specials:
                ids.append(self.encoder[piece])
                continue
            for symbol in self.bpe(piece):
                i = self.encoder.get(symbol)
                if i is None:
                    raise ValueError(f"BPE symbol {symbol!r} (of {piece!r}) is not in the vocabulary: the tokenizer "
                                     f"files lack byte-level base symbols")
                ids.append(i)
        return ids

    def encode(self, text: str, *, add_special_tokens: bool = True, truncate: bool = True) -> list[int]:
        """The ids of ``text``: ``[BOS] + tokens + [EOS]`` (without them when ``add_special_tokens`` is False).
        ``truncate``: keep at most ``context_length`` ids, the last still EOS (else ValueError when too long)."""
        if self.cleaning == "transformers":  # special-token strings are matched in the raw text first
            ids: list[int] = []
            for k, part in enumerate(self._split_specials.split(text)):
                ids.extend([self.encoder[part]] if k % 2 else self._ids_of(self.clean(part)))
        else:
            ids = self._ids_of(self.clean(text))
        if not add_special_tokens:
            return ids
        room = self.context_length - 2
        if len(ids) > room:
            if not truncate:
                raise ValueError(f"text has {len(ids)} tokens, more than the {room} that fit the context length "
                                 f"{self.context_length} with BOS and EOS")
            ids = ids[:room]
        return [self.bos_id, *ids, self.eos_id]

    def __call__(self, texts: str | Sequence[str], *, pad_to: str = "context") -> torch.Tensor:
        """A batch: int64 ``(B, L)`` of :meth:`encode` (truncated) rows right-padded with ``pad_id``; ``L`` is
        ``context_length`` (``pad_to="context"``, CLIP's) or the longest row (``"longest"``). A single string
        gives ``B = 1``."""
        if isinstance(texts, str):
            texts = [texts]
        if pad_to not in ("context", "longest"):
            raise ValueError(f"pad_to must be 'context' or 'longest', got {pad_to!r}")
        rows = [self.encode(t) for t in texts]
        width = self.context_length if pad_to == "context" else max((len(r) for r in rows), default=2)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        for b, r in enumerate(rows):
            out[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids`` (special and padding ids dropped, words joined by one space, as CLIP's decode):
        the cleaned, lower-cased text, not the original."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        skip = {self.bos_id, self.eos_id, self.pad_id}
        text = "".join(self.decoder.get(int(i), "") for i in ids if int(i) not in skip)
        words = (bytes(self._byte_decoder[c] for c in part if c in self._byte_decoder).decode("utf-8", "replace")
                 for part in text.split("</w>"))
        return " ".join(w for w in words if w)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab {len(self.encoder)}, {len(self.bpe_ranks)} merges, bos={self.bos_token!r} "
                f"{self.bos_id}, eos={self.eos_token!r} {self.eos_id}, pad_id={self.pad_id}, "
                f"context_length={self.context_length}, cleaning={self.cleaning!r}, ftfy={self.ftfy})")


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------

def _read_text(file: Path) -> str:
    try:
        if file.stat().st_size > MAX_FILE_BYTES:
            raise TokenizerFilesError(f"{file} is larger than {MAX_FILE_BYTES >> 20} MiB: not a tokenizer file")
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerFilesError(f"cannot read {file}: {type(exc).__name__}: {exc}") from None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(_read_text(file))
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, TokenizerFilesError):
            raise
        raise TokenizerFilesError(f"cannot read {file}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise TokenizerFilesError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _parse_merges(text: str, source: str) -> list[tuple[str, str]]:
    lines = text.split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for n, line in enumerate(lines):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFilesError(f"{source}: line {n + 1} is not a merge of two symbols: {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _from_tokenizer_json(file: Path) -> tuple[dict, list[tuple[str, str]], dict[str, int]]:
    data = _read_json(file)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerFilesError(f"{file}: its model is not a BPE model with a vocab")
    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TokenizerFilesError(f"{file}: malformed merge {m!r}")
        merges.append((pair[0], pair[1]))
    added = {}
    for entry in data.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and isinstance(entry.get("id"), int):
            added[entry["content"]] = entry["id"]
    return model["vocab"], merges, added


def _token_name(value: object) -> str | None:
    """A tokenizer config's token entry: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
