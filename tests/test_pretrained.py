"""aimv2.pretrained: the three released key layouts, strict loading, resizing, and parity with transformers.

All models are tiny (width 64-256, 2 blocks); nothing touches the network. The transformers tests build a random
``Aimv2VisionModel``, save it with ``save_pretrained`` and load it with ``AIMv2Encoder.from_pretrained``.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from aimv2.config import AIMv2Config, EncoderConfig, swiglu_hidden
from aimv2.layers import resize_pos_embed, sincos_pos_embed
from aimv2.model import AIMv2Encoder
from aimv2.pretrained import CheckpointMismatchError, load_pretrained_encoder, save_encoder
from aimv2_kernels.testing import assert_within_budget, max_abs_err

TINY = dict(image_size=56, patch_size=14, dim=64, depth=2, num_heads=2)  # the aimv2-tiny preset's encoder
D, HID = 64, swiglu_hidden(64)

# The key sets of docs/aimv2-reference.md §5, written out by hand (not derived from aimv2.pretrained's tables).
_BLOCK_KEYS = {
    "apple": ("norm_1.weight", "attn.qkv.weight", "attn.proj.weight", "norm_2.weight", "mlp.fc1.weight",
              "mlp.fc2.weight", "mlp.fc3.weight"),
    "hf": ("rms_norm1.weight", "attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight",
           "attention.out_proj.weight", "rms_norm2.weight", "ffn.gate_proj.weight", "ffn.up_proj.weight",
           "ffn.down_proj.weight"),
    "timm": ("norm1.weight", "attn.qkv.weight", "attn.proj.weight", "norm2.weight", "mlp.fc1_g.weight",
             "mlp.fc1_x.weight", "mlp.fc2.weight"),
}
_BLOCK_PREFIX = {"apple": "trunk.blocks.{}.", "hf": "encoder.layers.{}.", "timm": "blocks.{}."}
_TOP_KEYS = {
    "apple": ("preprocessor.patchifier.proj.weight", "preprocessor.patchifier.proj.bias",
              "preprocessor.patchifier.norm.weight", "trunk.post_trunk_norm.weight"),
    "hf": ("embeddings.patch_embed.weight", "embeddings.patch_embed.bias", "embeddings.rms_norm.weight",
           "rms_norm.weight"),
    "timm": ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "norm.weight"),
}
_POS_KEY = {"apple": "preprocessor.pos_embed", "hf": "embeddings.position_embedding.weight", "timm": "pos_embed"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast alone and far faster on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _expected_keys(layout: str, depth: int, learned: bool) -> set[str]:
    keys = set(_TOP_KEYS[layout]) | {_BLOCK_PREFIX[layout].format(i) + k for i in range(depth)
                                     for k in _BLOCK_KEYS[layout]}
    return keys | {_POS_KEY[layout]} if learned else keys


def _random_encoder(pos_embed: str = "learned", seed: int = 0, **overrides) -> AIMv2Encoder:
    """A tiny encoder with random weights; norm scales moved away from 1 and a non-zero conv bias."""
    torch.manual_seed(seed)
    enc = AIMv2Encoder(EncoderConfig(**{**TINY, **overrides, "pos_embed": pos_embed}), backend="reference")
    enc.init_weights()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return enc.eval()


def _images(b=2, h=56, w=56, seed=123, dtype=torch.float32):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_same_weights(a: AIMv2Encoder, b: AIMv2Encoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype == torch.float32 and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


def _edit(folder, fn) -> None:
    """Rewrite folder/model.safetensors with ``fn(tensors)``."""
    tensors = load_file(str(folder / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(folder, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
@pytest.mark.parametrize("layout", ["hf", "apple", "timm"])
def test_round_trip(tmp_path, layout, pos_embed):
    enc = _random_encoder(pos_embed)
    if layout == "timm" and pos_embed == "sincos":
        with pytest.raises(ValueError, match="timm"):  # timm has no sin-cos AIMv2: refused, never silently lost
            save_encoder(enc, tmp_path, layout)
        return
    save_encoder(enc, tmp_path, layout)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == _expected_keys(layout, 2, pos_embed == "learned")

    # The mapping, tensor by tensor: qkv = [q; k; v], fc1 = gate, fc3 = up, fc2 = down, HF pos table [N, D].
    ours = enc.state_dict()
    qkv, fc1, fc2, fc3 = (ours[f"trunk.blocks.1.{k}"] for k in ("attn.qkv.weight", "mlp.fc1.weight",
                                                                "mlp.fc2.weight", "mlp.fc3.weight"))
    if layout == "hf":
        pre = "encoder.layers.1."
        for i, name in enumerate("qkv"):
            assert torch.equal(tensors[pre + f"attention.{name}_proj.weight"], qkv[i * D:(i + 1) * D])
        assert torch.equal(tensors[pre + "ffn.gate_proj.weight"], fc1)
        assert torch.equal(tensors[pre + "ffn.up_proj.weight"], fc3)
        assert torch.equal(tensors[pre + "ffn.down_proj.weight"], fc2)
        if pos_embed == "learned":
            assert torch.equal(tensors["embeddings.position_embedding.weight"], ours["preprocessor.pos_embed"][0])
    elif layout == "timm":
        assert torch.equal(tensors["blocks.1.mlp.fc1_g.weight"], fc1)
        assert torch.equal(tensors["blocks.1.mlp.fc1_x.weight"], fc3)
        assert torch.equal(tensors["blocks.1.attn.qkv.weight"], qkv)
    config = json.loads((tmp_path / "config.json").read_text())
    expected_type = {"hf": "aimv2_vision_model", "apple": "aimv2", "timm": None}[layout]
    assert config.get("model_type") == expected_type

    loaded = AIMv2Encoder.from_pretrained(tmp_path, backend="reference")
    assert not loaded.training and loaded.cfg == enc.cfg
    assert next(loaded.parameters()).device.type == "cpu"
    _assert_same_weights(loaded, enc)
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), enc(x))


def test_load_is_fp32_and_other_files(tmp_path):
    """A bf16 export loads as fp32; pytorch_model.bin folders, sharded indexes and bare files load too."""
    enc = _random_encoder()
    save_encoder(copy.deepcopy(enc).to(torch.bfloat16), tmp_path / "bf16", "hf")
    loaded = load_pretrained_encoder(tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.trunk.post_trunk_norm.weight, enc.trunk.post_trunk_norm.weight.bfloat16().float())

    save_encoder(enc, tmp_path / "hf", "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    # pytorch_model.bin (wrapped in a training checkpoint's {"state_dict": ...}) + config.json
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save({"state_dict": tensors, "step": 3}, tmp_path / "bin" / "pytorch_model.bin")
    _assert_same_weights(load_pretrained_encoder(tmp_path / "bin"), enc)
    # A sharded safetensors checkpoint
    shard = tmp_path / "shard"
    shard.mkdir()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(shard / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shard / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    _assert_same_weights(load_pretrained_encoder(shard), enc)

    # Bare files: the shape comes from the tensors; num_heads from config= (dim 64 is not a multiple of 128).
    bare = tmp_path / "hf" / "model.safetensors"
    with pytest.raises(ValueError, match="num_heads"):
        load_pretrained_encoder(bare)
    _assert_same_weights(load_pretrained_encoder(bare, config="aimv2-tiny"), enc)
    torch.save(enc.state_dict(), tmp_path / "apple.pth")
    _assert_same_weights(load_pretrained_encoder(tmp_path / "apple.pth", config=EncoderConfig(**TINY)), enc)
    # ... or from AIMv2's head_dim 128 when the width allows it
    wide = _random_encoder(dim=256)
    save_encoder(wide, tmp_path / "wide", "timm")
    got = load_pretrained_encoder(tmp_path / "wide" / "model.safetensors")
    assert got.cfg == wide.cfg
    _assert_same_weights(got, wide)
    # A bare file without a position embedding is the native (sin-cos) model
    native = _random_encoder("sincos")
    save_file(native.state_dict(), str(tmp_path / "native.safetensors"))
    _assert_same_weights(load_pretrained_encoder(tmp_path / "native.safetensors", config=native.cfg), native)
    with pytest.raises(ValueError, match="pos_embed sincos in the checkpoint vs learned in preset 'aimv2-tiny'"):
        load_pretrained_encoder(tmp_path / "native.safetensors", config="aimv2-tiny")


def test_lit_prefixes_and_heads(tmp_path):
    """vision_model. / image_encoder. prefixes: the other towers are skipped, the pooling head needs drop_head."""
    enc = _random_encoder()
    save_encoder(enc, tmp_path / "hf", "hf")
    save_encoder(enc, tmp_path / "apple", "apple")
    for layout, prefix, others in (("hf", "vision_model.", ("text_model.embeddings.token_embedding.weight",
                                                             "visual_projection.weight", "logit_scale")),
                                   ("apple", "image_encoder.", ("text_encoder.trunk.post_trunk_norm.weight",
                                                                "image_projector.weight", "log_logit_scale"))):
        folder = tmp_path / f"lit-{layout}"
        folder.mkdir()
        tensors = {prefix + k: v for k, v in load_file(str(tmp_path / layout / "model.safetensors")).items()}
        tensors.update({k: torch.zeros(3) for k in others})
        tensors.update({prefix + "head.cls_token": torch.zeros(1, 1, D),
                        prefix + "head.k_proj.weight": torch.zeros(D, D)})
        save_file(tensors, str(folder / "model.safetensors"))
        vision = json.loads((tmp_path / layout / "config.json").read_text())
        config = {"model_type": "aimv2", "vision_config": vision, "text_config": {}} if layout == "hf" else vision
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"head.*drop_head=True") as err:
            load_pretrained_encoder(folder)
        assert prefix + "head.cls_token" in str(err.value)
        _assert_same_weights(load_pretrained_encoder(folder, drop_head=True), enc)
        # A key outside the tower that belongs to no known tower is unexpected
        _edit(folder, lambda t: t.update({"stray.weight": torch.zeros(2)}))
        with pytest.raises(CheckpointMismatchError, match="stray.weight"):
            load_pretrained_encoder(folder, drop_head=True)


# ---------------------------------------------------------------------------------------------------------
# Strictness and errors
# ---------------------------------------------------------------------------------------------------------

def test_strict_keys_and_shapes(tmp_path):
    save_encoder(_random_encoder(), tmp_path, "hf")
    pristine = load_file(str(tmp_path / "model.safetensors"))

    def restore(t):
        t.clear()
        t.update(pristine)

    _edit(tmp_path, lambda t: t.update({"encoder.layers.0.attention.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected key \(encoder\.layers\.0\.attention\.extra"):
        load_pretrained_encoder(tmp_path)

    _edit(tmp_path, restore)
    _edit(tmp_path, lambda t: t.pop("encoder.layers.1.attention.k_proj.weight"))
    with pytest.raises(ValueError, match=r"1 missing key \(encoder\.layers\.1\.attention\.k_proj\.weight\)") as err:
        load_pretrained_encoder(tmp_path)
    assert err.value.missing == ["encoder.layers.1.attention.k_proj.weight"] and not err.value.unexpected

    _edit(tmp_path, restore)
    _edit(tmp_path, lambda t: t.update({"encoder.layers.0.ffn.up_proj.weight": torch.zeros(HID, D - 4)}))
    with pytest.raises(CheckpointMismatchError,
                       match=rf"shape mismatch \(encoder\.layers\.0\.ffn\.up_proj\.weight: \[{HID}, {D - 4}\] in the "
                             rf"file vs \[{HID}, {D}\] expected\)"):
        load_pretrained_encoder(tmp_path)

    # Many keys: the first few of each kind are shown, with the counts
    _edit(tmp_path, restore)
    _edit(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.layers.1.")]
          + [t.update({f"junk.{i}": torch.zeros(1)}) for i in range(7)])
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained_encoder(tmp_path)
    msg = str(err.value)
    assert "9 missing keys" in msg and "4 more" in msg and "7 unexpected keys (junk.0" in msg and "2 more" in msg
    assert len(err.value.missing) == 9 and len(err.value.unexpected) == 7 and "\n" not in msg

    # With a config.json even the tensors the shape is read from are plain missing keys
    _edit(tmp_path, restore)
    _edit(tmp_path, lambda t: t.pop("embeddings.patch_embed.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key \(embeddings\.patch_embed\.weight\)"):
        load_pretrained_encoder(tmp_path)
    with pytest.raises(ValueError, match="cannot infer the encoder's shape"):
        load_pretrained_encoder(tmp_path / "model.safetensors")  # a bare file has nothing else to go by

    # A config.json that disagrees with the tensors is a shape mismatch too
    _edit(tmp_path, restore)
    _edit_config(tmp_path, lambda c: c.update(image_size=84))
    with pytest.raises(CheckpointMismatchError, match="embeddings.position_embedding.weight: \\[16, 64\\]"):
        load_pretrained_encoder(tmp_path)
    # and so is a learned-position config with the table missing (never silently read as sin-cos)
    _edit_config(tmp_path, lambda c: c.update(image_size=56))
    _edit(tmp_path, lambda t: t.pop("embeddings.position_embedding.weight"))
    with pytest.raises(CheckpointMismatchError, match="1 missing key \\(embeddings.position_embedding.weight\\)"):
        load_pretrained_encoder(tmp_path)


def test_config_mismatch_is_refused_naming_the_field(tmp_path):
    save_encoder(_random_encoder(), tmp_path, "apple")
    assert load_pretrained_encoder(tmp_path, config="aimv2-tiny").cfg == EncoderConfig(**TINY)
    with pytest.raises(ValueError, match=r"dim 64 in the checkpoint vs 128 in preset 'aimv2-demo'") as err:
        load_pretrained_encoder(tmp_path, config="aimv2-demo")
    msg = str(err.value)
    assert "image_size 56 in the checkpoint vs 112" in msg and "depth 2 in the checkpoint vs 4" in msg
    with pytest.raises(ValueError, match=r"num_heads 2 in the checkpoint vs 4 in the given config"):
        load_pretrained_encoder(tmp_path, config=EncoderConfig(**{**TINY, "num_heads": 4}))
    with pytest.raises(ValueError, match=r"pos_embed learned in the checkpoint vs sincos"):
        load_pretrained_encoder(tmp_path, config=EncoderConfig(**{**TINY, "pos_embed": "sincos"}))
    with pytest.raises(ValueError, match=r"dim 64 in the checkpoint vs 1024 in preset 'aimv2-large-patch14-224'"):
        load_pretrained_encoder(tmp_path, config="aimv2-large-patch14-224")
    # The size asked for with image_size= is what the config must have
    at_112 = EncoderConfig(**{**TINY, "image_size": 112})
    assert load_pretrained_encoder(tmp_path, image_size=112, config=at_112).cfg == at_112
    with pytest.raises(ValueError, match=r"image_size 84 requested vs 112 in the given config"):
        load_pretrained_encoder(tmp_path, image_size=84, config=at_112)
    assert load_pretrained_encoder(tmp_path, config=AIMv2Config.from_name("aimv2-tiny")).cfg.dim == 64
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_pretrained_encoder(tmp_path, config="nope")
    with pytest.raises(TypeError, match="config must be"):
        load_pretrained_encoder(tmp_path, config=3)


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_encoder_shapes_table_is_the_model(pos_embed):
    """aimv2.layouts knows the encoder's keys and shapes without importing the model: they must agree."""
    from aimv2.layouts import encoder_shapes

    cfg = EncoderConfig(**{**TINY, "depth": 3, "pos_embed": pos_embed})
    with torch.device("meta"):
        sd = AIMv2Encoder(cfg, backend="reference").state_dict()
    assert list(encoder_shapes(cfg).items()) == [(k, tuple(v.shape)) for k, v in sd.items()]


def test_a_training_run_is_refused_naming_the_loader(tmp_path):
    """aimv2-train's output (checkpoints/step_*/state.pt) is not released weights: the error names the function
    that loads it."""
    from aimv2.pretrained import is_training_run

    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    (step / "dcp").mkdir(parents=True)
    (step / "state.pt").write_bytes(b"")
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", step, step / "state.pt"):
        assert is_training_run(path), path
        with pytest.raises(ValueError, match=r"training run.*aimv2\.checkpoint\.load_trained_encoder"):
            AIMv2Encoder.from_pretrained(path)
    save_encoder(_random_encoder(), tmp_path / "released", "hf")
    assert not is_training_run(tmp_path / "released")
    assert not is_training_run(tmp_path / "released" / "model.safetensors")


def test_path_and_argument_errors(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError) as err:
        AIMv2Encoder.from_pretrained(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained_encoder(tmp_path)  # a folder without weights
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors") as err:
        load_pretrained_encoder(tmp_path / "broken.safetensors")
    assert "\n" not in str(err.value)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="weights.txt"):
        load_pretrained_encoder(tmp_path / "weights.txt")
    with pytest.raises(TypeError, match="path"):
        load_pretrained_encoder(3)

    save_encoder(_random_encoder(), tmp_path / "ok", "hf")
    with pytest.raises(ValueError, match="backend"):
        load_pretrained_encoder(tmp_path / "ok", backend="gpu")
    with pytest.raises(TypeError, match="image_size"):
        load_pretrained_encoder(tmp_path / "ok", image_size=84.0)
    with pytest.raises(ValueError, match="image_size"):
        load_pretrained_encoder(tmp_path / "ok", image_size=50)  # not a multiple of 14
    with pytest.raises(ValueError, match="layout"):
        save_encoder(_random_encoder(), tmp_path / "x", "onnx")
    with pytest.raises(TypeError, match="AIMv2Encoder"):
        save_encoder(torch.nn.Linear(2, 2), tmp_path / "x")
    (tmp_path / "ok" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained_encoder(tmp_path / "ok")


def test_biases_are_refused(tmp_path):
    save_encoder(_random_encoder(), tmp_path, "hf")
    _edit_config(tmp_path, lambda c: c.update(qkv_bias=True))
    with pytest.raises(ValueError, match="qkv_bias=True"):
        load_pretrained_encoder(tmp_path)
    _edit_config(tmp_path, lambda c: c.update(qkv_bias=False))
    _edit(tmp_path, lambda t: t.update({"encoder.layers.0.ffn.up_proj.bias": torch.zeros(HID)}))
    with pytest.raises(ValueError, match=r"bias tensors \(encoder\.layers\.0\.ffn\.up_proj\.bias\)"):
        load_pretrained_encoder(tmp_path)


def test_timm_config_without_model_args(tmp_path):
    """timm's Hub config.json names the architecture only: its size table gives the shape (checked strictly)."""
    save_encoder(_random_encoder(), tmp_path, "timm")
    _edit_config(tmp_path, lambda c: c.pop("model_args"))
    with pytest.raises(CheckpointMismatchError, match=r"dim=1024, depth=24, num_heads=8, mlp_hidden=2816"):
        load_pretrained_encoder(tmp_path)  # the tensors are tiny but the config says aimv2_large


# ---------------------------------------------------------------------------------------------------------
# Another resolution
# ---------------------------------------------------------------------------------------------------------

def test_image_size_resizes_learned_pos_embed_bicubically(tmp_path):
    enc = _random_encoder()
    save_encoder(enc, tmp_path, "hf")
    big = load_pretrained_encoder(tmp_path, image_size=84, backend="reference")
    assert big.cfg == EncoderConfig(**{**TINY, "image_size": 84})
    table = enc.preprocessor.pos_embed.detach()  # (1, 16, D) on a 4 x 4 grid
    grid = table.reshape(1, 4, 4, D).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)  # as timm
    want = want.permute(0, 2, 3, 1).reshape(1, 36, D)
    assert big.preprocessor.pos_embed.shape == (1, 36, D)
    assert torch.equal(big.preprocessor.pos_embed, want)
    assert torch.equal(big.preprocessor.pos_embed, resize_pos_embed(table, (4, 4), (6, 6)))
    x = _images(h=84, w=84)
    with torch.no_grad():  # the resize at load time is the one the 56-px encoder does on the fly
        assert torch.equal(big(x), enc(x))
    # A sin-cos checkpoint just changes its nominal size
    save_encoder(_random_encoder("sincos"), tmp_path / "native", "apple")
    assert load_pretrained_encoder(tmp_path / "native", image_size=112).cfg.image_size == 112


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers' Aimv2VisionModel
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from transformers.models.aimv2 import modeling_aimv2
    return modeling_aimv2


def _vision_config(**overrides) -> dict:
    """Width 256, 2 heads (head_dim 128), 2 layers, SwiGLU 768, 56 px."""
    return dict(hidden_size=256, intermediate_size=swiglu_hidden(256), num_hidden_layers=2, num_attention_heads=2,
                num_channels=3, image_size=56, patch_size=14, rms_norm_eps=1e-5, **overrides)


def _randomize(model):
    """Random weights that make every tensor matter; returns the model in eval mode."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))  # RMSNorm scales away from 1
            elif "position_embedding" in name:
                p.normal_(0, 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))  # fan-in scaled: non-trivial attention
            else:
                p.normal_(0, 0.1)
    return model.eval()


def _check_parity(ours: torch.Tensor, theirs: torch.Tensor, oracle: torch.Tensor, name: str) -> None:
    assert_within_budget(ours, theirs, oracle, name=name)
    # The budget is relative to transformers' own error, so it is only meaningful if transformers agrees with
    # the oracle at fp32 level (a wrong key mapping would be off by O(1)).
    assert max_abs_err(theirs, oracle) <= 1e-4 * oracle.abs().max().item(), name


@pytest.mark.parametrize("is_native", [False, True], ids=["learned", "native"])
def test_parity_with_transformers(tmp_path, hf, is_native):
    model = _randomize(hf.Aimv2VisionModel(hf.Aimv2VisionConfig(**_vision_config(use_head=False,
                                                                                 is_native=is_native))))
    model.save_pretrained(tmp_path / "hf")
    ref = AIMv2Encoder.from_pretrained(tmp_path / "hf", backend="reference")
    auto = AIMv2Encoder.from_pretrained(tmp_path / "hf")
    assert ref.cfg == EncoderConfig(image_size=56, patch_size=14, dim=256, depth=2, num_heads=2, mlp_hidden=768,
                                    pos_embed="sincos" if is_native else "learned")
    oracle_model = copy.deepcopy(ref).double()  # the float64 oracle: our encoder in float64 (reference ops)
    # And transformers loads our export of it back.
    save_encoder(ref, tmp_path / "ours", "hf")
    reloaded = hf.Aimv2VisionModel.from_pretrained(tmp_path / "ours").eval()
    shapes = [(56, 56), (42, 70)] if is_native else [(56, 56)]
    for h, w in shapes:
        x = _images(b=3, h=h, w=w, seed=h * w)
        with torch.no_grad():
            theirs = model(pixel_values=x).last_hidden_state
            oracle = oracle_model(x.double())
            assert oracle.shape == (3, (h // 14) * (w // 14), 256)
            _check_parity(ref(x), theirs, oracle, f"reference backend {h}x{w}")
            _check_parity(auto(x), theirs, oracle, f"default backend {h}x{w}")
            _check_parity(ref(x), reloaded(pixel_values=x).last_hidden_state, oracle, f"export {h}x{w}")


def test_sincos_matches_transformers(hf):
    h, w, dim = 3, 5, 64
    ours = sincos_pos_embed(h, w, dim, dtype=torch.float64)
    # The embedding transformers' native model adds: with a zero patch conv the embeddings module outputs it
    # exactly (RMSNorm of zero is zero).
    cfg = hf.Aimv2VisionConfig(hidden_size=dim, num_attention_heads=1, image_size=56, patch_size=14, is_native=True)
    emb = hf.Aimv2VisionEmbeddings(cfg)
    with torch.no_grad():
        emb.patch_embed.weight.zero_()
        emb.patch_embed.bias.zero_()
        added = emb(torch.zeros(1, 3, h * 14, w * 14))[0]
    torch.testing.assert_close(added, ours.float(), rtol=0, atol=1e-6)
    # The helper functions, under their names in either transformers version
    old = getattr(hf, "build_2d_sincos_position_embedding", None) or \
        getattr(hf.Aimv2VisionEmbeddings, "build_2d_sincos_position_embedding", None)
    if old is not None:  # returns the embedding as the model adds it
        theirs = old(h, w, embed_dim=dim).reshape(-1, dim)
        torch.testing.assert_close(theirs.double(), ours, rtol=0, atol=1e-6)
    new = getattr(hf, "build_2d_sinusoidal_position_embedding", None)
    if new is not None:  # canonical [sin_h | cos_h | sin_w | cos_w]: AIMv2's halves are swapped (column first)
        theirs = new(h, w, embed_dim=dim, dtype=torch.float64)
        torch.testing.assert_close(ours[:, : dim // 2], theirs[:, dim // 2:], rtol=0, atol=1e-12)
        torch.testing.assert_close(ours[:, dim // 2:], theirs[:, : dim // 2], rtol=0, atol=1e-12)
    if old is None and new is None:
        pytest.skip("this transformers has no standalone sin-cos helper (the module check above ran)")


def test_lit_model_from_transformers(tmp_path, hf):
    """transformers' Aimv2Model (LiT): the vision_model. tower loads (its pooling head only with drop_head)."""
    text = dict(vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1,
                max_position_embeddings=8, eos_token_id=1)
    model = _randomize(hf.Aimv2Model(hf.Aimv2Config(vision_config=_vision_config(use_head=True), text_config=text,
                                                    projection_dim=32)))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"vision_model\.head\.cls_token.*drop_head=True"):
        AIMv2Encoder.from_pretrained(tmp_path)
    ours = AIMv2Encoder.from_pretrained(tmp_path, drop_head=True, backend="reference")
    x = _images(b=2)
    with torch.no_grad():
        _check_parity(ours(x), model.vision_model(pixel_values=x).last_hidden_state,
                      copy.deepcopy(ours).double()(x.double()), "LiT vision tower")
