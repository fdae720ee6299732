"""Every aimv2 module is ready to use after its constructor, as torch's own are: each class built alone has finite
parameters and buffers drawn from its documented initialiser, and the same seed gives the same module."""
import math

import pytest
import torch
import torch.nn as nn

from aimv2 import AIMv2, AIMv2Config
from aimv2.config import EncoderConfig
from aimv2.layers import Attention, Block, SwiGLU, Transformer, _building_children
from aimv2.model import AIMv2Decoder, AIMv2Encoder, PatchEmbed, ViTPreprocessor
from aimv2.probe import AttentionPoolingClassifier

ENC = EncoderConfig(image_size=56, patch_size=14, dim=64, depth=2, num_heads=2)
DEC = AIMv2Config.from_name("aimv2-tiny").decoder

BUILDERS = {
    "Attention": lambda: Attention(64, 2, "reference"),
    "SwiGLU": lambda: SwiGLU(64, 192),
    "Block": lambda: Block(64, 2, 192, 1e-5, "reference"),
    "Transformer": lambda: Transformer(64, 2, 2, 192, 1e-5, "reference"),
    "PatchEmbed": lambda: PatchEmbed(ENC),
    "ViTPreprocessor": lambda: ViTPreprocessor(ENC),
    "ViTPreprocessor-sincos": lambda: ViTPreprocessor(EncoderConfig(**{**vars(ENC), "pos_embed": "sincos"})),
    "AIMv2Encoder": lambda: AIMv2Encoder(ENC, "reference"),
    "AIMv2Decoder": lambda: AIMv2Decoder(DEC, 64, ENC.patch_dim, "reference"),
    "AIMv2": lambda: AIMv2(AIMv2Config.from_name("aimv2-tiny", backend="reference")),
    "AttentionPoolingClassifier": lambda: AttentionPoolingClassifier(64, 5),
}


def _poisoned_empty(monkeypatch):
    """``torch.empty`` (what a parameter the constructor forgets to initialise is made of) filled with NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_module_is_finite_and_seeded_after_its_constructor(name, monkeypatch):
    _poisoned_empty(monkeypatch)
    torch.manual_seed(11)
    a = BUILDERS[name]()
    torch.manual_seed(11)
    b = BUILDERS[name]()
    ta, tb = _tensors(a), _tensors(b)
    assert ta, name
    for key, t in ta.items():
        assert torch.isfinite(t).all(), f"{name}.{key} is not initialised"
        assert torch.equal(t, tb[key]), f"{name}.{key} differs between two builds under one seed"


def _xavier_bound(w: torch.Tensor) -> float:
    w2 = w.reshape(w.shape[0], -1)
    return math.sqrt(6 / (w2.shape[0] + w2.shape[1]))


def _assert_xavier(w: torch.Tensor, what: str) -> None:
    bound = _xavier_bound(w)
    assert w.abs().max() <= bound, what
    assert w.abs().max() > 0.9 * bound, what
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound, what  # U(-a, a) has std a / sqrt(3)


def _assert_trunk(module: nn.Module, what: str) -> None:
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            _assert_xavier(m.weight, f"{what}.{name}")
        elif isinstance(m, nn.RMSNorm):
            assert torch.all(m.weight == 1), f"{what}.{name}"


@pytest.mark.parametrize("name", ["Attention", "SwiGLU", "Block", "Transformer"])
def test_trunk_modules_use_the_trunk_initialiser(name):
    _assert_trunk(BUILDERS[name](), name)


def test_patch_embed_and_preprocessor():
    pe = BUILDERS["PatchEmbed"]()
    _assert_xavier(pe.proj.weight, "conv")
    assert torch.all(pe.norm.weight == 1)
    fan_in = pe.proj.weight[0].numel()  # the bias keeps torch's Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert pe.proj.bias.abs().max() <= 1 / math.sqrt(fan_in)
    pre = ViTPreprocessor(EncoderConfig(image_size=224, patch_size=14, dim=64, depth=1, num_heads=2))
    assert abs(pre.pos_embed.std().item() - 0.02) < 0.002 and abs(pre.pos_embed.mean().item()) < 0.002
    _assert_xavier(pre.patchifier.proj.weight, "preprocessor conv")


def test_encoder_and_decoder_alone():
    enc = BUILDERS["AIMv2Encoder"]()
    _assert_trunk(enc.trunk, "encoder.trunk")
    assert abs(enc.preprocessor.pos_embed.std().item() - 0.02) < 0.004
    dec = BUILDERS["AIMv2Decoder"]()
    _assert_trunk(dec.trunk, "decoder.trunk")
    assert abs(dec.text_pos_embed.std().item() - 0.01) < 0.002
    assert abs(dec.text_embedding.weight.std().item() - 0.02) < 0.003
    assert abs(dec.start_token.std().item() - 0.02) < 0.02  # 64 values
    head = dec.text_head.weight
    std = math.sqrt(1 / (1 + DEC.depth) / head.shape[1])
    assert abs(head.std().item() - std) < 0.1 * std and head.abs().max() <= 2 * std / 0.8796 + 1e-6


def test_probe_head():
    probe = AttentionPoolingClassifier(256, 5)
    assert abs(probe.query.std().item() - 0.02) < 0.004
    assert torch.all(probe.bn.running_mean == 0) and torch.all(probe.bn.running_var == 1)


def test_encoder_alone_equals_the_old_encoder_then_init_weights():
    """Built alone, the encoder draws what ``AIMv2Encoder(cfg)`` followed by ``init_weights()`` drew before."""
    torch.manual_seed(5)
    enc = AIMv2Encoder(ENC, "reference")
    torch.manual_seed(5)
    with _building_children():  # constructed without initialisation, as the old constructor did
        old = AIMv2Encoder(ENC, "reference")
    old.init_weights()
    for key, t in enc.state_dict().items():
        assert torch.equal(t, old.state_dict()[key]), key


def test_the_poison_catches_an_uninitialised_parameter(monkeypatch):
    _poisoned_empty(monkeypatch)
    with _building_children():  # what AIMv2Encoder(cfg) used to be: pos_embed left as torch.empty memory
        enc = AIMv2Encoder(ENC, "reference")
    assert torch.isnan(enc.preprocessor.pos_embed).all()


def test_meta_construction_is_not_initialised():
    with torch.device("meta"):
        model = AIMv2(AIMv2Config.from_name("aimv2-tiny"))
        enc = AIMv2Encoder(ENC)
    assert all(p.is_meta for p in list(model.parameters()) + list(enc.parameters()))
