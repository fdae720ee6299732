"""Tests of aimv2-tokenizer (aimv2.tokenizer_cli): captions read without images, training a SentencePiece model on
them with its sidecar, the trained model used with the same cleaning, and the command line's errors."""

import io
import json
import os
import sys
import tarfile
import types

import pytest
from PIL import Image

pytest.importorskip("sentencepiece")

import aimv2.data.sources as sources_module
from aimv2.data import (
    BadSample,
    ClassFolder,
    CSVSource,
    ImageFolderCaptions,
    JSONLSource,
    ShapesDataset,
    TarShards,
    open_source,
)
from aimv2.tokenizer import (
    SentencePieceTokenizer,
    TextCleaning,
    build_tokenizer,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from aimv2.tokenizer_cli import NoCaptionsError, VocabSizeError, caption_reader, main, train_tokenizer

# Captions of the bundled shapes, with some of the mess of web captions: case, runs of whitespace, HTML entities.
_SHAPES = ShapesDataset("train", size=300, image_size=28)
CAPTIONS = [c.upper().replace(" ", "  ").replace(" and ", " &amp; ") if i % 3 == 0 else c
            for i, c in enumerate(_SHAPES.caption(_SHAPES.scene(i)) for i in range(len(_SHAPES)))]


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (seed % 256, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """A JSONL file of the captions, naming images that do not exist: captions are read without them. Two bad
    lines: an empty caption and a line that is not JSON."""
    root = tmp_path_factory.mktemp("jsonl")
    lines = [json.dumps({"image": f"img/{i}.png", "caption": c}) for i, c in enumerate(CAPTIONS)]
    lines[5] = json.dumps({"image": "img/5.png", "caption": "   "})
    lines[7] = "{not json"
    path = root / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model(jsonl, tmp_path_factory):
    """A BPE model of 120 pieces trained on the JSONL captions with punctuation stripping."""
    out = tmp_path_factory.mktemp("tok") / "captions.model"
    path = train_tokenizer(jsonl, out, vocab_size=120, model_type="bpe",
                           cleaning=TextCleaning(strip_punctuation=True, ftfy=False))
    assert path == out
    return path


# ------------------------------------------------------------------------------------------ reading captions

def _sources(root):
    """One source of each kind over the same 6 samples (sample 2's image is corrupt, sample 4's caption empty)."""
    caps = ["a red circle.", "A BLUE square", "a green ring", "a cyan cross &amp; more", "  ", "last one"]
    images = [_png(i) for i in range(6)]
    images[2] = b"\x89PNG not really"
    folder = root / "folder"
    folder.mkdir()
    with tarfile.open(root / "shard-0.tar", "w") as tf:
        for i, (cap, img) in enumerate(zip(caps, images)):
            (folder / f"{i}.png").write_bytes(img)
            (folder / f"{i}.txt").write_text(cap)
            for name, data in ((f"{i:04d}.png", img), (f"{i:04d}.txt", cap.encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    rows = [{"image": f"folder/{i}.png", "caption": c} for i, c in enumerate(caps)]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "rows.csv").write_text("image,caption\n" + "".join(f"folder/{i}.png,{c}\n" for i, c in enumerate(caps)))
    classes = root / "classes"
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
        (classes / name / "a.png").write_bytes(_png())
    return [open_source(root / "shard-0.tar"), open_source(folder), open_source(root / "rows.jsonl"),
            open_source(root / "rows.csv"), open_source(classes), ShapesDataset("train", size=20, image_size=28)]


def test_caption_reader_matches_raw_without_decoding(tmp_path, monkeypatch):
    srcs = _sources(tmp_path)
    assert [type(s) for s in srcs] == [TarShards, ImageFolderCaptions, JSONLSource, CSVSource, ClassFolder,
                                       ShapesDataset]
    expected = {}
    for src in srcs:  # what raw(i) / src[i] says, images decoded
        for i in range(len(src)):
            try:
                expected[id(src), i] = src.raw(i).caption if hasattr(src, "raw") else src[i].caption
            except BadSample as exc:
                expected[id(src), i] = exc
    calls = []
    monkeypatch.setattr(sources_module, "decode_image", lambda *a, **k: calls.append(a))  # any decode is seen
    for src in srcs:
        read, decodes = caption_reader(src)
        assert decodes is False
        for i in range(len(src)):
            want = expected[id(src), i]
            if isinstance(want, BadSample) and "cannot decode image" in want.reason:
                assert read(i) == "a green ring"  # a corrupt image does not cost its caption
            elif isinstance(want, BadSample):
                with pytest.raises(BadSample) as info:
                    read(i)
                assert info.value.reason == want.reason and info.value.key == want.key
            else:
                assert read(i) == want
    assert calls == []

    class Plain:  # a source of another kind: read through raw(i), images decoded
        def __len__(self):
            return 1

        def raw(self, i):
            return types.SimpleNamespace(caption="plain")
    read, decodes = caption_reader(Plain())
    assert decodes is True and read(0) == "plain"
    with pytest.raises(TypeError, match="source"):
        caption_reader(3)


# ------------------------------------------------------------------------------------------------ training

def test_train_writes_model_and_sidecar(model, jsonl):
    info = read_sidecar(model)
    assert sidecar_path(model) == model.with_name("captions.model.json")
    assert info["format"] == "aimv2-tokenizer" and info["version"] == 1
    assert info["cleaning"] == {"lower": True, "strip_punctuation": True, "ftfy": False}
    assert (info["vocab_size"], info["eos_id"], info["pad_id"], info["unk_id"], info["bos_id"]) == (120, 1, 1, 2, None)
    assert info["source"] == str(jsonl) and info["model_type"] == "bpe"
    assert (info["captions"], info["skipped"]) == (len(CAPTIONS) - 2, 2)
    reasons = info["skipped_reasons"]
    assert len(reasons) == 2 and reasons.pop("empty caption") == 1 and "malformed JSON line" in next(iter(reasons))
    assert sorted(os.listdir(model.parent)) == ["captions.model", "captions.model.json"]  # no temporary left


def test_trained_model_cleans_as_at_training(model):
    tok = build_tokenizer(model, context_length=77)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.cleaning == TextCleaning(lower=True, strip_punctuation=True, ftfy=False)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (120, 1, 1)
    assert tok.sp.id_to_piece(0) == "<pad>" and tok.sp.id_to_piece(2) == "<unk>" and tok.sp.bos_id() == -1
    text = "a picture of a large red circle at the top left and a small blue square in the center."
    ids = tok.encode(text)
    assert ids[-1] == 1 and 1 not in ids[:-1] and 2 not in ids and 0 not in ids
    assert tok.decode(ids) == text.rstrip(".")  # the punctuation is stripped, as at training
    messy = "A  Picture OF a  RED ring &amp; A Blue Cross!"
    assert tok.encode(messy) == tok.encode("a picture of a red ring a blue cross")
    assert len(tok.encode(text)) < 40
    with pytest.warns(UserWarning, match=r"strip_punctuation=False overrides strip_punctuation=True"):
        cased = SentencePieceTokenizer(model, strip_punctuation=False)
    assert cased.cleaning.strip_punctuation is False


def test_training_options_and_errors(jsonl, tmp_path):
    out = tmp_path / "sub" / "t.model"
    path = train_tokenizer(jsonl, out, vocab_size=50, max_captions=50, seed=3, cleaning=TextCleaning(ftfy=False))
    info = read_sidecar(path)
    assert info["model_type"] == "unigram" and info["max_captions"] == 50 and info["seed"] == 3
    assert info["captions"] + info["skipped"] == 50
    with pytest.raises(FileExistsError, match="overwrite"):
        train_tokenizer(jsonl, out, vocab_size=50)
    first = path.read_bytes()
    train_tokenizer(jsonl, out, vocab_size=50, max_captions=50, seed=3, overwrite=True,
                    cleaning=TextCleaning(ftfy=False))
    assert path.read_bytes() == first  # seeded: the same subset, the same model
    with pytest.raises(VocabSizeError, match=r"vocab_size 5000 is too large.*at most \d+") as exc:
        train_tokenizer(jsonl, tmp_path / "big.model", vocab_size=5000, cleaning=TextCleaning(ftfy=False))
    assert exc.value.too_large and isinstance(exc.value, ValueError)
    with pytest.raises(VocabSizeError, match="too small"):
        train_tokenizer(jsonl, tmp_path / "small.model", vocab_size=8, cleaning=TextCleaning(ftfy=False))
    assert not (tmp_path / "big.model").exists() and not sidecar_path(tmp_path / "big.model").exists()
    with pytest.raises(ValueError, match="out must end in .model"):
        train_tokenizer(jsonl, tmp_path / "t.spm")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(jsonl, tmp_path / "x.model", vocab_size=2)
    with pytest.raises(TypeError, match="vocab_size"):
        train_tokenizer(jsonl, tmp_path / "x.model", vocab_size=100.0)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(jsonl, tmp_path / "x.model", model_type="word")
    with pytest.raises(ValueError, match="character_coverage"):
        train_tokenizer(jsonl, tmp_path / "x.model", character_coverage=0)
    with pytest.raises(TypeError, match="cleaning"):
        train_tokenizer(jsonl, tmp_path / "x.model", cleaning={"lower": True})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "  "}\n{"image": "b.png", "caption": "&#32;"}\n')
    with pytest.raises(NoCaptionsError, match=r"no usable caption.*2 samples skipped.*empty caption \(1\).*"
                                              r"empty after cleaning \(1\)"):
        train_tokenizer(bad, tmp_path / "none.model", vocab_size=20)


def test_sidecar_checks(model, tmp_path):
    copy = tmp_path / "m.model"
    copy.write_bytes(model.read_bytes())
    side = sidecar_path(copy)
    good = json.loads(sidecar_path(model).read_text())

    def load_with(text):
        side.write_text(text if isinstance(text, str) else json.dumps(text))
        return SentencePieceTokenizer(copy)

    def changed(drop=(), **fields):
        return {**{k: v for k, v in good.items() if k not in drop}, **fields}

    assert load_with(good).cleaning.strip_punctuation is True
    bad = [
        ("[1, 2]", "must hold a JSON object"),
        ("{not json", "not valid JSON"),
        ("[" * 5000 + "]" * 5000, "not valid JSON|must hold"),
        (changed(format="hf"), "not an aimv2 tokenizer sidecar"),
        (changed(version=2), "newer than this aimv2"),
        (changed(cleaning={**good["cleaning"], "nfkc": True}), "unknown option"),
        (changed(drop=["pad_id"]), "pad_id must be"),
        (changed(vocab_size="120"), "vocab_size must be"),
        (changed(source=3), "source must be str"),
        (changed(character_coverage=True), "character_coverage must be"),
        (changed(model_sha256="0" * 64), "describes another model"),
        (changed(drop=["model_sha256"], vocab_size=121), "says vocab_size 121"),
        (changed(drop=["model_sha256"], eos_id=2), "says eos_id 2"),
    ]
    for text, message in bad:
        with pytest.raises(ValueError, match=message) as info:
            load_with(text)
        assert "m.model.json" in str(info.value)
    side.write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(ValueError, match="over the 1048576-byte limit"):
        SentencePieceTokenizer(copy)
    side.unlink()
    side.mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        SentencePieceTokenizer(copy)
    side.rmdir()
    assert SentencePieceTokenizer(copy).sidecar is None  # no sidecar: the old cleaning
    path = write_sidecar(copy, TextCleaning(lower=False, ftfy=False), source="by hand")
    assert path == side and read_sidecar(copy)["source"] == "by hand"
    assert SentencePieceTokenizer(copy).cleaning == TextCleaning(lower=False, ftfy=False)
    with pytest.raises(ValueError, match="seed must be int"):
        write_sidecar(copy, TextCleaning(ftfy=False), seed="one")
    with pytest.raises(ValueError, match="computed from the model"):
        write_sidecar(copy, TextCleaning(ftfy=False), vocab_size=3)


def test_ftfy_recorded_and_required(jsonl, tmp_path, monkeypatch):
    fake = types.ModuleType("ftfy")
    fake.fix_text = lambda text: text.replace("Ã©", "é")
    monkeypatch.setitem(sys.modules, "ftfy", fake)
    out = train_tokenizer(jsonl, tmp_path / "f.model", vocab_size=80, model_type="bpe", max_captions=100)
    assert read_sidecar(out)["cleaning"]["ftfy"] is True  # the default: ftfy when installed
    assert build_tokenizer(out).cleaning.ftfy is True
    monkeypatch.setitem(sys.modules, "ftfy", None)  # ftfy not installed any more
    with pytest.raises(ImportError, match=r"f\.model was trained with ftfy text cleaning.*pip install ftfy"):
        build_tokenizer(out)
    with pytest.warns(UserWarning, match="ftfy=False overrides ftfy=True"):  # an explicit choice still works
        assert SentencePieceTokenizer(out, ftfy=False).cleaning.ftfy is False
    with pytest.raises(ImportError, match="pip install ftfy"):
        train_tokenizer(jsonl, tmp_path / "g.model", cleaning=TextCleaning(ftfy=True))
    out = train_tokenizer(jsonl, tmp_path / "h.model", vocab_size=80, model_type="bpe", max_captions=100)
    assert read_sidecar(out)["cleaning"]["ftfy"] is False and build_tokenizer(out).cleaning.ftfy is False


# ------------------------------------------------------------------------------------------ command line

def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["train", "--out", "x.model"], "the following arguments are required: --data"),
    (["train", "--data", "shapes", "--out", "x.model", "--vocab-size", "0"], "--vocab-size must be at least 4"),
    (["train", "--data", "shapes", "--out", "x.model", "--vocab-size", "many"], "argument --vocab-size"),
    (["train", "--data", "shapes", "--out", "x.spm"], "--out must end in .model"),
    (["train", "--data", "shapes", "--out", "x.model", "--max-captions", "0"], "--max-captions must be"),
    (["train", "--data", "shapes", "--out", "x.model", "--character-coverage", "1.5"], "--character-coverage"),
    (["train", "--data", "shapes", "--out", "x.model", "--model-type", "word"], "--model-type"),
    (["train", "--data", "/nonexistent/d.jsonl", "--out", "x.model"], "no such file or folder"),
])
def test_cli_usage_errors(argv, message, capsys):
    assert _exit_code(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("aimv2-tokenizer") and "error:" in line and message in line, line


def test_cli_train_and_errors(jsonl, tmp_path, capsys):
    out = tmp_path / "cli.model"
    args = ["train", "--data", str(jsonl), "--out", str(out), "--model-type", "bpe", "--no-progress", "--no-ftfy"]
    assert main(args + ["--vocab-size", "100"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(CAPTIONS) - 2} used, 2 skipped" in printed and "100 pieces" in printed and str(out) in printed
    assert build_tokenizer(out).vocab_size == 100
    assert main(args + ["--vocab-size", "100"]) == 2  # --out exists
    assert "--overwrite" in _error_line(capsys)
    assert main(args + ["--vocab-size", "5000", "--overwrite"]) == 2
    line = _error_line(capsys)
    assert "--vocab-size 5000 is too large" in line and "pass --vocab-size" in line and "more captions" in line
    assert build_tokenizer(out).vocab_size == 100  # a failed run leaves the old model as it was
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "e.model")]) == 2
    assert "contains no image" in _error_line(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": ""}\n')
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "b.model"), "--no-ftfy",
                 "--no-progress"]) == 1
    assert "no usable caption" in _error_line(capsys)


# ------------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_trained_tokenizer_trains_aimv2(tmp_path, capsys):
    from aimv2.train import TrainConfig, run

    model_path = tmp_path / "shapes.model"
    assert main(["train", "--data", "shapes", "--out", str(model_path), "--vocab-size", "200", "--model-type", "bpe",
                 "--max-captions", "3000", "--no-progress"]) == 0
    assert read_sidecar(model_path)["source"] == "shapes"
    summary = run(TrainConfig(preset="aimv2-tiny", tokenizer=str(model_path), steps=2, batch_size=4,
                              out=str(tmp_path / "run"), progress=False, log_every=1, ckpt_every=2, device="cpu"))
    assert summary["last"] is not None
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["tokenizer"] == str(model_path)
    assert config["model"]["decoder"]["pad_id"] == 1
