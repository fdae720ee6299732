"""The aimv2-base preset against Apple's definition (ml-aim's ``aimv2_base``: width 768, 12 blocks, 6 heads, SwiGLU
hidden 2048, patch 14, learned positions, no head)."""
import torch

from aimv2 import PRESETS, AIMv2Config, AIMv2Encoder, count_parameters


def apple_encoder_parameters(dim: int, depth: int, mlp: int, patches: int, patch: int = 14, chans: int = 3) -> int:
    """Parameters of Apple's AIMv2VisionEncoder, counted from its modules: the patch conv (weight and bias) and its
    RMSNorm, the learned position table, per block two RMSNorms, the fused qkv and the output projection (no
    biases) and the SwiGLU's three matrices, and the post-trunk RMSNorm."""
    patch_embed = dim * chans * patch * patch + dim + dim
    block = 2 * dim + 3 * dim * dim + dim * dim + 3 * dim * mlp
    return patch_embed + patches * dim + depth * block + dim


def test_the_count_formula_reproduces_the_published_large_count():
    assert apple_encoder_parameters(1024, 24, 2816, 256) == 309_197_824  # published for aimv2-large-patch14-224


def test_base_preset_matches_apples_definition():
    cfg = AIMv2Config.from_name("aimv2-base-patch14-224")
    enc = cfg.encoder
    assert (enc.dim, enc.depth, enc.num_heads, enc.mlp_hidden, enc.patch_size, enc.pos_embed) == \
        (768, 12, 6, 2048, 14, "learned")
    with torch.device("meta"):
        encoder = AIMv2Encoder(enc)
    assert count_parameters(encoder) == apple_encoder_parameters(768, 12, 2048, 256) == 85_603_584
    assert "aimv2-base-patch14-224" in PRESETS and cfg.decoder.vocab_size == 32_000
