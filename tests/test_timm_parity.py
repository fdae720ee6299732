"""Parity with timm's AIMv2 models (``timm.create_model("aimv2_large_patch14_224", ...)``, made small) at
other resolutions than the weights': 336 px (the 16x16 position table enlarged to 24x24), 224x336 (16x24) and
168 px (shrunk to 12x12), resized on the fly (timm's ``dynamic_img_size=True``) and at load time (timm's
``checkpoint_filter_fn`` into a 336 px model; ours ``AIMv2Encoder.from_pretrained(..., image_size=336)``).

The same random weights are loaded into both (timm's state dict converted by ``aimv2.layouts.from_layout``).

Tolerance budget. Both run fp32 on the CPU with the same operations in the same order up to the kernels that
implement them (timm: ``F.scaled_dot_product_attention``, ``F.rms_norm``; ours: the reference prefix attention,
``nn.RMSNorm``): each op may round differently, by a few units of fp32 roundoff (u = 2**-24 = 6e-8) relative,
compounded through a 2-block trunk of ~10 ops per block with dot products of length <= 176. Expected: ~1e-7 to
1e-6 relative (measured: ~2e-7). Budget: relative Frobenius error <= 1e-5 (~170 u, the same budget at every
resolution). The old plain-bicubic resize (``antialias=False``) differs from timm by ~2e-3 (336 px) and ~8e-3
(168 px) relative, more than 100x the budget: ``test_old_resize_is_caught`` checks that the comparison fails
for it, so a wrong kernel cannot pass.

timm is installed without its dependencies (``pip install --no-deps timm``): there is no torchvision for the CPU
torch here, and timm imports torchvision when imported. ``tests/_torchvision_stub.py`` stands in for the few
names timm's import statements need, in this module's process only and only while its tests run; every
stand-in class raises when instantiated, so nothing compared here can go through it
(``test_the_torchvision_stand_in_is_inert``). Without timm the tests skip with the reason.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from aimv2.config import EncoderConfig
from aimv2.layers import resize_pos_embed
from aimv2.layouts import detect_layout, from_layout
from aimv2.model import AIMv2Encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _torchvision_stub  # noqa: E402

REL_TOL = 1e-5  # relative Frobenius error budget, fp32 vs fp32 (module docstring)
DIM, DEPTH, HEADS, HIDDEN = 64, 2, 2, 176  # timm's SwiGLU hidden is int(dim * mlp_ratio 2.75)
SIZES = {"336": (336, 336), "224x336": (224, 336), "168": (168, 168), "224": (224, 224)}


@pytest.fixture(scope="module")
def timm():
    """timm, imported with the torchvision stand-in when no torchvision is installed (the stand-in and timm's
    modules are taken out of ``sys.modules`` again after this module's tests)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (install it without dependencies: pip install --no-deps timm)")
    if importlib.util.find_spec("torchvision") is not None:  # a real torchvision: use it, if it works
        try:
            import timm as module
        except Exception as exc:  # noqa: BLE001  (a broken torchvision build: any error on import)
            pytest.skip(f"timm cannot be imported with the installed torchvision: {exc!r}"[:300])
        yield module
        return
    with _torchvision_stub.installed():
        try:
            import timm as module
        except (ImportError, AttributeError) as exc:  # a timm that needs more of torchvision than the stand-in has
            pytest.skip(f"timm {importlib.metadata.version('timm')} cannot be imported with the torchvision "
                        f"stand-in (tests/_torchvision_stub.py lists what timm 1.0.31 needs): {exc}")
        yield module


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _randomize(state: dict[str, torch.Tensor], seed: int) -> None:
    """Fresh random weights in place, of sizes that keep activations O(1): linears N(0, 1/fan_in), norm scales
    1 + N(0, 0.1^2), the position table N(0, 0.02^2) (timm's and our init), the conv bias N(0, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in state.items():
            r = torch.randn(t.shape, generator=g)
            if "norm" in key:
                t.copy_(1 + 0.1 * r)
            elif key == "pos_embed" or key.endswith("bias"):
                t.copy_(0.02 * r)
            else:
                t.copy_(r / t[0].numel() ** 0.5)


def _pair(timm, seed: int, **timm_kwargs):
    """A small timm AIMv2 (``aimv2_large_patch14_224``'s arguments, 2 blocks of width 64) with random weights,
    and our encoder holding the same tensors."""
    model = timm.create_model("aimv2_large_patch14_224", pretrained=False, depth=DEPTH, embed_dim=DIM,
                              num_heads=HEADS, num_classes=0, **timm_kwargs).eval()
    state = model.state_dict()
    _randomize(state, seed)
    assert detect_layout(state.keys()) == "timm"
    cfg = EncoderConfig(image_size=224, patch_size=14, dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_hidden=HIDDEN)
    ours = AIMv2Encoder(cfg, backend="reference")
    ours.load_state_dict(from_layout(state, cfg, "timm"), strict=True)
    return model, ours.eval()


def _images(hw: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(seed))


def test_the_torchvision_stand_in_is_inert(timm):
    """Every stand-in class raises when instantiated, and it is what timm imported (so a timm code path using
    torchvision would raise rather than compute with a fake); the timm model holds nothing from it."""
    if not isinstance(sys.modules.get("torchvision"), type(sys)) or \
            sys.modules["torchvision"].__spec__.loader is not None:
        pytest.skip("a real torchvision is installed: the stand-in is not used")
    for module, classes in _torchvision_stub.CLASSES.items():
        for name in classes:
            with pytest.raises(_torchvision_stub.StubUsed):
                getattr(sys.modules[module], name)()
    stub_bn = sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d
    assert sys.modules["timm.layers.create_norm"].FrozenBatchNorm2d is stub_bn
    model, _ = _pair(timm, seed=0, dynamic_img_size=True)
    assert not any(type(m).__module__.startswith("torchvision") for m in model.modules())


@pytest.mark.parametrize("size", list(SIZES))
def test_features_match_timm(timm, size):
    """On the fly: ours (default, ``pos_embed_antialias=True``) == timm with ``dynamic_img_size=True``."""
    from timm.layers import resample_abs_pos_embed

    seed = 1 + list(SIZES).index(size)
    model, ours = _pair(timm, seed, dynamic_img_size=True)
    assert ours.pos_embed_antialias is True
    hw = SIZES[size]
    x = _images(hw, seed)
    with torch.no_grad():
        want, got = model.forward_features(x), ours(x)
    assert got.shape == want.shape == (2, (hw[0] // 14) * (hw[1] // 14), DIM)
    err = _rel(got, want)
    assert err <= REL_TOL, f"{size}: relative error {err:.2e} over the {REL_TOL:g} budget"
    # the resized table itself: the same ops as timm's resample_abs_pos_embed, so bit for bit
    grid = (hw[0] // 14, hw[1] // 14)
    pos = model.pos_embed.detach()
    theirs = resample_abs_pos_embed(pos, new_size=grid, old_size=(16, 16), num_prefix_tokens=0)
    assert torch.equal(resize_pos_embed(pos, (16, 16), grid), theirs)


@pytest.mark.parametrize("size", ["336", "168"])
def test_old_resize_is_caught(timm, size):
    """The comparison can fail: the plain bicubic kernel (``antialias=False``, this encoder's old behaviour)
    is more than 100x over the budget, at 336 px (enlarging: antialias matters there too) and 168 px."""
    model, ours = _pair(timm, seed=11, dynamic_img_size=True)
    x = _images(SIZES[size], seed=11)
    ours.pos_embed_antialias = False
    with torch.no_grad():
        err = _rel(ours(x), model.forward_features(x))
    assert err > 100 * REL_TOL, f"{size}: the old kernel is only {err:.2e} from timm"


def test_intermediates_match_timm(timm):
    """``forward_intermediates``: the same blocks, norm and NCHW layout as timm's, at 224x336."""
    model, ours = _pair(timm, seed=21, dynamic_img_size=True)
    x = _images((224, 336), seed=21)
    with torch.no_grad():
        for kwargs in ({"indices": [0, -1], "norm": True, "output_fmt": "NCHW"},
                       {"indices": 1, "norm": False, "output_fmt": "NLC"},
                       {"indices": [0], "norm": True, "output_fmt": "NLC", "stop_early": True}):
            want_final, want = model.forward_intermediates(x, **kwargs)
            got_final, got = ours.forward_intermediates(x, **kwargs)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.shape == w.shape
                assert _rel(g, w) <= REL_TOL, kwargs
            assert _rel(got_final, want_final) <= REL_TOL, kwargs


def test_resize_at_load_matches_timm(timm, tmp_path):
    """At load time: timm's ``checkpoint_filter_fn`` resizing 224 px weights into a 336 px model, and ours
    ``from_pretrained(image_size=336)`` (``aimv2.weights.read_pretrained`` -> ``resize_pos_embed``), agree
    (the table bit for bit, the features within the budget)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from aimv2.pretrained import save_encoder

    model224, ours224 = _pair(timm, seed=31)
    model336 = timm.create_model("aimv2_large_patch14_224", pretrained=False, depth=DEPTH, embed_dim=DIM,
                                 num_heads=HEADS, num_classes=0, img_size=336).eval()
    model336.load_state_dict(checkpoint_filter_fn(model224.state_dict(), model336), strict=True)
    save_encoder(ours224, tmp_path / "w", layout="timm")
    ours336 = AIMv2Encoder.from_pretrained(tmp_path / "w", image_size=336, backend="reference")
    assert torch.equal(ours336.preprocessor.pos_embed, model336.pos_embed)
    x = _images((336, 336), seed=31)
    with torch.no_grad():
        err = _rel(ours336(x), model336.forward_features(x))
    assert err <= REL_TOL, f"relative error {err:.2e} over the {REL_TOL:g} budget"
