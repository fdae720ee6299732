"""Feature extraction: ``AIMv2Encoder.forward_intermediates`` (timm's name and meaning), the position-table
resize kernels, the encoder's input checks, and the ``aimv2-extract`` command line."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.config import EncoderConfig
from aimv2.extract_cli import main, parse_layers, sidecar_path
from aimv2.layers import resize_pos_embed
from aimv2.model import AIMv2Encoder, feature_take_indices

DEPTH = 4
CFG = dict(image_size=28, patch_size=14, dim=32, depth=DEPTH, num_heads=2)


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    e = AIMv2Encoder(EncoderConfig(**CFG)).eval()  # backend "auto", as the CLI's default
    with torch.no_grad():  # non-trivial norm scales, so that applying a norm or not shows
        for m in e.modules():
            if isinstance(m, torch.nn.RMSNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
    return e


def _hooked(enc, images, prefix_lens=None):
    """Every block's output in ``enc(images)`` (forward hooks), the final output, and how many blocks ran."""
    outs = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in enc.trunk.blocks]
    try:
        with torch.no_grad():
            final = enc(images, prefix_lens)
    finally:
        for h in handles:
            h.remove()
    return outs, final


def _images(h=42, w=56, b=2, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# forward_intermediates
# ----------------------------------------------------------------------------------------------------------

def test_intermediates_are_the_block_outputs_exactly(enc):
    x = _images()
    blocks, final = _hooked(enc, x)
    with torch.no_grad():
        got_final, got = enc.forward_intermediates(x)
    assert len(got) == DEPTH
    assert all(torch.equal(g, b) for g, b in zip(got, blocks))
    assert torch.equal(got_final, final)
    # prefix attention goes through the same way
    lens = torch.tensor([1, 5])
    blocks, final = _hooked(enc, x, lens)
    with torch.no_grad():
        got_final, got = enc.forward_intermediates(x, [1, -1], prefix_lens=lens)
    assert torch.equal(got[0], blocks[1]) and torch.equal(got[1], blocks[-1]) and torch.equal(got_final, final)


@pytest.mark.parametrize("indices,blocks", [(None, [0, 1, 2, 3]), (1, [3]), (2, [2, 3]), (4, [0, 1, 2, 3]),
                                            ([0], [0]), ([-1], [3]), ([3, 0, -1, 1], [0, 1, 3]), ((2,), [2]),
                                            (range(2), [0, 1]), (np.int64(1), [3])])
def test_indices_forms(enc, indices, blocks):
    """timm's meaning: int n = the last n blocks; a sequence = those blocks (negative from the end), each once,
    in block order."""
    assert feature_take_indices(DEPTH, indices) == blocks
    x = _images()
    hooked, _ = _hooked(enc, x)
    with torch.no_grad():
        got = enc.forward_intermediates(x, indices, intermediates_only=True)
    assert isinstance(got, list) and len(got) == len(blocks)
    assert all(torch.equal(g, hooked[i]) for g, i in zip(got, blocks))


def test_norm_and_nchw(enc):
    x = _images(42, 56)
    hooked, final = _hooked(enc, x)
    with torch.no_grad():
        normed = enc.forward_intermediates(x, [0, -1], norm=True, intermediates_only=True)
        nchw_final, nchw = enc.forward_intermediates(x, [0, -1], norm=True, output_fmt="NCHW")
        expected_first = enc.trunk.post_trunk_norm(hooked[0])
    assert torch.equal(normed[0], expected_first)
    assert torch.equal(normed[1], final)  # the last block, normed, is forward's output
    assert not torch.equal(normed[0], hooked[0])
    assert torch.equal(nchw_final, final)  # the final features stay (B, N, D), as timm
    for y, t in zip(nchw, normed):
        assert y.shape == (2, 32, 3, 4) and y.is_contiguous()
        assert torch.equal(y, t.reshape(2, 3, 4, 32).permute(0, 3, 1, 2))


def test_stop_early_runs_no_later_block(enc):
    x = _images()
    hooked, _ = _hooked(enc, x)
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(enc.trunk.blocks)]
    try:
        with torch.no_grad():
            final, got = enc.forward_intermediates(x, [0, 1], stop_early=True)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]
    assert torch.equal(got[0], hooked[0]) and torch.equal(got[1], hooked[1])
    assert torch.equal(final, enc.trunk.post_trunk_norm(hooked[1]))  # timm: the norm of the last block run


@pytest.mark.parametrize("kwargs,error,match", [
    ({"indices": 0}, ValueError, "indices"), ({"indices": DEPTH + 1}, ValueError, "indices"),
    ({"indices": [DEPTH]}, ValueError, "indices"), ({"indices": [-DEPTH - 1]}, ValueError, "indices"),
    ({"indices": []}, ValueError, "indices"), ({"indices": "1"}, TypeError, "indices"),
    ({"indices": [1.0]}, TypeError, "indices"), ({"indices": True}, TypeError, "indices"),
    ({"indices": [True]}, TypeError, "indices"), ({"indices": torch.tensor([1])}, TypeError, "indices"),
    ({"norm": 1}, TypeError, "norm"), ({"stop_early": "yes"}, TypeError, "stop_early"),
    ({"intermediates_only": None}, TypeError, "intermediates_only"),
    ({"output_fmt": "NHWC"}, ValueError, "output_fmt"), ({"output_fmt": None}, TypeError, "output_fmt"),
])
def test_bad_arguments_are_named(enc, kwargs, error, match):
    with pytest.raises(error, match=match):
        enc.forward_intermediates(_images(), **kwargs)


@pytest.mark.parametrize("make", [lambda: Image.new("RGB", (28, 28)), lambda: np.zeros((1, 3, 28, 28), np.float32),
                                  lambda: [torch.zeros(3, 28, 28)]])
def test_non_tensor_images_name_the_processor(enc, make):
    for call in (enc, enc.forward_intermediates):
        with pytest.raises(TypeError, match=r"aimv2\.processor\.AIMv2ImageProcessor"):
            call(make())


def test_integer_pixels_name_the_processor(enc):
    with pytest.raises(TypeError, match="AIMv2ImageProcessor"):
        enc(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples of 14"):
        enc.forward_intermediates(torch.zeros(1, 3, 30, 28))


# ----------------------------------------------------------------------------------------------------------
# The position-table resize
# ----------------------------------------------------------------------------------------------------------

def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


def _weights(n_in: int, n_out: int, antialias: bool) -> torch.Tensor:
    """The 1-D resampling matrix each kernel is documented to be (aimv2.layers.resize_pos_embed)."""
    scale, w = n_in / n_out, torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        if antialias:  # Pillow's: Keys a=-0.5, support widened when shrinking, taps in range renormalised
            support, center = 2.0 * max(scale, 1.0), scale * (i + 0.5)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            taps = [_cubic((j - center + 0.5) / max(scale, 1.0), -0.5) for j in range(lo, hi)]
            for j, t in zip(range(lo, hi), taps):
                w[i, j] = t / sum(taps)
        else:  # plain bicubic: a=-0.75, 4 taps, border replicated
            src = scale * (i + 0.5) - 0.5
            f = math.floor(src)
            for k in range(-1, 3):
                w[i, min(max(f + k, 0), n_in - 1)] += _cubic(src - f - k, -0.75)
    return w


@pytest.mark.parametrize("new", [(6, 6), (3, 3), (4, 6), (2, 7)])
def test_resize_kernels_are_the_documented_ones(new):
    """Both kernels, enlarging and shrinking: antialias changes the enlargement too (a=-0.5 vs -0.75)."""
    pos = torch.randn(1, 16, 5, generator=torch.Generator().manual_seed(0))
    grid = pos.double().reshape(4, 4, 5)
    for antialias in (True, False):
        want = torch.einsum("hi,wj,ijd->hwd", _weights(4, new[0], antialias), _weights(4, new[1], antialias), grid)
        got = resize_pos_embed(pos, (4, 4), new, antialias=antialias)
        torch.testing.assert_close(got.double(), want.reshape(1, -1, 5), rtol=0, atol=1e-5)
    assert (resize_pos_embed(pos, (4, 4), new) - resize_pos_embed(pos, (4, 4), new, antialias=False)).abs().max() > 1e-3
    with pytest.raises(TypeError, match="antialias"):
        resize_pos_embed(pos, (4, 4), new, antialias=1)


def test_pos_embed_antialias_setting(enc):
    assert enc.pos_embed_antialias is True  # timm's kernel by default
    x_other, x_native = _images(42, 56), _images(28, 28)
    try:
        with torch.no_grad():
            timm_like, native = enc(x_other), enc(x_native)
            enc.pos_embed_antialias = False
            old, native_old = enc(x_other), enc(x_native)
        assert not torch.allclose(timm_like, old) and torch.equal(native, native_old)
        with pytest.raises(TypeError, match="pos_embed_antialias"):
            enc.pos_embed_antialias = "no"
    finally:
        enc.pos_embed_antialias = True
    assert "antialias" not in " ".join(enc.state_dict())


# ----------------------------------------------------------------------------------------------------------
# aimv2-extract
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory, enc):
    from aimv2.pretrained import save_encoder

    return save_encoder(enc, tmp_path_factory.mktemp("weights") / "tiny", layout="hf")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """5 images of assorted sizes and modes (one in a subfolder) and one corrupt ``.png``."""
    root = tmp_path_factory.mktemp("images") / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(30, 40), (50, 28), (28, 28), (64, 33)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{k}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(root / "sub" / "grey.jpg")
    (root / "2b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _expected(enc, paths, *, image_size=28, normalize="clip", batch=2, **kwargs):
    """What the CLI should write: EvalTransform, the normalization, the encoder in the same batches."""
    from aimv2.data import NORMALIZATIONS, EvalTransform, Normalize

    tf, norm = EvalTransform(image_size), Normalize(*NORMALIZATIONS[normalize])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return [enc.forward_intermediates(norm(x[i:i + batch]), intermediates_only=True, **kwargs)
                for i in range(0, len(paths), batch)]


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_extract_folder_skips_the_corrupt_image(enc, exported, folder, tmp_path, capsys):
    out = tmp_path / "o" / "feats.safetensors"
    sidecar_path(out).parent.mkdir()
    sidecar_path(out).write_text("stale")
    assert main(["--pretrained", str(exported), "--data", str(folder), "--out", str(out), "--batch-size", "3",
                 "--no-progress"]) == 0
    cap = capsys.readouterr()
    tensors, meta = _read(out)
    keys = json.loads(meta["keys"])
    names = ["0.png", "1.png", "2.png", "3.png", os.path.join("sub", "grey.jpg")]
    assert keys == [str(folder / n) for n in names]  # walk order, the corrupt one left out
    assert set(tensors) == {"features"} and tensors["features"].shape == (5, 4, 32)
    assert tensors["features"].dtype == torch.float32
    # batches of 3 indices in walk order: [0, 1, 2] -> 3 images, [2b_corrupt, 3, sub/grey] -> 2
    from aimv2.data import NORMALIZATIONS, EvalTransform, Normalize

    tf, norm = EvalTransform(28), Normalize(*NORMALIZATIONS["clip"])
    x = norm(torch.stack([tf(Image.open(folder / n).convert("RGB")) for n in names]))
    with torch.no_grad():
        want = torch.cat([enc(x[:3]), enc(x[3:])])
    assert torch.equal(tensors["features"], want)
    skipped = json.loads(meta["skipped"])
    assert [s["key"] for s in skipped] == [str(folder / "2b_corrupt.png")] and skipped[0]["reason"]
    assert json.loads(sidecar_path(out).read_text()) == skipped
    assert meta["num_images"] == "5" and meta["num_skipped"] == "1" and meta["normalize"] == "clip"
    assert json.loads(meta["layers"]) == [DEPTH - 1] and meta["pool"] == "tokens"
    line = [s for s in cap.err.splitlines() if "skipped" in s]
    assert len(line) == 1 and "1 unreadable" in line[0] and "2b_corrupt.png" in line[0]
    assert str(out) in cap.out
    assert sorted(p.name for p in out.parent.iterdir()) == ["feats.safetensors", "feats.skipped.json"]


def test_extract_layers_mean_no_norm(enc, exported, folder, tmp_path):
    out = tmp_path / "f.safetensors"
    assert main(["--pretrained", str(exported), "--data", str(folder), "--out", str(out), "--layers=0,-1",
                 "--pool", "mean", "--no-norm", "--image-size", "42", "--normalize", "imagenet",
                 "--batch-size", "2", "--no-progress"]) == 0
    tensors, meta = _read(out)
    assert set(tensors) == {"layer_0", f"layer_{DEPTH - 1}"} and json.loads(meta["layers"]) == [0, DEPTH - 1]
    names = ["0.png", "1.png", "2.png", "3.png", os.path.join("sub", "grey.jpg")]
    # batches of 2 indices in walk order: [0, 1], [2, 2b_corrupt] -> 1 image, [3, sub/grey]
    from aimv2.data import NORMALIZATIONS, EvalTransform, Normalize

    tf, norm = EvalTransform(42), Normalize(*NORMALIZATIONS["imagenet"])
    x = norm(torch.stack([tf(Image.open(folder / n).convert("RGB")) for n in names]))
    with torch.no_grad():
        parts = [enc.forward_intermediates(x[a:b], [0, -1], norm=False, intermediates_only=True)
                 for a, b in ((0, 2), (2, 3), (3, 5))]
    for k, name in enumerate(["layer_0", f"layer_{DEPTH - 1}"]):
        assert tensors[name].shape == (5, 32)
        assert torch.equal(tensors[name], torch.cat([p[k].mean(1) for p in parts]))
    assert not sidecar_path(out).exists() or json.loads(sidecar_path(out).read_text())


def test_extract_class_folder_labels_and_a_checkpoint(tmp_path, capsys):
    """Class subfolders give labels; ``--checkpoint`` takes a training run's encoder and its normalization."""
    from aimv2.checkpoint import load_trained_encoder, save_checkpoint
    from aimv2.config import AIMv2Config
    from aimv2.model import AIMv2

    rng = np.random.default_rng(1)
    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for k in range(n):
            pixels = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{k}.png")
    cfg = AIMv2Config.from_name("aimv2-tiny")
    torch.manual_seed(3)
    state = {"step": 1, "model_config": cfg.to_dict(), "train_config": {"normalize": "clip"}}
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, AIMv2(cfg), None, state)
    out = tmp_path / "c.safetensors"
    assert main(["--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--pool", "mean", "--workers", "1", "--no-progress"]) == 0
    tensors, meta = _read(out)
    assert tensors["labels"].tolist() == [0, 0, 1, 1, 1] and json.loads(meta["classes"]) == ["cat", "dog"]
    assert meta["normalize"] == "clip" and "checkpoint" in meta["model"]
    enc, _ = load_trained_encoder(tmp_path / "run")
    paths = [tmp_path / "data" / c / f"{k}.png" for c, n in (("cat", 2), ("dog", 3)) for k in range(n)]
    want = _expected(enc, paths, image_size=cfg.encoder.image_size, batch=64, indices=[-1], norm=True)[0][0]
    torch.testing.assert_close(tensors["features"], want.mean(1), rtol=0, atol=1e-6)


def test_parse_layers():
    assert parse_layers("3") == 3 and parse_layers("-1") == [-1] and parse_layers("5,") == [5]
    assert parse_layers(" 0, -1 ") == [0, -1]


@pytest.mark.parametrize("flags,match", [
    (["--pool", "max"], "--pool"), (["--batch-size", "0"], "--batch-size"), (["--layers", "9"], "--layers"),
    (["--layers=0,x"], "--layers"), (["--layers=7,"], "--layers"), (["--image-size", "15"], "--image-size"),
    (["--crop-pct", "0"], "--crop-pct"), (["--workers", "-1"], "--workers"), (["--dtype", "int8"], "--dtype"),
    (["--normalize", "nope"], "--normalize"), (["--backend", "nope"], "--backend"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_exit_2(exported, folder, tmp_path, capsys, flags, match):
    out = tmp_path / "x.safetensors"
    assert main(["--pretrained", str(exported), "--data", str(folder), "--out", str(out), "--no-progress",
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aimv2-extract: error:") and match in err[0]
    assert not out.exists()


def test_bad_paths(exported, folder, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    common = ["--no-progress"]
    assert main(["--pretrained", str(tmp_path / "nope"), "--data", str(folder), "--out", out, *common]) == 2
    assert main(["--pretrained", str(exported), "--data", str(tmp_path / "nope"), "--out", out, *common]) == 2
    assert main(["--pretrained", str(exported), "--data", str(folder), "--out", str(tmp_path), *common]) == 2
    assert main(["--checkpoint", str(tmp_path / "nope"), "--data", str(folder), "--out", out, *common]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["--pretrained", str(exported), "--data", str(tmp_path / "empty"), "--out", out, *common]) == 2
    # argparse: both trunks, or none
    assert main(["--pretrained", str(exported), "--checkpoint", "x", "--data", str(folder), "--out", out]) == 2
    assert main(["--data", str(folder), "--out", out]) == 2
    capsys.readouterr()
    # operational: weights that cannot be read; data whose every image is unreadable (nothing is written)
    bad = tmp_path / "badw"
    bad.mkdir()
    (bad / "config.json").write_text((exported / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"garbage")
    assert main(["--pretrained", str(bad), "--data", str(folder), "--out", out, *common]) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"nope")
    (tmp_path / "x.safetensors").write_bytes(b"old")
    assert main(["--pretrained", str(exported), "--data", str(broken), "--out", out, *common]) == 1
    err = capsys.readouterr().err
    assert "no readable image" in err
    assert (tmp_path / "x.safetensors").read_bytes() == b"old"  # an earlier output is left as it was
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.safetensors")]  # no temp files left
