"""bench/loader_throughput.py (its --quick run) and the reduced-size JPEG decode ("draft") it measures: the same
crop geometry and random stream as the full decode, a close result, never below the output size, a no-op for
PNG, and an off switch (``draft=False`` / ``AIMV2_JPEG_DRAFT=0``) that gives the old path's output bit for bit,
in the transforms and in the loader."""
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aimv2.data import (
    JPEG_DRAFT_ENV,
    BadSample,
    EvalTransform,
    LazyImage,
    TrainLoader,
    TrainTransform,
    decode_image,
    draft_reduction,
    open_image,
    open_source,
)
from aimv2.data import loader as loader_mod
from aimv2.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("loader_throughput", ROOT / "bench" / "loader_throughput.py")
lt = importlib.util.module_from_spec(SPEC)
sys.modules["loader_throughput"] = lt
SPEC.loader.exec_module(lt)

# The bound on the mean |draft - full decode| of one 224 px sample, in [0, 1] pixel units. Where it comes from:
# bench/loader_throughput.py's draft section on its 200 generated ImageNet-like JPEGs measured a mean of 0.006
# over the drafted samples and 0.017 for the worst one (bench/results/loader_throughput-cpu-*.json), and the
# images below give at most 0.014; 0.03 leaves about 2x. A wrong crop geometry gives 0.05-0.2 (checked below).
MEAN_ABS_BOUND = 0.03

_CACHE: dict = {}


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    key = (w, h, seed)
    if key not in _CACHE:
        buf = io.BytesIO()
        lt.synthetic_photo(w, h, np.random.default_rng(seed)).save(buf, "JPEG", quality=90)
        _CACHE[key] = buf.getvalue()
    return _CACHE[key]


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    lt.synthetic_photo(w, h, np.random.default_rng(5)).save(buf, "PNG")
    return buf.getvalue()


def _spy(monkeypatch):
    """Record every crop box TrainTransform draws (the size it draws for, the box) and every LazyImage decode
    (the reduction asked for, the decoded size, the reduction applied)."""
    boxes, decodes = [], []
    crop_box, decode = TrainTransform.crop_box, LazyImage.decode

    def spy_box(self, width, height, rng):
        box = crop_box(self, width, height, rng)
        boxes.append(((width, height), box))
        return box

    def spy_decode(self, reduce=1):
        img, applied = decode(self, reduce)
        decodes.append((reduce, img.size, applied))
        return img, applied

    monkeypatch.setattr(TrainTransform, "crop_box", spy_box)
    monkeypatch.setattr(LazyImage, "decode", spy_decode)
    return boxes, decodes


def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    assert lt.main(["--quick", "--out", str(tmp_path)]) == 0
    (js,), (md,) = tmp_path.glob("loader_throughput-cpu-*.json"), tmp_path.glob("loader_throughput-cpu-*.md")
    info = json.loads(js.read_text())
    assert js.stem == md.stem == f"loader_throughput-cpu-{info['environment']['date']}"
    assert info["environment"]["device_name"] and info["environment"]["torch"] and info["quick"] is True
    assert info["images"]["count"] == lt.QUICK["n"] and info["image_size"] == 224
    for stage, names in (("decode", ("before", "after")), ("full", ("before", "copies only", "after")),
                         ("worker", ("before", "copies only", "after"))):
        for name in names:
            r = info["results"][stage][name]
            assert r["images_per_cpu_s"] > 0 and r["images_per_wall_s"] > 0, (stage, name)
    assert info["by_long_side"] and all(r["full/after"]["images_per_cpu_s"] > 0 for r in info["by_long_side"].values())
    assert info["legacy_matches_draft_off"] is True  # the "before" baseline computes what the old path did
    d = info["draft"]
    assert d["same_random_stream"] is True and d["train"]["samples"] == lt.QUICK["n"]
    assert d["train"]["drafted_samples"] >= 1 and d["train"]["drafted"]["mean_abs"] < MEAN_ABS_BOUND
    est = info["h200"]
    assert est["preset"] == "aimv2-large-patch14-224" and est["mfu"] == 0.4 and est["peak_tflops"] == 989
    assert est["gpu_images_per_s"] == pytest.approx(989e12 * 0.4 / est["flops_per_image"])
    assert set(est["workers"]) >= {"worker before", "worker after"} and all(n >= 1 for n in est["workers"].values())
    text = md.read_text()
    assert "| worker | after |" in text and "**Estimate**" in text and "MFU" in text


@pytest.mark.parametrize("size", [(1600, 1200), (1200, 900), (900, 1400), (700, 500)])
def test_draft_has_the_full_decodes_geometry_and_stream_and_is_close(monkeypatch, size):
    data = _jpeg(*size)
    boxes, decodes = _spy(monkeypatch)
    on, off = TrainTransform(224, draft=True), TrainTransform(224, draft=False)
    drafted = 0
    for seed in range(8):
        a_rng, b_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        a = on(open_image(data), a_rng)
        b = off(decode_image(data), b_rng)
        (a_size, a_box), (b_size, b_box) = boxes[-2:]
        assert a_size == b_size == size and a_box == b_box  # drawn from the header's full size: the same crop
        assert a_rng.random() == b_rng.random()  # and the same draws (the flip too)
        reduce, decoded, applied = decodes[-1]
        top, left, ch, cw = a_box
        assert reduce == applied == draft_reduction(cw, ch, 224, 224)
        assert decoded == (-(-size[0] // applied), -(-size[1] // applied))  # ceil(W / r) x ceil(H / r)
        assert cw / applied >= 224 and ch / applied >= 224  # the crop still holds the output: never enlarged
        drafted += applied > 1
        diff = (a - b).abs().mean().item()
        assert diff < MEAN_ABS_BOUND if applied > 1 else diff == 0.0
        other = off(decode_image(data), np.random.default_rng(seed + 100))  # another crop is far off
        assert (a - other).abs().mean().item() > 2 * MEAN_ABS_BOUND
    assert drafted >= (1 if size == (700, 500) else 8)


def test_draft_reduction_never_goes_below_the_output():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        (cw, ch), out = (int(x) for x in rng.integers(1, 3000, 2)), int(rng.integers(16, 300))
        r = draft_reduction(cw, ch, out, out)
        assert r in (1, 2, 4, 8)
        assert r == 1 or (cw >= r * out and ch >= r * out)
        assert r == 8 or not (cw >= 2 * r * out and ch >= 2 * r * out)  # the largest one
    assert draft_reduction(447, 10_000, 224, 224) == 1 and draft_reduction(448, 448, 224, 224) == 2
    assert draft_reduction(5000, 5000, 224, 224) == 8 and draft_reduction(900, 1000, 224, 250) == 4
    for bad in ({"width": 0}, {"out_height": -1}):
        args = {"width": 500, "height": 500, "out_width": 224, "out_height": 224, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            draft_reduction(**args)
    with pytest.raises(TypeError, match="width"):
        draft_reduction(500.0, 500, 224, 224)


def test_draft_is_a_no_op_for_png():
    data = _png(1200, 900)
    lazy = open_image(data)
    assert lazy.format == "PNG" and not lazy.reducible and lazy.size == (1200, 900)
    img, applied = open_image(data).decode(4)
    assert applied == 1 and img.size == (1200, 900) and img.mode == "RGB"
    for seed in range(3):
        a = TrainTransform(224, draft=True)(open_image(data), np.random.default_rng(seed))
        b = TrainTransform(224, draft=False)(decode_image(data), np.random.default_rng(seed))
        assert torch.equal(a, b)
    assert torch.equal(EvalTransform(224, draft=True)(open_image(data)), EvalTransform(224)(decode_image(data)))


def test_off_switch_is_bit_identical_to_the_old_path(monkeypatch):
    """draft=False (or AIMV2_JPEG_DRAFT=0 for the default) on a LazyImage: the transform of the full decode."""
    for size in ((1600, 1200), (700, 500)):
        data = _jpeg(*size)
        for seed in range(3):
            old = TrainTransform(224)(decode_image(data), np.random.default_rng(seed))  # a decoded image: as before
            new = TrainTransform(224, draft=False)(open_image(data), np.random.default_rng(seed))
            assert torch.equal(old, new)
        assert torch.equal(EvalTransform(224, draft=False)(open_image(data)), EvalTransform(224)(decode_image(data)))
        close = EvalTransform(224, draft=True)(open_image(data)) - EvalTransform(224)(decode_image(data))
        assert close.abs().mean().item() < MEAN_ABS_BOUND
    monkeypatch.setenv(JPEG_DRAFT_ENV, "0")
    assert TrainTransform().draft is False and EvalTransform().draft is False
    assert TrainTransform(draft=True).draft is True
    data = _jpeg(1600, 1200)
    assert torch.equal(TrainTransform(224)(open_image(data), np.random.default_rng(1)),
                       TrainTransform(224)(decode_image(data), np.random.default_rng(1)))
    monkeypatch.setenv(JPEG_DRAFT_ENV, "1")
    assert TrainTransform().draft is True and "draft=True" in repr(TrainTransform())
    monkeypatch.setenv(JPEG_DRAFT_ENV, "maybe")
    with pytest.raises(ValueError, match=JPEG_DRAFT_ENV):
        TrainTransform()
    monkeypatch.delenv(JPEG_DRAFT_ENV)
    assert TrainTransform().draft is True  # on by default
    with pytest.raises(TypeError, match="draft"):
        TrainTransform(draft="no")
    with pytest.raises(TypeError, match="draft"):
        EvalTransform(draft=1)


def test_lazy_image_arguments_and_corrupt_data():
    data = _jpeg(700, 500)
    lazy = open_image(data)
    assert (lazy.width, lazy.height, lazy.format) == (700, 500, "JPEG") and "700x500" in repr(lazy)
    with pytest.raises(ValueError, match="reduce"):
        lazy.decode(3)
    with pytest.raises(TypeError, match="reduce"):
        lazy.decode(2.0)
    with pytest.raises(TypeError, match="data"):
        open_image("not bytes")
    with pytest.raises(BadSample, match="empty"):
        open_image(b"")
    truncated = open_image(data[: len(data) // 3])  # the header is fine; the pixels are not
    with pytest.raises(BadSample, match="cannot decode"):
        truncated.decode(1)
    # decoded twice (the second re-reads the header), at two reductions
    assert lazy.decode(2)[0].size == (350, 250) and lazy.decode(1)[0].size == (700, 500)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """JPEGs of several sizes (one with a shorter side over 820 px, which the old path already decoded at half
    size), a PNG and a truncated JPEG, each with a caption."""
    root = tmp_path_factory.mktemp("images")
    sizes = [(500, 375), (375, 500), (1200, 900), (1700, 1000), (900, 1400), (640, 480), (300, 200), (500, 333)]
    for i, (w, h) in enumerate(sizes):
        (root / f"{i}.jpg").write_bytes(_jpeg(w, h, i))
        (root / f"{i}.txt").write_text(f"image {i}")
    (root / "8.png").write_bytes(_png(800, 600))
    (root / "8.txt").write_text("a png")
    (root / "9.jpg").write_bytes(_jpeg(1000, 800, 9)[:3000])
    (root / "9.txt").write_text("truncated")
    return root


def _batches(loader, k=3):
    return [next(loader) for _ in range(k)]


def test_loader_with_draft_is_seeded_resumable_and_the_same_in_workers(folder):
    src = open_source(str(folder))
    tok = ByteTokenizer(context_length=16)

    def make(**kw):
        return TrainLoader(src, tok, 4, image_size=224, seed=3, **kw)

    straight = _batches(make(), 5)
    again = _batches(make(), 5)
    for x, y in zip(straight, again):
        assert torch.equal(x.images, y.images) and torch.equal(x.prefix_lens, y.prefix_lens)
    assert any("9.jpg" in key and "cannot decode" in reason for b in straight for key, reason in b.skipped)
    resumed = make()
    _batches(resumed, 2)
    state = resumed.state_dict()
    fresh = make()
    fresh.load_state_dict(state)
    for x, y in zip(_batches(fresh, 3), straight[2:]):
        assert torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens) and x.state == y.state
    workers = make(num_workers=1)
    for x, y in zip(_batches(workers, 5), straight):
        assert torch.equal(x.images, y.images) and x.skipped == y.skipped
    workers.close()


def test_loader_with_draft_off_gives_the_old_batches(folder, monkeypatch):
    """The loader's batches with the draft off equal the old per-batch path's (the benchmark's LegacyBuilder, the
    builder before this change), bit for bit; with it on, only the drafted samples differ, and by little (but
    for the image with a shorter side over 820 px, whose crop the old path drew on its half-size decode)."""
    src = open_source(str(folder))
    tok = ByteTokenizer(context_length=16)
    monkeypatch.setenv(JPEG_DRAFT_ENV, "0")
    off = TrainLoader(src, tok, 4, image_size=224, seed=3)
    monkeypatch.delenv(JPEG_DRAFT_ENV)
    on = TrainLoader(src, tok, 4, image_size=224, seed=3)
    assert off.transform.draft is False and on.transform.draft is True
    legacy, b_off, b_on = lt.LegacyBuilder(on), loader_mod._BatchBuilder(off), loader_mod._BatchBuilder(on)
    state, drafted = on.state_dict(), 0
    for _ in range(3):
        plan = on._plan(state)
        state = plan.state
        old, new_off, new_on = legacy[plan], b_off[plan], b_on[plan]
        assert torch.equal(old.images, new_off.images) and torch.equal(old.tokens, new_off.tokens)
        assert torch.equal(old.prefix_lens, new_on.prefix_lens) and torch.equal(old.tokens, new_on.tokens)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)  # back to [0, 1] units
        for row in range(4):
            diff = ((new_on.images[row] - old.images[row]) * std).abs().mean().item()
            if not torch.equal(old.tokens[row], tok(["image 3"])[0]):  # not the 1700x1000 one
                drafted += diff > 0
                assert diff < MEAN_ABS_BOUND
    assert drafted >= 1
