"""Tests of aimv2.tokenizer: byte and SentencePiece tokenizers, padding, truncation, errors, text cleaning."""

import sys
import types

import pytest
import torch

from aimv2.data import ShapesDataset
from aimv2.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    TextCleaning,
    Tokenizer,
    build_tokenizer,
    clean_text,
)

# ---------------------------------------------------------------------------------------------- bytes

def test_byte_round_trip_and_ids():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.context_length) == (259, 1, 1, 77)
    text = "a small red circle at the top left — café."
    ids = tok.encode(text)
    assert ids[-1] == 1 and all(i >= 3 for i in ids[:-1])
    assert ids[:-1] == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text


def test_byte_cleaning_and_lower_casing():
    tok = ByteTokenizer()
    assert tok.encode("  A  LARGE\tRed\n&amp; Circle ") == tok.encode("a large red & circle")
    assert tok.decode(tok.encode("Hello &lt;World&gt;")) == "hello <world>"
    cased = ByteTokenizer(lower=False)
    assert cased.decode(cased.encode(" Hello  World ")) == "Hello World"
    assert clean_text("X&amp;amp;Y", lower=False) == "X&Y"  # unescaped twice, as open_clip does


def test_byte_truncation_padding_and_batch():
    tok = ByteTokenizer(context_length=77)
    long_text = "x" * 200
    ids = tok.encode(long_text)
    assert len(ids) == 77 and ids[-1] == tok.eos_id and ids[:-1] == [ord("x") + 3] * 76
    out = tok(["ab", long_text, ""])
    assert out.dtype == torch.long and out.shape == (3, 77)
    assert out[0, :3].tolist() == [ord("a") + 3, ord("b") + 3, 1]
    assert (out[0, 3:] == 1).all()  # right padding with pad_id = 1
    assert out[1, -1].item() == 1 and (out[1, :-1] == ord("x") + 3).all()
    assert out[2].tolist() == [1] * 77  # empty text: EOS then padding
    assert tok.decode(out[0]) == "ab"
    assert tok(("ab",)).shape == (1, 77) and tok([]).shape == (0, 77)


def test_byte_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="text"):
        tok(["ok", 3])
    with pytest.raises(TypeError, match="texts"):
        tok("a bare string")
    with pytest.raises(ValueError, match="context_length"):
        ByteTokenizer(context_length=1)
    with pytest.raises(TypeError, match="context_length"):
        ByteTokenizer(context_length=7.0)
    with pytest.raises(ValueError, match="ids"):
        tok.decode([300])
    with pytest.raises(ValueError, match="ids"):
        tok.decode(torch.ones(2, 2, dtype=torch.long))


def test_build_tokenizer(tmp_path):
    assert isinstance(build_tokenizer("bytes", context_length=16), ByteTokenizer)
    assert build_tokenizer("bytes", context_length=16).context_length == 16
    with pytest.raises(ValueError, match="spec"):
        build_tokenizer("siglip")
    with pytest.raises(TypeError, match="spec"):
        build_tokenizer(3)
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer(str(missing))


def test_sentencepiece_missing_file(tmp_path):
    missing = tmp_path / "missing" / "spiece.model"
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        SentencePieceTokenizer(missing)


def test_sentencepiece_not_installed(tmp_path, monkeypatch):
    model = tmp_path / "spiece.model"
    model.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    with pytest.raises(ImportError, match=r"SentencePieceTokenizer needs 'sentencepiece'.*aimv2-kernels\[train\]"):
        SentencePieceTokenizer(model)


# ---------------------------------------------------------------------------------------- sentencepiece

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    ds = ShapesDataset("train", size=400, image_size=28)
    prefix = tmp_path_factory.mktemp("spm") / "shapes"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([ds[i].caption for i in range(len(ds))]),
        model_prefix=str(prefix), vocab_size=100, model_type="bpe", character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    return str(prefix) + ".model"


def test_sentencepiece_encode_decode(sp_model):
    tok = build_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.eos_id == 1 and tok.pad_id == 1  # SigLIP convention: pad defaults to EOS
    assert tok.vocab_size == tok.sp.get_piece_size() == 100
    text = "a picture of a large red circle at the top left and a small blue square in the center."
    ids = tok.encode(text)
    assert ids[-1] == 1 and 1 not in ids[:-1] and 0 not in ids
    assert tok.decode(ids) == text
    assert tok.encode("  A LARGE   Red CIRCLE ") == tok.encode("a large red circle")
    out = tok([text, "a red ring."])
    n = len(tok.encode("a red ring."))
    assert out.shape == (2, 77) and out.dtype == torch.long
    assert (out[1, n - 1:] == 1).all() and out[1, n - 2].item() != 1
    assert tok.decode(out[1]) == "a red ring."
    longest = ("an image showing a large purple triangle at the bottom right and a small yellow cross "
               "at the bottom left.")
    assert len(tok.encode(longest)) < 40  # a caption-trained model fits every caption in 77 tokens


def test_sentencepiece_options(sp_model):
    tok = SentencePieceTokenizer(sp_model, context_length=8, pad_id=0)
    ids = tok.encode("a large red circle at the top left and a small blue square in the center.")
    assert len(ids) == 8 and ids[-1] == 1
    out = tok(["a ring"])
    assert out.shape == (1, 8)
    assert out[0, len(tok.encode("a ring")):].eq(0).all()
    assert tok.decode(out[0]) == "a ring"
    cased = SentencePieceTokenizer(sp_model, lower=False)
    assert cased.encode("A") != cased.encode("a")
    nopunct = SentencePieceTokenizer(sp_model, strip_punctuation=True)
    assert nopunct.encode("a red, ring.") == nopunct.encode("a red ring")
    with pytest.raises(ValueError, match="pad_id"):
        SentencePieceTokenizer(sp_model, pad_id=10_000)
    with pytest.raises(ValueError, match="context_length"):
        SentencePieceTokenizer(sp_model, context_length=0)


def test_missing_train_extra_is_named(monkeypatch):
    """Each optional package of the application layer fails with one message naming the 'train' extra."""
    from aimv2._extras import require
    for name in ("tqdm", "tqdm.auto"):  # None in sys.modules makes the import fail, even of one already loaded
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"aimv2-train's progress bar needs 'tqdm'.*\[train\]"):
        require("tqdm.auto", "aimv2-train's progress bar")
    assert require("json", "anything").dumps([]) == "[]"


# ---------------------------------------------------------------------------------------------- cleaning

def _fake_ftfy(calls=None):
    """A stand-in ``ftfy`` module: ``fix_text`` repairs one mojibake and records what it was given."""
    mod = types.ModuleType("ftfy")

    def fix_text(text):
        if calls is not None:
            calls.append(text)
        return text.replace("Ã©", "é").replace("“", '"').replace("”", '"')

    mod.fix_text = fix_text
    return mod


def test_text_cleaning_steps():
    c = TextCleaning(ftfy=False)
    assert (c.lower, c.strip_punctuation, c.ftfy) == (True, False, False)
    assert c.apply("  A\tLARGE \n Red&nbsp;&amp;amp; Circle  ") == "a large red & circle"  # &nbsp; is whitespace
    assert c.apply("X&amp;amp;Y &lt;b&gt;") == "x&y <b>"  # unescaped twice, as open_clip does
    assert TextCleaning(lower=False, ftfy=False).apply(" Hello  World ") == "Hello World"
    punct = TextCleaning(strip_punctuation=True, ftfy=False)
    assert punct.apply("A red, ring. (small) &amp; x") == "a red ring small x"
    assert punct.apply(" ... ") == ""
    assert clean_text("A&amp;amp;B", lower=False) == "A&B" == TextCleaning(lower=False, ftfy=False).apply("A&amp;amp;B")
    assert clean_text("A, b!", strip_punctuation=True) == "a b"
    assert c.to_dict() == {"lower": True, "strip_punctuation": False, "ftfy": False}
    assert TextCleaning.from_dict(c.to_dict()) == c
    with pytest.raises(TypeError, match="lower"):
        TextCleaning(lower=1)
    with pytest.raises(TypeError, match="strip_punctuation"):
        TextCleaning(strip_punctuation="yes")
    with pytest.raises(TypeError, match="ftfy"):
        TextCleaning(ftfy=0)
    with pytest.raises(TypeError, match="text"):
        c.apply(b"bytes")
    with pytest.raises(ValueError, match=r"unknown option.*'nfkc'"):
        TextCleaning.from_dict({"lower": True, "strip_punctuation": False, "ftfy": False, "nfkc": True})
    with pytest.raises(ValueError, match="lacks"):
        TextCleaning.from_dict({"lower": True, "ftfy": False})
    with pytest.raises(ValueError, match=r"cleaning\.lower must be true or false"):
        TextCleaning.from_dict({"lower": 1, "strip_punctuation": False, "ftfy": False})


def test_text_cleaning_ftfy_first_and_auto(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "ftfy", _fake_ftfy(calls))
    on = TextCleaning(ftfy=True)
    assert on.apply("  CafÃ©  &amp;amp; “Bar” ") == 'café & "bar"'
    assert calls == ["  CafÃ©  &amp;amp; “Bar” "]  # ftfy saw the raw text: it runs first
    assert TextCleaning().ftfy is True  # None: decided when made, from whether ftfy imports
    assert TextCleaning(ftfy=False).apply("CafÃ©") == "cafã©"
    assert clean_text("CafÃ©") == "cafã©"  # clean_text keeps its old behaviour: no ftfy unless asked
    assert clean_text("CafÃ©", ftfy=None) == "café"
    monkeypatch.setitem(sys.modules, "ftfy", None)  # now `import ftfy` fails
    assert TextCleaning().ftfy is False
    with pytest.raises(ImportError, match="pip install ftfy"):
        on.apply("x")


def test_tokenizers_share_the_cleaning(sp_model):
    assert ByteTokenizer().cleaning == TextCleaning(lower=True, strip_punctuation=False, ftfy=False)
    tok = SentencePieceTokenizer(sp_model)  # no sidecar: the cleaning of before sidecars existed
    assert tok.sidecar is None and tok.cleaning == TextCleaning(ftfy=False)
    assert tok.lower is True and tok.strip_punctuation is False
    assert "cleaning=" in repr(tok)
    with pytest.raises(TypeError, match="lower"):
        SentencePieceTokenizer(sp_model, lower="no")
    with pytest.raises(TypeError, match="ftfy"):
        SentencePieceTokenizer(sp_model, ftfy=1)


def test_sentencepiece_ftfy_option(sp_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", _fake_ftfy())
    tok = SentencePieceTokenizer(sp_model, ftfy=True)
    assert tok.cleaning.ftfy and tok.encode("a “red” ring") == tok.encode('a "red" ring')
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(ImportError, match="ftfy=True needs 'ftfy'"):
        SentencePieceTokenizer(sp_model, ftfy=True)
