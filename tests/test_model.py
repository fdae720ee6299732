"""The AIMv2 model: parameter counts, checkpoint layout, masks, shifts, loss weights and initialisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from aimv2 import PRESETS, AIMv2, AIMv2Config, AIMv2Encoder, count_parameters
from aimv2.config import swiglu_hidden
from aimv2.layers import sincos_pos_embed
from aimv2_kernels import patch_mse_loss

# Published exact encoder parameter counts (224 / 336 / 448 px).
EXACT = {
    "large": (309_197_824, 309_525_504, 309_984_256),
    "huge": (680_851_968, 681_343_488, 682_031_616),
    "1B": (1_234_958_336, 1_235_613_696, 1_236_531_200),
    "3B": (2_720_658_432, 2_721_641_472, 2_723_017_728),
}


@pytest.mark.parametrize("size", list(EXACT))
@pytest.mark.parametrize("res_index,res", [(0, 224), (1, 336), (2, 448)])
def test_encoder_parameter_counts(size, res_index, res):
    cfg = AIMv2Config.from_name(f"aimv2-{size}-patch14-{res}")
    with torch.device("meta"):
        encoder = AIMv2Encoder(cfg.encoder)
    assert count_parameters(encoder) == EXACT[size][res_index]


def test_mlp_hidden_rule():
    assert [swiglu_hidden(d) for d in (1024, 1536, 2048, 3072)] == [2816, 4096, 5632, 8192]


def test_decoder_parameter_count():
    with torch.device("meta"):
        model = AIMv2(AIMv2Config.from_name("aimv2-large-patch14-224"))
    dec = model.decoder
    assert count_parameters(dec.trunk) == 154_166_272
    assert dec.text_embedding.weight.numel() == 32_768_000
    assert dec.text_pos_embed.numel() == 79_872 and dec.start_token.numel() == 1024
    assert count_parameters(dec.image_proj) == 1_049_600
    assert count_parameters(dec.pixel_head) + count_parameters(dec.text_head) == 33_370_112


def test_state_dict_matches_apple_layout():
    with torch.device("meta"):
        encoder = AIMv2Encoder(AIMv2Config.from_name("aimv2-large-patch14-224").encoder)
    sd = encoder.state_dict()
    assert len(sd) == 173
    d, h = 1024, 2816
    expected = {
        "preprocessor.patchifier.proj.weight": (d, 3, 14, 14), "preprocessor.patchifier.proj.bias": (d,),
        "preprocessor.patchifier.norm.weight": (d,), "preprocessor.pos_embed": (1, 256, d),
        "trunk.blocks.0.norm_1.weight": (d,), "trunk.blocks.23.attn.qkv.weight": (3 * d, d),
        "trunk.blocks.5.attn.proj.weight": (d, d), "trunk.blocks.5.norm_2.weight": (d,),
        "trunk.blocks.5.mlp.fc1.weight": (h, d), "trunk.blocks.5.mlp.fc3.weight": (h, d),
        "trunk.blocks.5.mlp.fc2.weight": (d, h), "trunk.post_trunk_norm.weight": (d,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key


def test_presets_exist():
    for size in ("large", "huge", "1B", "3B"):
        for res in (224, 336, 448):
            assert f"aimv2-{size}-patch14-{res}" in PRESETS
    assert AIMv2Config.from_name("aimv2-large-patch14-448").encoder.num_patches == 1024
    with pytest.raises(ValueError, match="preset"):
        AIMv2Config.from_name("aimv2-giant")


@pytest.fixture
def tiny():
    return AIMv2(AIMv2Config.from_name("aimv2-tiny")).eval()


def _batch(model, b=3):
    cfg = model.cfg
    images = torch.randn(b, 3, cfg.encoder.image_size, cfg.encoder.image_size)
    tokens = torch.randint(3, cfg.decoder.vocab_size, (b, cfg.decoder.context_length))
    tokens[:, -5:] = cfg.decoder.pad_id
    return images, tokens


def test_forward_shapes_and_loss_weights(tiny):
    images, tokens = _batch(tiny)
    n = tiny.cfg.encoder.num_patches
    assert tiny.encoder(images).shape == (3, n, tiny.cfg.encoder.dim)
    out = tiny(images, tokens, prefix_lens=torch.tensor([1, 5, n - 1]))
    torch.testing.assert_close(out.loss, out.loss_txt + 0.4 * out.loss_img)
    assert out.loss.dim() == 0 and out.loss_img.dtype == torch.float32


def test_losses_follow_the_shifts(tiny):
    """Recompute both losses by hand from the decoder states: next-patch and next-token targets."""
    images, tokens = _batch(tiny)
    cfg = tiny.cfg
    n, t, p = cfg.encoder.num_patches, cfg.decoder.context_length, cfg.encoder.patch_size
    lens = torch.tensor([1, 4, n - 1])
    out = tiny(images, tokens, prefix_lens=lens)
    hidden = tiny.decoder(tiny.encoder(images, lens), tokens)
    assert hidden.shape[1] == n + 1 + t
    # Pixels: decoder position i predicts patch i + 1, counted only for patches j >= M.
    pred = tiny.decoder.pixel_head(hidden[:, : n - 1])
    manual = patch_mse_loss(pred, images, p, lens, target_offset=1, reduction="none", backend="reference")
    counted = (torch.arange(1, n)[None] >= lens[:, None])
    torch.testing.assert_close(out.loss_img, manual.sum() / counted.sum())
    # Text: the start token predicts caption token 0; pad ids are ignored.
    logits = tiny.decoder.text_head(hidden[:, n: n + t])
    manual_txt = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                                 ignore_index=cfg.decoder.pad_id)
    torch.testing.assert_close(out.loss_txt, manual_txt)


def test_encoder_prefix_mask_and_inference_bidirectional(tiny):
    """Patch j influences patch i iff j <= i or j < M; without prefix_lens the encoder is bidirectional."""
    enc = tiny.encoder.double()
    n, p = tiny.cfg.encoder.num_patches, tiny.cfg.encoder.patch_size
    images = torch.randn(1, 3, 56, 56, dtype=torch.float64)
    m = 5
    changed = images.clone()
    changed[..., 14:28, 28:42] += 1.0  # patch (1, 2) -> token 6 in raster order (grid 4x4)
    j = 6
    base, moved = enc(images, torch.tensor([m])), enc(changed, torch.tensor([m]))
    diff = (base - moved).abs().amax(-1)[0]
    assert torch.all(diff[:j] < 1e-12) and torch.all(diff[j:] > 0)  # causal past the prefix
    base, moved = enc(images, torch.tensor([8])), enc(changed, torch.tensor([8]))
    diff = (base - moved).abs().amax(-1)[0]
    assert torch.all(diff > 0)  # j < M: every token sees it
    full = (enc(images) - enc(changed)).abs().amax(-1)[0]
    assert torch.all(full > 0) and n == 16 and p == 14


def test_decoder_is_causal(tiny):
    images, tokens = _batch(tiny, b=1)
    feats = tiny.encoder(images)
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 259
    n = tiny.cfg.encoder.num_patches
    a, b = tiny.decoder(feats, tokens), tiny.decoder(feats, changed)
    diff = (a - b).abs().amax(-1)[0]
    assert torch.all(diff[: n + 1 + 10] == 0) and diff[n + 1 + 10] > 0


def test_training_mode_draws_prefix_per_sample():
    model = AIMv2(AIMv2Config.from_name("aimv2-tiny")).train()
    images, tokens = _batch(model, b=64)
    out = model(images, tokens)
    n = model.cfg.encoder.num_patches
    assert out.prefix_lens.shape == (64,)
    assert out.prefix_lens.min() >= 1 and out.prefix_lens.max() <= n - 1
    assert len(set(out.prefix_lens.tolist())) > 3


def test_initialisation():
    cfg = AIMv2Config.from_name("aimv2-tiny")
    torch.manual_seed(1)
    model = AIMv2(cfg)
    enc, dec = model.encoder, model.decoder
    qkv = enc.trunk.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))  # xavier-uniform
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    conv = enc.preprocessor.patchifier.proj.weight
    conv_bound = math.sqrt(6 / (conv.shape[0] + conv[0].numel()))
    assert conv.abs().max() <= conv_bound and conv.abs().max() > 0.9 * conv_bound
    assert abs(enc.preprocessor.pos_embed.std().item() - 0.02) < 0.004
    assert abs(dec.text_pos_embed.std().item() - 0.01) < 0.002
    assert abs(dec.text_embedding.weight.std().item() - 0.02) < 0.003
    head = dec.text_head.weight
    std = math.sqrt(1 / (1 + cfg.decoder.depth) / head.shape[1])
    assert abs(head.std().item() - std) < 0.1 * std and head.abs().max() <= 2 * std / 0.8796 + 1e-6
    for norm in (enc.trunk.post_trunk_norm, dec.trunk.blocks[0].norm_1, enc.preprocessor.patchifier.norm):
        assert torch.all(norm.weight == 1)


def test_sincos_layout():
    pos = sincos_pos_embed(3, 5, 8, dtype=torch.float64)  # D/4 = 2 frequencies: 1 and 1/100
    t = 1 * 5 + 3  # row 1, column 3
    expected = [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03),
                math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    torch.testing.assert_close(pos[t], torch.tensor(expected, dtype=torch.float64))


def test_native_encoder_runs_at_other_resolutions():
    cfg = AIMv2Config.from_name("aimv2-tiny").encoder
    cfg.pos_embed = "sincos"
    enc = AIMv2Encoder(cfg)
    enc.init_weights()
    assert "preprocessor.pos_embed" not in enc.state_dict()
    assert enc(torch.randn(1, 3, 42, 70)).shape == (1, 15, cfg.dim)


def test_learned_pos_embed_is_resized_bicubically(tiny):
    """Another resolution resizes the learned table on its 2-D grid; the native grid uses it unchanged."""
    from aimv2.layers import resize_pos_embed
    pos = tiny.encoder.preprocessor.pos_embed  # (1, 16, D): a 4x4 grid at 56 px
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos
    big = resize_pos_embed(pos, (4, 4), (5, 7))
    grid = pos.detach().reshape(1, 4, 4, -1).permute(0, 3, 1, 2).double()
    want = torch.nn.functional.interpolate(grid, size=(5, 7), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(big.detach().double(), want.permute(0, 2, 3, 1).reshape(1, 35, -1),
                               rtol=0, atol=1e-6)
    # a constant table stays constant (bicubic weights sum to one)
    const = torch.full((1, 16, 3), 0.7)
    torch.testing.assert_close(resize_pos_embed(const, (4, 4), (6, 6)), torch.full((1, 36, 3), 0.7))
    tiny.eval()
    assert tiny.encoder(torch.randn(2, 3, 70, 98)).shape == (2, 35, tiny.cfg.encoder.dim)
    with pytest.raises(ValueError, match="pos_embed"):
        resize_pos_embed(pos, (3, 3), (4, 4))


def test_encoder_rejects_bad_images(tiny):
    with pytest.raises(ValueError, match="images"):
        tiny.encoder(torch.randn(1, 3, 71, 71))
    with pytest.raises(ValueError, match="images"):
        tiny.encoder(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match="tokens"):
        tiny(torch.randn(1, 3, 56, 56), torch.zeros(1, 5, dtype=torch.long))
