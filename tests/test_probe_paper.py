"""The paper's probe protocol: aimv2.data.randaugment (RandAugment rand-m9-mstd0.5-inc1, ColorJitter, the probe's
training augmentation) and ``aimv2-probe --protocol paper`` (aimv2.probe.run_paper_probes: augmented images every
epoch, a sweep of probes sharing one trunk forward per batch).

Everything runs on aimv2-tiny (56 px, 16 patches of width 64), a few dozen images, 1-2 epochs.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data.randaugment import (
    RAND_INCREASING_OPS,
    RAND_OPS,
    ColorJitter,
    ProbeTrainTransform,
    RandAugment,
    apply_op,
    fill_of,
    op_argument,
    parse_rand_augment,
    to_pil,
)
from aimv2.probe import (
    AugmentedImages,
    LabelledImages,
    PaperProbeSettings,
    heldout_shapes,
    paper_transform,
    random_encoder,
    run_paper_probe,
    run_paper_probes,
    run_probe,
)
from aimv2.probe_cli import main

W = 40  # side of the synthetic images (0.45 * 40 = 18: the translations at magnitude 10 are whole pixels)
FILL = np.array(fill_of())  # ImageNet's mean in 0-255: (124, 116, 104)
TINY = PaperProbeSettings(epochs=2, batch_size=12, lrs=(1e-3, 3e-3), weight_decays=(0.05, 0.1), warmup_epochs=0.5)
FAST = ["--random", "aimv2-tiny", "--protocol", "paper", "--train-size", "24", "--test-size", "12", "--epochs", "2",
        "--batch-size", "12", "--lrs", "1e-3,3e-3", "--wds", "0.05,0.1", "--warmup-epochs", "0.5", "--no-progress"]


def noise(seed=0, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, (W, W, 3)).astype(np.uint8)


def stripes(axis):
    """Each row (axis 0) or column (axis 1) one colour, all rows/columns different."""
    values = np.linspace(0, 255, W).astype(np.uint8)
    band = values[:, None] if axis == 0 else values[None, :]
    return np.repeat(np.broadcast_to(band, (W, W))[..., None], 3, axis=2).copy()


def op(arr, name, magnitude, negate=False):
    return np.asarray(apply_op(Image.fromarray(arr), name, magnitude, negate=negate)).astype(int)


# -- the op table -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, plus, minus", [
    ("AutoContrast", None, None), ("Equalize", None, None), ("Invert", None, None),
    ("Rotate", 27.0, -27.0), ("PosterizeIncreasing", 1, 1), ("SolarizeIncreasing", 26, 26), ("SolarizeAdd", 99, 99),
    ("ColorIncreasing", 1.81, 0.19), ("ContrastIncreasing", 1.81, 0.19), ("BrightnessIncreasing", 1.81, 0.19),
    ("SharpnessIncreasing", 1.81, 0.19), ("ShearX", 0.27, -0.27), ("ShearY", 0.27, -0.27),
    ("TranslateXRel", 0.405, -0.405), ("TranslateYRel", 0.405, -0.405),
    ("Posterize", 3, 3), ("Solarize", 230, 230), ("Color", 1.72, 1.72), ("Brightness", 1.72, 1.72),
])
def test_op_argument_at_magnitude_9(name, plus, minus):
    for negate, want in ((False, plus), (True, minus)):
        got = op_argument(name, 9.0, negate=negate)
        assert got == pytest.approx(want) if want is not None else got is None, (name, negate, got)


def test_op_sets_are_timms():
    assert len(RAND_INCREASING_OPS) == len(RAND_OPS) == 15
    assert op_argument("PosterizeIncreasing", 10.0) == 0 and op_argument("SolarizeIncreasing", 10.0) == 0
    assert op_argument("ColorIncreasing", 10.0, negate=True) == pytest.approx(0.1)  # kept >= 0.1
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        op_argument("Cutout", 9.0)
    with pytest.raises(ValueError, match="magnitude"):
        op_argument("Rotate", -1.0)


def test_point_ops_at_magnitude_9_match_their_formulas():
    x = noise()
    xi = x.astype(int)
    np.testing.assert_array_equal(op(x, "Invert", 9), 255 - xi)
    np.testing.assert_array_equal(op(x, "PosterizeIncreasing", 9), xi & 0x80)  # 1 bit kept
    np.testing.assert_array_equal(op(x, "Posterize", 9), xi & 0xE0)  # inc0: 3 bits kept
    np.testing.assert_array_equal(op(x, "SolarizeIncreasing", 9), np.where(xi >= 26, 255 - xi, xi))
    np.testing.assert_array_equal(op(x, "SolarizeAdd", 9), np.where(xi < 128, np.minimum(255, xi + 99), xi))
    assert np.abs(op(x, "BrightnessIncreasing", 9) - np.clip(xi * 1.81, 0, 255)).max() <= 1
    assert np.abs(op(x, "BrightnessIncreasing", 9, negate=True) - xi * 0.19).max() <= 1
    grey = np.asarray(Image.fromarray(x).convert("L")).astype(float)[..., None]
    assert np.abs(op(x, "ColorIncreasing", 9, negate=True) - (grey + 0.19 * (xi - grey))).max() <= 1
    mean = int(grey.mean() + 0.5)
    assert np.abs(op(x, "ContrastIncreasing", 9) - np.clip(mean + 1.81 * (xi - mean), 0, 255)).max() <= 1
    low = noise(1, 100, 111)  # low contrast: autocontrast and equalize stretch it to the full range
    for name in ("AutoContrast", "Equalize"):
        out = op(low, name, 9)
        assert out.min() <= 5 and out.max() >= 250, name
    edge = np.full((W, W, 3), 50, np.uint8)
    edge[:, W // 2:] = 200
    sharp = op(edge, "SharpnessIncreasing", 9)  # an overshoot on both sides of the edge
    assert sharp[5, W // 2 - 1, 0] < 50 and sharp[5, W // 2, 0] > 200
    np.testing.assert_array_equal(sharp[0], edge[0])  # PIL leaves the border pixels as they are
    np.testing.assert_array_equal(sharp[:, :W // 2 - 1], edge[:, :W // 2 - 1])  # flat areas unchanged


def test_geometric_ops_move_pixels_and_fill_with_the_mean():
    x = noise()
    out = op(x, "TranslateXRel", 10)  # 0.45 * 40 = 18 px: content moves left, the right is filled
    np.testing.assert_array_equal(out[:, :22], x[:, 18:])
    assert (out[:, 22:] == FILL).all()
    out = op(x, "TranslateYRel", 10, negate=True)  # down by 18 px, the top filled
    np.testing.assert_array_equal(out[18:], x[:22])
    assert (out[:18] == FILL).all()
    np.testing.assert_array_equal(op(x, "Rotate", 30), np.rot90(x, 1))  # 90 degrees, counter-clockwise
    np.testing.assert_array_equal(op(x, "Rotate", 30, negate=True), np.rot90(x, -1))
    rot = op(x, "Rotate", 9)  # 27 degrees: the corners are uncovered
    assert (rot[0, 0] == FILL).all() and (rot[-1, -1] == FILL).all()
    rows = stripes(0)  # ShearX moves pixels along their row: each row keeps its colour, bottom rows get fill
    for negate in (False, True):
        out = op(rows, "ShearX", 9, negate=negate)
        assert (out[:, W // 2] == rows[:, W // 2]).all()
        side = out[-1, 0] if negate else out[-1, -1]
        assert (side == FILL).all()
    cols = stripes(1)
    out = op(cols, "ShearY", 9)
    assert (out[W // 2] == cols[W // 2]).all() and (out[-1, -1] == FILL).all()


@pytest.mark.parametrize("name", [n for n in RAND_INCREASING_OPS if n not in
                                  ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing")])
def test_increasing_ops_at_magnitude_0_are_the_identity(name):
    x = noise()
    np.testing.assert_array_equal(op(x, name, 0.0), x)
    np.testing.assert_array_equal(op(x, name, 0.0, negate=True), x)


# -- RandAugment, ColorJitter, the transform ----------------------------------------------------------------

def test_parse_rand_augment():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == {"magnitude": 9.0, "magnitude_std": 0.5, "increasing": True}
    ra = RandAugment.from_config("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.num_ops, ra.prob, ra.magnitude_std, ra.magnitude_max, ra.ops) == \
        (9.0, 2, 0.5, 0.5, 10.0, RAND_INCREASING_OPS)
    ra = RandAugment.from_config("rand-m7-n3-p1-mstd101-mmax12")
    assert (ra.magnitude, ra.num_ops, ra.prob, ra.magnitude_std, ra.magnitude_max, ra.ops) == \
        (7.0, 3, 1.0, float("inf"), 12.0, RAND_OPS)
    for bad in ("augmix-m9", "rand-m9-tweights", "rand-q3", "rand-n2.5"):
        with pytest.raises(ValueError, match="RandAugment config"):
            parse_rand_augment(bad)


def test_magnitude_std_sampling():
    rng = np.random.default_rng(0)
    ra = RandAugment(magnitude=9, num_ops=1, prob=1.0, magnitude_std=0.5)
    m = np.array([ra.draw(rng)[0].magnitude for _ in range(4000)])
    assert abs(m.mean() - 9) < 0.03 and abs(m.std() - 0.5) < 0.03 and m.max() <= 10
    ra = RandAugment(magnitude=9.8, num_ops=1, prob=1.0, magnitude_std=0.5)  # clipped at 10: P(N(9.8, .5) > 10)
    m = np.array([ra.draw(rng)[0].magnitude for _ in range(4000)])
    assert m.max() == 10.0 and abs((m == 10.0).mean() - 0.345) < 0.04
    fixed = RandAugment(magnitude=9, num_ops=1, prob=1.0, magnitude_std=0)
    assert {fixed.draw(rng)[0].magnitude for _ in range(50)} == {9.0}
    uniform = RandAugment(magnitude=9, num_ops=1, prob=1.0, magnitude_std=101)
    m = np.array([uniform.draw(rng)[0].magnitude for _ in range(4000)])
    assert m.min() >= 0 and m.max() <= 9 and abs(m.mean() - 4.5) < 0.15


def test_op_choice_with_replacement_probability_and_sign():
    rng = np.random.default_rng(1)
    ra = RandAugment.from_config("rand-m9-mstd0.5-inc1")
    draws = [d for _ in range(3000) for d in ra.draw(rng)]
    assert len(draws) == 6000
    counts = {name: sum(d.name == name for d in draws) for name in ra.ops}
    assert min(counts.values()) > 300  # uniform over 15 ops: 400 each
    assert abs(np.mean([d.applied for d in draws]) - 0.5) < 0.03
    signed = [d.negate for d in draws if d.applied and d.name in ("Rotate", "ShearX", "TranslateYRel")]
    assert abs(np.mean(signed) - 0.5) < 0.06
    assert all(d.magnitude is None for d in draws if not d.applied)


def test_rand_augment_identity_and_determinism():
    img = Image.fromarray(noise())
    for ra in (RandAugment(prob=0.0), RandAugment(num_ops=0)):
        assert np.array_equal(np.asarray(ra(img, np.random.default_rng(0))), np.asarray(img))
    ra = RandAugment.from_config("rand-m9-mstd0.5-inc1")
    outs = [np.asarray(ra(img, np.random.default_rng(seed))) for seed in (5, 5, 6, 7, 8)]
    assert np.array_equal(outs[0], outs[1])
    assert sum(not np.array_equal(outs[0], o) for o in outs[2:]) >= 2


def test_color_jitter():
    cj = ColorJitter(0.3, 0.3, 0.3)
    order, factors = cj.draw(np.random.default_rng(3))
    assert sorted(order) == [0, 1, 2, 3] and factors[3] is None
    assert all(0.7 <= f <= 1.3 for f in factors[:3])
    from PIL import ImageEnhance

    img = Image.fromarray(noise())
    want = img
    for k in order:
        if k < 3:
            want = getattr(ImageEnhance, ("Brightness", "Contrast", "Color")[k])(want).enhance(factors[k])
    assert np.array_equal(np.asarray(cj(img, np.random.default_rng(3))), np.asarray(want))
    assert np.array_equal(np.asarray(ColorJitter(0, 0, 0, 0)(img, np.random.default_rng(0))), np.asarray(img))
    hue = np.asarray(ColorJitter(0, 0, 0, 0.5)(img, np.random.default_rng(0)))
    assert hue.shape == (W, W, 3) and not np.array_equal(hue, np.asarray(img))
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.6)


def test_probe_train_transform():
    x = torch.from_numpy(noise()).permute(2, 0, 1).float() / 255
    plain = ProbeTrainTransform(W, scale=(1, 1), ratio=(1, 1), flip=0.0, rand_augment=None, color_jitter=None)
    assert torch.equal(plain(x, np.random.default_rng(0)), x)
    back = torch.from_numpy(np.asarray(to_pil(x)).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(back, x)  # to_pil inverts to_tensor exactly
    t = ProbeTrainTransform(32)
    a, b = t(x, np.random.default_rng(1)), t(x, np.random.default_rng(1))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, t(x, np.random.default_rng(2)))
    assert t.rand_augment.fill == (124, 116, 104)
    clip = paper_transform(32, normalize="clip")
    assert clip.rand_augment.fill == (123, 117, 104) and clip.crop.scale == (0.08, 1.0)


# -- run_paper_probes ---------------------------------------------------------------------------------------

class Counter:
    def __init__(self, module):
        self.calls, self.outputs = 0, []
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        self.outputs.append(output.detach().clone())


def test_one_trunk_forward_per_batch_for_the_whole_sweep():
    train, test = heldout_shapes(56, 24, 12)
    calls = {}
    for lrs, wds in (((1e-3,), (0.05,)), ((1e-3, 3e-3), (0.05, 0.1))):
        enc = random_encoder("aimv2-tiny", seed=0)
        counter = Counter(enc)
        settings = PaperProbeSettings(epochs=2, batch_size=12, lrs=lrs, weight_decays=wds, warmup_epochs=0.5)
        r = run_paper_probe(enc, train, test, num_classes=5, settings=settings, extract_batch_size=64,
                            progress=False)
        assert r["steps"] == 4 and r["trunk_forwards"] == 4 and len(r["sweep"]) == len(lrs) * len(wds)
        calls[len(r["sweep"])] = counter.calls - 1  # minus the one forward of the 12 test images
    assert calls == {1: 4, 4: 4}  # 2 epochs x 2 batches, whatever the number of probes
    enc = random_encoder("aimv2-tiny", seed=0)
    r = run_paper_probe(enc, train, test, settings=TINY, extract_batch_size=5, progress=False)
    assert r["trunk_forwards"] == 4 * 3  # batches of 12 through the trunk in chunks of 5, 5, 2


def test_augmentation_is_applied_every_epoch():
    """The same image, repeated: the trunk sees different pixels at every position and in every epoch (cached
    features would be 16 identical rows)."""
    image = torch.from_numpy(noise()).permute(2, 0, 1).float()[:, :28, :28] / 255
    image = torch.nn.functional.interpolate(image[None], size=(56, 56))[0]
    train = LabelledImages(image.expand(8, -1, -1, -1).clone(), torch.arange(8) % 2)
    test = LabelledImages(image.expand(2, -1, -1, -1).clone(), torch.tensor([0, 1]))
    enc = random_encoder("aimv2-tiny", seed=0)
    counter = Counter(enc)
    settings = PaperProbeSettings(epochs=2, batch_size=8, lrs=(1e-3,), weight_decays=(0.05,), warmup_epochs=0)
    run_paper_probe(enc, train, test, settings=settings, progress=False)
    feats = torch.cat(counter.outputs[1:]).flatten(1)  # the 2 training forwards: 2 epochs x 8 copies
    assert feats.shape[0] == 16
    distances = torch.cdist(feats, feats) + torch.eye(16) * 1e9
    assert distances.min() > 1e-3
    ds = AugmentedImages(train, paper_transform(56), seed=0)
    a, label, index = ds[(0, 3)]
    assert (label, index) == (1, 3) and torch.equal(a, ds[(0, 3)][0])  # a function of (seed, epoch, item)
    assert not torch.equal(a, ds[(1, 3)][0]) and not torch.equal(a, ds[(0, 4)][0])
    assert not torch.equal(a, AugmentedImages(train, paper_transform(56), seed=1)[(0, 3)][0])


def test_sweep_is_deterministic_and_independent_of_workers():
    train, test = heldout_shapes(56, 24, 12)
    enc = random_encoder("aimv2-tiny", seed=0)
    a = run_paper_probe(enc, train, test, settings=TINY, seed=2, progress=False)
    b = run_paper_probe(enc, train, test, settings=TINY, seed=2, workers=1, progress=False)
    assert [p["top1"] for p in a["sweep"]] == [p["top1"] for p in b["sweep"]]
    assert [p["epoch_loss"] for p in a["sweep"]] == [p["epoch_loss"] for p in b["sweep"]]
    for p, q in zip(a["probes"], b["probes"]):
        for (name, x), y in zip(p.state_dict().items(), q.state_dict().values()):
            assert torch.equal(x, y), name
    assert not enc.training  # restored


def test_several_trunks_share_the_augmented_batches():
    train, test = heldout_shapes(56, 24, 12)
    trunks = {"a": random_encoder("aimv2-tiny", seed=0), "b": random_encoder("aimv2-tiny", seed=1)}
    both = run_paper_probes(trunks, train, test, settings=TINY, progress=False)
    alone = run_paper_probe(trunks["b"], train, test, settings=TINY, progress=False)
    assert set(both) == {"a", "b"} and both["a"]["trunk_forwards"] == both["b"]["trunk_forwards"] == 4
    assert [p["top1"] for p in both["b"]["sweep"]] == [p["top1"] for p in alone["sweep"]]


def test_settings_are_checked():
    for kwargs, match in ((dict(lrs=()), "lrs"), (dict(lrs=(1e-3, 1e-3)), "repeated"),
                          (dict(weight_decays=(-0.1,)), "weight_decays"), (dict(lrs=(5e-6,)), "min_lr"),
                          (dict(epochs=0), "epochs"), (dict(flip=2.0), "flip")):
        with pytest.raises(ValueError, match=match):
            PaperProbeSettings(**kwargs).check()
    s = PaperProbeSettings()
    assert (s.epochs, s.batch_size, s.warmup_epochs, s.min_lr, s.grad_clip, s.betas) == (100, 1024, 5.0, 1e-5, 3.0,
                                                                                        (0.9, 0.999))
    assert len(s.sweep()) == 14 and s.sweep()[:2] == [(5e-5, 0.05), (5e-5, 0.1)]


# -- the CLI ------------------------------------------------------------------------------------------------

def test_cli_paper_reports_every_sweep_point_and_the_best(tmp_path, capsys):
    out = tmp_path / "paper.json"
    assert main([*FAST, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "best top-1" in text and "optimistic" in text and text.count("  lr ") == 4
    report = json.loads(out.read_text())
    assert report["protocol"] == "paper" and "probes" not in report
    assert {(p["lr"], p["weight_decay"]) for p in report["sweep"]} == {(1e-3, 0.05), (1e-3, 0.1), (3e-3, 0.05),
                                                                       (3e-3, 0.1)}
    best = max(p["top1"] for p in report["sweep"])
    assert report["top1"] == report["best"]["top1"] == best
    assert report["sweep"][report["best"]["index"]]["top1"] == best and "optimistic" in report["best_note"]
    assert all(0 <= p["top1"] <= 1 and len(p["epoch_loss"]) == 2 for p in report["sweep"])
    assert (report["num_train"], report["num_test"], report["steps"], report["trunk_forwards"]) == (24, 12, 4, 4)
    s = report["settings"]
    assert (s["epochs"], s["batch_size"], s["rand_augment"], s["color_jitter"], s["scale"]) == \
        (2, 12, "rand-m9-mstd0.5-inc1", 0.3, [0.08, 1.0])


def test_cli_paper_vs_random(tmp_path, capsys):
    """Released weights next to a random trunk: both sweeps on the same augmented batches, both in the JSON."""
    from aimv2.pretrained import save_encoder

    save_encoder(random_encoder("aimv2-tiny", seed=5), tmp_path / "released")
    out = tmp_path / "vs.json"
    argv = ["--pretrained", str(tmp_path / "released"), "--vs-random", *FAST[2:], "--out", str(out)]
    assert main(argv) == 0
    assert "trained - random (best of each sweep)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["normalize"] == "clip" and len(report["baseline"]["sweep"]) == len(report["sweep"]) == 4
    assert report["baseline"]["trunk_forwards"] == report["trunk_forwards"] == 4


def test_cli_paper_on_a_folder_skips_a_corrupt_image(tmp_path):
    root = tmp_path / "colours"
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        (root / name).mkdir(parents=True)
        for k in range(6):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (60, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.jpg" if k % 2 else root / name / f"{k}.png")
    (root / "red" / "corrupt.png").write_bytes(b"this is not a png")
    out = tmp_path / "f.json"
    assert main(["--random", "aimv2-tiny", "--protocol", "paper", "--data", str(root), "--epochs", "1",
                 "--batch-size", "8", "--lrs", "1e-3", "--wds", "0.05", "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["skipped"] == 1 and report["num_classes"] == 2 and len(report["sweep"]) == 1
    assert report["settings"]["warmup_epochs"] == pytest.approx(0.05)  # 5 of 100 epochs: 5% of --epochs 1
    assert report["num_train"] + report["num_test"] == 12  # labels from the listing: the corrupt one found in training


@pytest.mark.parametrize("argv, needle", [
    (["--protocol", "paper", "--lr", "1e-3"], "--lr: --protocol paper sweeps it; give --lrs"),
    (["--protocol", "paper", "--wd", "0.1"], "--weight-decay: --protocol paper sweeps it; give --wds"),
    (["--lrs", "1e-3"], "--lrs needs --protocol paper"),
    (["--wds", "0.1"], "--wds needs --protocol paper"),
    (["--workers", "2"], "--workers needs --protocol paper"),
    (["--protocol", "paper", "--lrs", "1e-3,abc"], "--lrs: expected comma-separated numbers"),
    (["--protocol", "paper", "--lrs", "1e-3,0"], "--lrs: every value must be positive"),
    (["--protocol", "paper", "--lrs", "1e-3,1e-3"], "--lrs: a value is repeated"),
    (["--protocol", "paper", "--wds", "-0.1"], "--wds: every value must be >= 0"),
    (["--protocol", "paper", "--lrs", "5e-4,1e-2", "--min-lr", "1e-3"], "--min-lr 0.001 exceeds the smallest"),
    (["--protocol", "paper", "--workers", "-1"], "--workers must be >= 0"),
    (["--protocol", "paper", "--epochs", "0"], "--epochs must be at least 1"),
    (["--protocol", "nope"], "--protocol"),
])
def test_cli_paper_flag_errors_are_one_line_exit_2(argv, needle, capsys):
    try:
        rc = main(["--random", "aimv2-tiny", *argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_features_protocol_is_the_default_and_unchanged(tmp_path):
    """``--protocol features`` is ``run_probe`` with the old defaults (30 epochs, batch 128, lr 1e-3, wd 0.05)."""
    out = tmp_path / "f.json"
    argv = ["--random", "aimv2-tiny", "--train-size", "24", "--test-size", "12", "--epochs", "2", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "protocol" not in report and report["settings"]["lr"] == 1e-3 and report["settings"]["batch_size"] == 128
    train, test = heldout_shapes(56, 24, 12)
    from aimv2.probe import ProbeSettings

    direct = run_probe(random_encoder("aimv2-tiny", seed=0), train, test, num_classes=5,
                       settings=ProbeSettings(epochs=2), progress=False)
    assert report["top1"] == direct["top1"]
    assert main([*argv, "--protocol", "features", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] == direct["top1"]
