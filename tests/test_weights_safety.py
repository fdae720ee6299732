"""Released-weights loading on hostile or corrupt files: config.json fields type- and range-checked before anything
is built (WeightsError naming the file and the field), shard indexes confined to the checkpoint folder, and a
Hypothesis fuzz of the config.json reader."""
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimv2.config import EncoderConfig
from aimv2.layouts import MAX_DEPTH, MAX_DIM, MAX_IMAGE_SIZE, WeightsError, _spec_from_json
from aimv2.model import AIMv2Encoder
from aimv2.pretrained import load_pretrained_encoder, save_encoder

TINY = dict(image_size=56, patch_size=14, dim=64, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny encoder saved in each layout: {layout: folder}."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    enc = AIMv2Encoder(EncoderConfig(**TINY), backend="reference")
    return {layout: save_encoder(enc, root / layout, layout) for layout in ("hf", "apple", "timm")}


def _with_config(src, dst, edit):
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


BAD_HF_FIELDS = [
    ("num_hidden_layers", 10_000_000), ("num_hidden_layers", MAX_DEPTH + 1), ("num_hidden_layers", 0),
    ("hidden_size", MAX_DIM * 2), ("hidden_size", -64), ("hidden_size", "64"), ("hidden_size", True),
    ("hidden_size", 64.5), ("hidden_size", None), ("hidden_size", [64]),
    ("num_attention_heads", 3), ("num_attention_heads", 0),
    ("intermediate_size", 0), ("num_channels", 0), ("num_channels", 10 ** 40),
    ("image_size", 0), ("image_size", MAX_IMAGE_SIZE + 14), ("image_size", [56, 28]), ("image_size", 50),
    ("patch_size", 0), ("patch_size", -14), ("patch_size", [14, 7]),
    ("rms_norm_eps", math.nan), ("rms_norm_eps", -1e-5), ("rms_norm_eps", 0), ("rms_norm_eps", math.inf),
    ("rms_norm_eps", "1e-5"), ("rms_norm_eps", 2.0), ("is_native", "yes"),
]


@pytest.mark.parametrize("field,value", BAD_HF_FIELDS)
def test_bad_config_fields_are_refused_naming_file_and_field(saved, tmp_path, field, value):
    folder = _with_config(saved["hf"], tmp_path / "bad", lambda c: c.__setitem__(field, value))
    with pytest.raises(WeightsError, match=field) as info:
        load_pretrained_encoder(folder)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("field,value", [("embed_dim", 0), ("depth", 10 ** 7), ("mlp_ratio", math.nan),
                                         ("mlp_ratio", -4.0), ("patch_size", 0), ("img_size", "big"),
                                         ("num_heads", 5), ("in_chans", False)])
def test_bad_timm_fields_are_refused(saved, tmp_path, field, value):
    folder = _with_config(saved["timm"], tmp_path / "bad", lambda c: c["model_args"].__setitem__(field, value))
    with pytest.raises(WeightsError, match=f"model_args.{field}|embed_dim|num_heads") as info:
        load_pretrained_encoder(folder)
    assert "config.json" in str(info.value)


def test_the_apple_config_is_checked_too(saved, tmp_path):
    folder = _with_config(saved["apple"], tmp_path / "bad", lambda c: c.__setitem__("patch_size", 0))
    with pytest.raises(WeightsError, match="patch_size"):
        load_pretrained_encoder(folder)


def test_unreadable_json_values(saved, tmp_path):
    folder = _with_config(saved["hf"], tmp_path / "bad", lambda c: None)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"hidden_size": 64', '"hidden_size": ' + "9" * 5000))
    with pytest.raises(WeightsError, match="config.json"):
        load_pretrained_encoder(folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(WeightsError, match="config.json"):
        load_pretrained_encoder(folder)


def test_a_huge_block_index_in_a_bare_file_is_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(saved["apple"] / "model.safetensors"))
    sd["trunk.blocks.9999999.norm_1.weight"] = torch.ones(64)
    save_file(sd, str(tmp_path / "bare.safetensors"))
    with pytest.raises(WeightsError, match="depth"):
        load_pretrained_encoder(tmp_path / "bare.safetensors", config=EncoderConfig(**TINY))


def test_a_too_large_image_size_argument(saved):
    with pytest.raises(ValueError, match="image_size"):
        load_pretrained_encoder(saved["hf"], image_size=MAX_IMAGE_SIZE + 14)


def test_valid_configs_still_load(saved):
    for folder in saved.values():
        assert load_pretrained_encoder(folder).cfg == EncoderConfig(**TINY)


# -------------------------------------------------------------------------------------------------------------
# Sharded checkpoints: the index may only name files inside the checkpoint folder
# -------------------------------------------------------------------------------------------------------------

def _sharded(saved, folder, shard_name):
    from safetensors.torch import load_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text((saved["hf"] / "config.json").read_text())
    keys = load_file(str(saved["hf"] / "model.safetensors")).keys()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard_name for k in keys}}))
    return folder


def test_a_shard_inside_the_folder_loads(saved, tmp_path):
    folder = _sharded(saved, tmp_path / "ckpt", "sub/shard-1.safetensors")
    (folder / "sub").mkdir()
    (folder / "sub" / "shard-1.safetensors").write_bytes((saved["hf"] / "model.safetensors").read_bytes())
    assert load_pretrained_encoder(folder).cfg == EncoderConfig(**TINY)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "..\\outside.safetensors",
                                   "ABSOLUTE", "", ".", 7, None])
def test_shards_outside_the_folder_are_refused(saved, tmp_path, shard):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((saved["hf"] / "model.safetensors").read_bytes())
    folder = _sharded(saved, tmp_path / "ckpt", str(outside) if shard == "ABSOLUTE" else shard)
    with pytest.raises(WeightsError, match="shard"):
        load_pretrained_encoder(folder)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_a_symlink_out_of_the_folder_is_refused(saved, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((saved["hf"] / "model.safetensors").read_bytes())
    folder = _sharded(saved, tmp_path / "ckpt", "shard.safetensors")
    (folder / "shard.safetensors").symlink_to(outside)
    with pytest.raises(WeightsError, match="outside the checkpoint folder"):
        load_pretrained_encoder(folder)
    (folder / "shard.safetensors").unlink()  # a symlink inside the folder is fine
    (folder / "real.safetensors").write_bytes(outside.read_bytes())
    (folder / "shard.safetensors").symlink_to(folder / "real.safetensors")
    assert load_pretrained_encoder(folder).cfg == EncoderConfig(**TINY)


# -------------------------------------------------------------------------------------------------------------
# Fuzz: the config.json reader only ever succeeds (with a sane spec) or raises WeightsError
# -------------------------------------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                     st.sampled_from([0, 1, 2, 3, 14, 56, 64, 128, 224, 1024, 10 ** 7, 1e-5, -1e-5, 0.5]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=6)
_HF_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "rms_norm_eps", "is_native", "model_type", "hidden_act", "qkv_bias",
            "vision_config"]
_TIMM_KEYS = ["architecture", "model_args", "pretrained_cfg"]
_ARGS_KEYS = ["embed_dim", "depth", "num_heads", "in_chans", "patch_size", "img_size", "mlp_ratio", "act_layer"]
_hf_configs = st.dictionaries(st.sampled_from(_HF_KEYS), _values, max_size=len(_HF_KEYS))
_timm_configs = st.fixed_dictionaries(
    {"architecture": st.one_of(st.sampled_from(["aimv2_large_patch14_224", "aimv2_huge_patch0_0",
                                                "aimv2_1b_patch99999999_224", "vit_base"]), _values)},
    optional={"model_args": st.one_of(st.dictionaries(st.sampled_from(_ARGS_KEYS), _values), _values),
              "pretrained_cfg": st.one_of(st.fixed_dictionaries({"input_size": st.lists(_scalars, max_size=4)}),
                                          _values)})
_configs = st.one_of(_hf_configs, _timm_configs, st.builds(lambda v: {"vision_config": v}, _hf_configs),
                     st.dictionaries(st.text(max_size=10), _values, max_size=4))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=_configs, layout=st.sampled_from([None, "hf", "apple", "timm"]))
def test_fuzz_config_reader(config, layout):
    try:
        spec = _spec_from_json(config, layout, "fuzz/config.json")
    except WeightsError as exc:
        assert "fuzz/config.json" in str(exc)
        return
    for field in ("dim", "depth", "num_heads", "mlp_hidden", "in_chans", "image_size", "patch_size"):
        if field in spec:
            assert isinstance(spec[field], int) and not isinstance(spec[field], bool) and spec[field] >= 1
    assert spec["depth"] <= MAX_DEPTH if "depth" in spec else True
    if "norm_eps" in spec:
        assert math.isfinite(spec["norm_eps"]) and spec["norm_eps"] > 0
    if "dim" in spec and "num_heads" in spec:
        assert spec["dim"] % spec["num_heads"] == 0
