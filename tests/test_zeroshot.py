"""The CLIP tokenizer (aimv2.clip_tokenizer) against transformers' CLIPTokenizer and OpenAI's algorithm, and the
aimv2-zeroshot command line on a tiny class folder with a tiny LiT checkpoint."""
import collections
import html
import json
import random
import re
import sys
import unicodedata

import pytest
import torch

from aimv2.clip_tokenizer import CLIPTokenizer, TokenizerFilesError, _pattern, bytes_to_unicode

CORPUS = """a photo of a cat. a photo of a dog. the quick brown fox jumps over the lazy dog. it's a photo of them.
a photo of the large golden retriever sitting on the grass. an origami of a tench. a blurry photo of a goldfish.
a black and white photo of the house. there is a photo of many birds flying over the ocean. we'll see.
café naïve résumé über straße ελληνικά οδος 東京タワーの写真 サッカー 123 456 ½ ² 🙂🙂 done"""

ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
            + list(" \t\n'.,!?-\"()[]{}<>|&;:/\\@#$%^*_+=~`") + list("éèêëàâäôöûüçñßÉÀÖÜ")
            + list("αβγδεζηθικλμνξοπρσςτυφχψωΑΒΓΔΣΟ") + list("東京タワーの写真サッカー日本語")
            + ["🙂", "👍🏽", "\u0301", "\u0345", "\u0308", "ﬁ", "Ａ", "ｆ", "½", "²", "Ⅻ", "٣", "\xa0", "\u3000",
               "\x1c", "\u200b", "\ufeff", "İ", "ſ", "\u212a", "’", "“", "&amp;", "&lt;", "'s", "'T", "'LL",
               "<|endoftext|>", "<|startoftext|>", "the", "photo", " of a ", "cat", "dog"])

CURATED = ["the cat", "a photo of a dog.", "  The  CAT's   pho-to!!  ", "naïve café 123 ½ ²", "日本語のテキスト",
           "e\u0301", "tab\tnew\nline", "don'T we'LL", "ΟΔΟΣ", "İstanbul", "", "   ", "a" * 200,
           "<|endoftext|> x", "emoji 🙂👍🏽 ok", "ﬁne Ａｂｃ", "x'ſ", "1234567890", "golden_retriever"]


def learn_merges(corpus: str, n: int) -> list[tuple[str, str]]:
    """A tiny BPE learner (most frequent pair first) over CLIP-style byte-level words."""
    b2u = bytes_to_unicode()
    words = collections.Counter(re.findall(r"[^\W\d_]+|\d|[^\s\w]+", corpus.lower()))
    seqs = {}
    for w in words:
        s = [b2u[b] for b in w.encode()]
        s[-1] += "</w>"
        seqs[w] = s
    merges = []
    for _ in range(n):
        pairs = collections.Counter()
        for w, s in seqs.items():
            for p in zip(s, s[1:]):
                pairs[p] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i < len(s) - 1 and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def write_tokenizer(folder, merges_n: int = 120, specials=("<|startoftext|>", "<|endoftext|>"), config=None):
    """vocab.json (256 byte symbols, the same with </w>, the merges, the two specials) + merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(CORPUS, merges_n)
    b2u = bytes_to_unicode()
    vocab = list(b2u.values()) + [v + "</w>" for v in b2u.values()] + ["".join(m) for m in merges] + list(specials)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def fuzz(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return folder


def test_matches_transformers_clip_tokenizer(tok_dir):
    transformers = pytest.importorskip("transformers")
    # transformers 5's CLIPTokenizer(vocab_file, merges_file) ignores file paths (it takes vocab / merges
    # objects); from_pretrained(folder) reads vocab.json + merges.txt.
    hf = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    ours = CLIPTokenizer.from_pretrained(tok_dir, cleaning="transformers", context_length=1 << 16)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    texts = CURATED + fuzz(1500, seed=0)
    mismatches = [(t, hf(t)["input_ids"], ours.encode(t)) for t in texts]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert not mismatches, mismatches[:3]
    # batches: truncation keeps EOS, padding with the pad id, exactly as transformers
    short = CLIPTokenizer.from_pretrained(tok_dir, cleaning="transformers", context_length=16)
    batch = ["a photo of a cat", "a", "a photo of the large golden retriever sitting on the grass, twice over " * 2]
    ref = hf(batch, padding="max_length", max_length=16, truncation=True)["input_ids"]
    assert short(batch).tolist() == ref
    assert short(batch, pad_to="longest").tolist() == hf(batch, padding=True, max_length=16,
                                                         truncation=True)["input_ids"]


def _openai_reference(folder):
    """OpenAI CLIP's SimpleTokenizer (ftfy, html, Python's re whitespace, the regex package's pattern, its BPE
    loop), over our tiny files."""
    regex = pytest.importorskip("regex")
    ftfy = pytest.importorskip("ftfy")
    pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                        r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    enc = json.loads((folder / "vocab.json").read_text())
    lines = (folder / "merges.txt").read_text().split("\n")[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(lines) if line}
    b2u = bytes_to_unicode()

    def bpe(token):
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return token
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = set(zip(word, word[1:]))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram
            new, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new.extend(word[i:j])
                    i = j
                except ValueError:
                    new.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:]))
        return " ".join(word)

    def encode(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids = [enc["<|startoftext|>"]]
        for piece in regex.findall(pat, text):
            piece = "".join(b2u[b] for b in piece.encode("utf-8"))
            ids.extend(enc[t] for t in bpe(piece).split(" "))
        return ids + [enc["<|endoftext|>"]]
    return encode


def test_matches_openai_clip(tok_dir):
    ref = _openai_reference(tok_dir)
    ours = CLIPTokenizer.from_pretrained(tok_dir, cleaning="clip", ftfy=True, context_length=1 << 16)
    texts = CURATED + ["&amp; “curly” quotes", "\x1cfs", "a\u0345b"] + fuzz(1500, seed=1)
    mismatches = [(t, ref(t), ours.encode(t)) for t in texts]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert not mismatches, mismatches[:3]
    # where the two cleanings differ (by design): HTML entities, curly quotes (ftfy), U+001C, U+0345, final sigma
    hf_like = CLIPTokenizer.from_pretrained(tok_dir, cleaning="transformers")
    for text in ["&amp;", "“x”", "\x1c", "a\u0345b", "ΟΔΟΣ"]:
        assert ours.encode(text) != hf_like.encode(text), text


def test_letter_and_number_classes_match_the_regex_package():
    """The stdlib classes equal CLIP's \\p{L}, \\p{N} and [^\\s\\p{L}\\p{N}] (regex package, IGNORECASE) on every
    code point Python's unicodedata has assigned (sampled: all below U+3400, every 7th above); unassigned ones
    (newer Unicode) may differ."""
    regex = pytest.importorskip("regex")
    pat = _pattern([], clip=True)
    ref = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    bad = []
    for cp in list(range(0x3400)) + list(range(0x3400, sys.maxunicode + 1, 7)):
        c = chr(cp)
        if unicodedata.category(c) == "Cn":
            continue
        for text in (c, "a" + c, c + "1"):
            if pat.findall(text) != ref.findall(text):
                bad.append(hex(cp))
                break
    assert not bad, bad[:10]


def test_released_tokenizer_conventions(tmp_path):
    """The released LiT's tokenizer_config: open_clip's special tokens, pad = <end_of_text>, model_max_length 77."""
    config = {"added_tokens_decoder": {"700": {"content": "<start_of_text>"}, "701": {"content": "<end_of_text>"}},
              "bos_token": "<start_of_text>", "eos_token": "<end_of_text>", "pad_token": "<end_of_text>",
              "unk_token": "<end_of_text>", "model_max_length": 9, "tokenizer_class": "CLIPTokenizer"}
    n = write_tokenizer(tmp_path, specials=(), config=config)
    assert n < 700
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.context_length) == (700, 701, 701, 9)
    ids = tok(["a photo of a cat", "the quick brown fox jumps over the lazy dog"])
    assert ids.shape == (2, 9) and ids[:, 0].tolist() == [700, 700]
    assert ids[1, -1] == 701  # truncated, EOS kept
    first_eos = (ids == 701).int().argmax(1)
    assert (ids[0, first_eos[0]:] == 701).all()  # padded with EOS after the first one
    assert tok.decode(ids[0]) == "a photo of a cat"
    assert tok.encode("x <end_of_text> y")[2] == 701  # the special string is its id (CLIP's pattern)


def test_tokenizer_json_and_errors(tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    hf.save_pretrained(str(tmp_path / "saved"))
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "saved" / f).unlink(missing_ok=True)
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    ours = CLIPTokenizer.from_pretrained(tmp_path / "saved", cleaning="transformers")
    ref = CLIPTokenizer.from_pretrained(tok_dir, cleaning="transformers")
    for text in CURATED:
        assert ours.encode(text) == ref.encode(text)
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_pretrained(tmp_path)
    import aimv2.hub
    with pytest.MonkeyPatch.context() as mp:  # a hub id goes through aimv2.hub.resolve
        mp.setattr(aimv2.hub, "resolve", lambda s, **kw: tok_dir)
        assert CLIPTokenizer.from_pretrained("apple/aimv2-large-patch14-224-lit").encode("a cat") == \
            CLIPTokenizer.from_pretrained(tok_dir).encode("a cat")
    bad = tmp_path / "bad"
    write_tokenizer(bad)
    (bad / "merges.txt").write_text("#version: 0.2\nzz qq\n")
    with pytest.raises(TokenizerFilesError, match="not in the vocabulary"):
        CLIPTokenizer.from_pretrained(bad)


# ---------------------------------------------------------------------------------------------------------
# aimv2-zeroshot
# ---------------------------------------------------------------------------------------------------------

CLASSES = ["cat", "dog", "golden_retriever", "tench", "fox"]
IMAGE = 28


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("lit_model")
    vocab_size = write_tokenizer(folder)
    cfg = transformers.Aimv2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE, patch_size=14, use_head=True),
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=20, eos_token_id=vocab_size - 1),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.Aimv2Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "cls_token" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("zs_data")
    rng = torch.Generator().manual_seed(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir()
        for j in range(2):
            arr = (torch.rand(30 + 3 * j, 40 - 2 * k, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / name / f"{j}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def run_cli(*argv):
    from aimv2.zeroshot_cli import main
    return main([str(a) for a in argv])


def by_hand(model_dir, data_dir, templates, names):
    """The zero-shot predictions computed without the CLI: CLIP's protocol written out."""
    from aimv2.data import ClassFolder
    from aimv2.lit import AIMv2LiT
    from aimv2.processor import AIMv2ImageProcessor
    model = AIMv2LiT.from_pretrained(model_dir)
    tok = CLIPTokenizer.from_pretrained(model_dir, context_length=model.cfg.text.context_length)
    proc = AIMv2ImageProcessor.from_preset("released", IMAGE)
    with torch.no_grad():
        weights = []
        for name in names:
            e = model.encode_text(tok([t.replace("{}", name) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            weights.append(m / m.norm())
        weights = torch.stack(weights)
        folder = ClassFolder(data_dir)
        images, labels = [], []
        for i in range(len(folder)):
            if folder.key(i).endswith("broken.jpg"):
                continue
            images.append(proc(folder.raw(i).image))
            labels.append(folder.label_of(i))
        img = model.encode_image(torch.cat(images))
        img = img / img.norm(dim=-1, keepdim=True)
        logits = img @ weights.t()
    labels = torch.tensor(labels)
    top5 = logits.topk(5, dim=1).indices
    return int((top5[:, 0] == labels).sum()), int((top5 == labels[:, None]).any(1).sum()), len(labels)


def test_cli_reports_the_accuracy_computed_by_hand(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "res" / "zs.json"
    templates = ["a photo of a {}.", "itap of the {}!"]
    rc = run_cli("--model", model_dir, "--data", data_dir, "--templates", *templates, "--batch-size", 3,
                 "--device", "cpu", "--out", out, "--no-progress")
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" in printed and "1 unreadable image skipped" in printed
    report = json.loads(out.read_text())
    c1, c5, n = by_hand(model_dir, data_dir, templates, [c.replace("_", " ") for c in sorted(CLASSES)])
    assert (report["num_images"], report["skipped"], report["num_classes"]) == (n, 1, 5) == (10, 1, 5)
    assert (report["correct_top1"], report["correct_top5"]) == (c1, c5)
    assert report["top1"] == pytest.approx(c1 / n) and report["top5"] == pytest.approx(c5 / n) == 1.0
    assert report["class_names"][3] == "golden retriever" and report["templates"] == templates
    assert set(report["per_class_top1"]) == set(CLASSES)


def test_cli_class_names_and_files(model_dir, data_dir, tmp_path, capsys):
    names = ["a cat", "a dog", "a fox", "a big dog", "a fish"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\n\nart of {}.\n")
    out = tmp_path / "zs.json"
    assert run_cli("--model", model_dir, "--data", data_dir, "--classes-file", tmp_path / "classes.txt",
                   "--templates-file", tmp_path / "templates.txt", "--out", out, "--no-progress") == 0
    report = json.loads(out.read_text())
    c1, c5, n = by_hand(model_dir, data_dir, ["a photo of {}.", "art of {}."], names)
    assert report["correct_top1"] == c1 and report["class_names"] == names
    capsys.readouterr()
    # fewer than 5 classes: no top-5
    sub = tmp_path / "sub"
    for c in ("cat", "fox"):
        (sub / c).mkdir(parents=True)
        for f in (data_dir / c).iterdir():
            (sub / c / f.name).write_bytes(f.read_bytes())
    assert run_cli("--model", model_dir, "--data", sub, "--classes", "cat,fox", "--out", out, "--no-progress") == 0
    assert json.loads(out.read_text())["top5"] is None
    assert "top-5" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--bogus"], "unrecognized arguments"),
    (["--templates", "no placeholder"], "has no {}"),
    (["--classes", "a,b"], "2 names for the 5 class subfolders"),
    (["--classes", "a,b", "--classes-file", "x"], "not allowed with"),
    (["--backend", "nope"], "--backend"),
    (["--device", "tpu"], "--device"),
    (["--templates-file", "/nonexistent/t.txt"], "--templates-file"),
])
def test_cli_usage_errors_exit_2_with_one_line(model_dir, data_dir, capsys, argv, needle):
    assert run_cli("--model", model_dir, "--data", data_dir, "--no-progress", *argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aimv2-zeroshot: error:") and needle in lines[0], captured.err
    assert captured.out == ""


def test_cli_missing_paths_and_operational_errors(model_dir, data_dir, tmp_path, capsys):
    assert run_cli("--model", tmp_path / "nope", "--data", data_dir) == 2
    assert "--model" in capsys.readouterr().err
    assert run_cli("--model", model_dir, "--data", tmp_path / "nope") == 2
    assert "--data" in capsys.readouterr().err
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((model_dir / f).read_bytes())
    assert run_cli("--model", no_tok, "--data", data_dir, "--no-progress") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer" in err[0] and "--tokenizer" in err[0]
    assert run_cli("--model", no_tok, "--tokenizer", model_dir, "--data", data_dir, "--no-progress") == 0
    capsys.readouterr()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"garbage")
    assert run_cli("--model", tmp_path / "corrupt", "--data", data_dir) == 1
    assert "cannot read" in capsys.readouterr().err
    broken = tmp_path / "all_broken" / "a"
    broken.mkdir(parents=True)
    (broken / "x.jpg").write_bytes(b"nope")
    assert run_cli("--model", model_dir, "--data", tmp_path / "all_broken", "--no-progress") == 1
    assert "could be read" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's CPU rms_norm under bf16
def test_cli_workers_dtype_and_hub_id(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    base, par, hub = (tmp_path / f"{n}.json" for n in ("base", "par", "hub"))
    assert run_cli("--model", model_dir, "--data", data_dir, "--out", base, "--no-progress") == 0
    assert run_cli("--model", model_dir, "--data", data_dir, "--out", par, "--no-progress", "--workers", 2,
                   "--batch-size", 4) == 0
    a, b = json.loads(base.read_text()), json.loads(par.read_text())
    assert (a["correct_top1"], a["skipped"]) == (b["correct_top1"], b["skipped"]) and b["workers"] == 2
    assert run_cli("--model", model_dir, "--data", data_dir, "--no-progress", "--dtype", "bf16") == 0
    import aimv2.hub
    seen = []
    monkeypatch.setattr(aimv2.hub, "resolve", lambda s, **kw: seen.append(s) or model_dir)
    assert run_cli("--model", "apple/aimv2-large-patch14-224-lit", "--data", data_dir, "--out", hub,
                   "--no-progress") == 0
    assert seen == ["apple/aimv2-large-patch14-224-lit"]
    assert json.loads(hub.read_text())["correct_top1"] == a["correct_top1"]
    capsys.readouterr()
    assert run_cli("--help") == 0
    assert "aimv2-zeroshot" in capsys.readouterr().out
