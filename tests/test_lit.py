"""AIMv2 LiT (aimv2.lit) against transformers' Aimv2Model: a tiny random model saved with save_pretrained, loaded
with AIMv2LiT.from_pretrained, compared on fresh pixels and token ids.

Tolerance budget: both sides compute in fp32 with different op orders (fused vs split q/k/v, torch's RMSNorm vs
transformers', aimv2_kernels' attention vs eager matmul-softmax), which puts them about 2e-7 apart relative to
the largest output magnitude (measured: 2.2e-7 image features, 2.2e-7 text features, 2.4e-7 logits at scale
exp(3)). The check is max |ours - theirs| <= 1e-5 * max |theirs|: 10-50x that, and far below the 1e-2-level
differences that a wrong pooling position or a non-causal text tower give (the negative cases below).
"""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Aimv2Config, Aimv2Model

from aimv2.layouts import WeightsError
from aimv2.lit import AIMv2LiT, LiTConfig, TextConfig, detect_lit_layout, lit_shapes, lit_to_layout
from aimv2.weights import CheckpointMismatchError

RTOL = 1e-5
VOCAB, EOS, CONTEXT, IMAGE = 100, 99, 16, 56


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def tiny_config() -> Aimv2Config:
    return Aimv2Config(
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=14, use_head=True),
        text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT, eos_token_id=EOS),
        projection_dim=32)


@pytest.fixture(scope="module")
def hf_model() -> Aimv2Model:
    torch.manual_seed(0)
    model = Aimv2Model(tiny_config()).eval()
    with torch.no_grad():  # well away from the init (norm scales 1, zero biases): every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(3.0)
            elif p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1 if p.dim() == 2 and "embedding" not in name else 0.5)
    model.set_attn_implementation("eager")  # materialises the causal mask when one is passed (see aimv2.lit)
    return model


@pytest.fixture(scope="module")
def folder(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("lit_hf")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(folder) -> AIMv2LiT:
    return AIMv2LiT.from_pretrained(folder)


def make_ids(seed: int = 1) -> torch.Tensor:
    """Random ids with the first EOS at varying positions (first, middle, last) and later EOS / padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, EOS, (6, CONTEXT), generator=g)
    for row, pos in enumerate([0, 3, 7, 15, 9, 1]):
        ids[row, pos] = EOS
    ids[1, 10] = EOS  # a second EOS: pooling is at the first
    ids[4, 10:] = EOS  # padded with EOS after the first
    return ids


def pixels(seed: int = 2, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def hf_text(model: Aimv2Model, ids: torch.Tensor, mask: bool = True) -> torch.Tensor:
    with torch.no_grad():
        kwargs = {"attention_mask": torch.ones_like(ids)} if mask else {}
        return model.get_text_features(ids, **kwargs).pooler_output


def test_config_from_transformers_folder(ours):
    c = ours.cfg
    assert (c.vision.dim, c.vision.depth, c.vision.num_heads, c.vision.mlp_hidden) == (64, 2, 4, 96)
    assert (c.vision.image_size, c.vision.patch_size, c.vision.pos_embed) == (IMAGE, 14, "learned")
    assert c.text == TextConfig(vocab_size=VOCAB, dim=48, depth=2, num_heads=4, mlp_hidden=80, context_length=CONTEXT,
                                eos_id=EOS, norm_eps=1e-5)
    assert (c.projection_dim, c.max_logit_scale) == (32, 100.0)
    assert not ours.training and all(p.dtype == torch.float32 for p in ours.parameters())


def test_image_features_match_transformers(hf_model, ours):
    x = pixels()
    with torch.no_grad():
        ref = hf_model.get_image_features(x).pooler_output
        got = ours.encode_image(x)
    assert got.shape == ref.shape == (3, 32)
    assert rel_err(got, ref) <= RTOL
    assert torch.allclose(ours.encode_image(x, normalize=True).norm(dim=-1), torch.ones(3))


def test_text_features_match_transformers(hf_model, ours):
    ids = make_ids()
    with torch.no_grad():
        got = ours.encode_text(ids)
    ref = hf_text(hf_model, ids)
    assert got.shape == ref.shape == (6, 32)
    assert rel_err(got, ref) <= RTOL
    # Padding marked in the attention mask (transformers' padded batch) changes nothing before the first EOS.
    mask = torch.ones_like(ids)
    mask[4, 10:] = 0
    with torch.no_grad():
        padded = hf_model.get_text_features(ids, attention_mask=mask).pooler_output
    assert rel_err(got, padded) <= RTOL
    # A shorter sequence (the tokenizer's pad_to="longest") gives the same features.
    short = ids[[0, 2], :8]
    with torch.no_grad():
        assert rel_err(ours.encode_text(short), ref[[0, 2]]) <= RTOL


def test_forward_logits_match_transformers(hf_model, ours):
    x, ids = pixels(3, n=4), make_ids(4)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=x, attention_mask=torch.ones_like(ids))
        out = ours(x, ids)
    assert out.logits_per_image.shape == (4, 6) and out.logits_per_text.shape == (6, 4)
    assert rel_err(out.logits_per_image, ref.logits_per_image) <= RTOL
    assert rel_err(out.logits_per_text, ref.logits_per_text) <= RTOL
    assert rel_err(out.image_embeds, ref.image_embeds) <= RTOL
    assert rel_err(out.text_embeds, ref.text_embeds) <= RTOL
    assert float(ours.logit_scale.detach()) == pytest.approx(math.exp(3.0), rel=1e-6)


def test_pooling_at_last_token_fails_the_tolerance(hf_model, ours):
    """The check can fail: pooling at the last position instead of the first EOS is far outside it."""
    ids = make_ids()
    ref = hf_text(hf_model, ids)
    with torch.no_grad():
        last = ours.text_projector(ours.text_encoder.features(ids)[:, -1])
    assert rel_err(last, ref) > 1e-2


def test_bidirectional_text_attention_fails_the_tolerance(hf_model, ours):
    """transformers without an attention mask (or with SDPA and no padding) runs its text tower
    bidirectionally, unlike the trained model (ml-aim is causal): far outside the tolerance. Ours is causal."""
    ids = make_ids()
    with torch.no_grad():
        got = ours.encode_text(ids)
        bidirectional = hf_text(hf_model, ids, mask=False)
        later = ids.clone()
        later[0, 5:] = (later[0, 5:] + 1) % EOS  # tokens after row 0's first EOS (position 0)
        later[0, 0] = EOS
        assert torch.equal(ours.encode_text(later)[0], got[0])  # causal: nothing after the EOS reaches it
    assert rel_err(got, bidirectional) > 1e-2
    hf_model.set_attn_implementation("sdpa")  # transformers' default: an all-ones mask is dropped, not causal
    try:
        assert rel_err(got, hf_text(hf_model, ids, mask=True)) > 1e-2
    finally:
        hf_model.set_attn_implementation("eager")


def test_logit_scale_is_clamped(hf_model, folder, tmp_path):
    model = AIMv2LiT.from_pretrained(folder)
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)
    assert float(model.logit_scale.detach()) == pytest.approx(100.0)
    model.log_logit_scale.data.fill_(-1.0)
    assert float(model.logit_scale.detach()) == 1.0


def test_apple_layout_round_trip(ours, tmp_path):
    path = ours.save_pretrained(tmp_path / "apple", layout="apple")
    from safetensors.torch import load_file
    keys = set(load_file(str(path / "model.safetensors")))
    assert {"image_encoder.head.cls_token", "image_encoder.head.k.weight", "image_encoder.head.v.weight",
            "image_encoder.head.linear.weight", "image_encoder.head.linear.bias",
            "image_encoder.preprocessor.pos_embed", "image_encoder.trunk.blocks.1.attn.qkv.weight",
            "text_encoder.preprocessor.text_embedding.weight", "text_encoder.preprocessor.positional_embedding",
            "text_encoder.trunk.blocks.1.mlp.fc3.weight", "text_encoder.trunk.post_trunk_norm.weight",
            "image_projector.weight", "text_projector.weight", "log_logit_scale"} <= keys
    assert detect_lit_layout(list(keys)) == "apple"
    back = AIMv2LiT.from_pretrained(path)
    x, ids = pixels(), make_ids()
    with torch.no_grad():
        assert torch.equal(back(x, ids).logits_per_image, ours(x, ids).logits_per_image)
    # a bare weights file (no config.json): shapes from the tensors, heads from AIMv2's head_dim 128 fallback
    bare = AIMv2LiT.from_pretrained(path / "model.safetensors")
    assert bare.cfg.vision.num_heads == 1 and bare.cfg.text.eos_id == VOCAB - 1  # documented fallbacks


def test_hf_export_loads_in_transformers(ours, hf_model, tmp_path):
    path = ours.save_pretrained(tmp_path / "hf", layout="hf")
    model, info = Aimv2Model.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval().set_attn_implementation("eager")
    ids = make_ids()
    with torch.no_grad():
        assert rel_err(hf_text(model, ids), hf_text(hf_model, ids)) == 0.0
        x = pixels()
        assert torch.equal(model.get_image_features(x).pooler_output, hf_model.get_image_features(x).pooler_output)


def test_pytorch_bin_is_read_with_weights_only(folder, tmp_path):
    from safetensors.torch import load_file
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "pytorch_model.bin")
    model = AIMv2LiT.from_pretrained(tmp_path)
    ref = AIMv2LiT.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def _write(tmp_path, tensors, config_from=None):
    from safetensors.torch import save_file
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    if config_from is not None:
        (tmp_path / "config.json").write_text((config_from / "config.json").read_text())
    return tmp_path


def test_strict_keys_are_listed(folder, tmp_path):
    from safetensors.torch import load_file
    sd = load_file(str(folder / "model.safetensors"))
    broken = dict(sd)
    del broken["text_model.encoder.layers.1.ffn.up_proj.weight"]
    broken["text_model.extra.weight"] = torch.zeros(2)
    broken["visual_projection.weight"] = torch.zeros(31, 64)
    with pytest.raises(CheckpointMismatchError) as info:
        AIMv2LiT.from_pretrained(_write(tmp_path / "a", broken, folder))
    err = info.value
    assert err.missing == ["text_model.encoder.layers.1.ffn.up_proj.weight"]
    assert err.unexpected == ["text_model.extra.weight"]
    assert err.mismatched == [("visual_projection.weight", (31, 64), (32, 64))]
    # shapes from the tensors are range-checked before anything is built (a hostile block index)
    huge = dict(sd)
    huge["text_model.encoder.layers.99999999.rms_norm1.weight"] = torch.ones(48)
    with pytest.raises(WeightsError, match="text depth must lie in"):
        AIMv2LiT.from_pretrained(_write(tmp_path / "c", huge))
    # config.json and tensors that disagree: the config's shape is expected, the tensors are listed
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 64
    _write(tmp_path / "d", sd)
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError) as info:
        AIMv2LiT.from_pretrained(tmp_path / "d")
    assert len(info.value.mismatched) == 6 and not info.value.missing  # gate / up / down of 2 blocks
    # a vision-only checkpoint is named as such
    vision = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    with pytest.raises(WeightsError, match="vision-only"):
        AIMv2LiT.from_pretrained(_write(tmp_path / "b", vision))


def test_text_input_checks(ours):
    ids = make_ids()
    no_eos = ids.clone()
    no_eos[2] = 5
    with pytest.raises(ValueError, match="EOS id 99"):
        ours.encode_text(no_eos)
    with pytest.raises(ValueError, match="context length"):
        ours.encode_text(torch.full((1, CONTEXT + 1), EOS))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        ours.encode_text(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="integer tensor"):
        ours.encode_text(ids.float())


def test_keys_and_shapes_table_matches_the_model():
    cfg = LiTConfig(vision=tiny_vision(), text=TextConfig(vocab_size=30, dim=16, depth=1, num_heads=2, mlp_hidden=24,
                                                           context_length=5, eos_id=29), projection_dim=8)
    model = AIMv2LiT(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == lit_shapes(cfg)
    hf = lit_to_layout(model.state_dict(), "hf")
    assert hf["vision_model.embeddings.position_embedding.weight"].shape == (4, 32)
    assert float(model.logit_scale.detach()) == pytest.approx(1 / 0.07)


def tiny_vision():
    from aimv2.config import EncoderConfig
    return EncoderConfig(image_size=28, patch_size=14, dim=32, depth=1, num_heads=2, mlp_hidden=48)
