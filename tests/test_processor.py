"""aimv2.processor: parity with transformers' CLIPImageProcessor (the released checkpoints' preprocessing) and
with the ml-aim evaluation transform, the geometry of both presets, the input types, preprocessor_config.json,
and save_encoder's export read back by transformers.AutoImageProcessor.

Images are fresh random noise with random shapes drawn over it; nothing touches the network.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from aimv2.config import EncoderConfig
from aimv2.model import AIMv2Encoder
from aimv2.pretrained import load_pretrained_encoder, save_encoder
from aimv2.processor import (
    CONFIG_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_CONFIG_BYTES,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AIMv2ImageProcessor,
    build_processor,
)

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")

CHANNELS = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "P": 1}
# (height, width): square, portrait, landscape, smaller than the crop, extreme aspect, odd sizes whose crop
# offsets differ between floor and round (259 - 224 = 35 = 3 mod 4), exactly the crop size.
SIZES = [(224, 224), (300, 200), (200, 331), (100, 50), (37, 413), (256, 259), (999, 225), (161, 97)]


def _image(seed: int, height: int, width: int, mode: str = "RGB") -> Image.Image:
    """Noise with random rectangles and ellipses over it, in ``mode`` (P: a random palette)."""
    rng = np.random.default_rng(seed)
    c = CHANNELS[mode]
    arr = rng.integers(0, 256, (height, width, c), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="LA" if mode == "LA" else None)
    if mode == "P":
        img = Image.fromarray(arr[..., 0]).convert("P")
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        fill = int(rng.integers(256)) if c == 1 else tuple(rng.integers(0, 256, c).tolist())
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=fill)
    return img


def _clip_class():
    """transformers' slow (PIL-based) CLIPImageProcessor: ``CLIPImageProcessorPil`` from transformers 5 (there
    ``CLIPImageProcessor`` is the torchvision one, falling back to it without torchvision), before that
    ``CLIPImageProcessor`` itself."""
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _clip_reference(image_size: int):
    """transformers' slow CLIPImageProcessor with the released checkpoints' preprocessor_config values."""
    return _clip_class()(do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
               crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
               do_convert_rgb=True)


def _composites_alpha() -> bool:
    """Whether this transformers composites transparency onto white when converting to RGB, as our processor and
    aimv2.data do (transformers 5.2x). Older versions (5.17, the GPU image's) drop the alpha channel instead, so
    for them only opaque modes can be compared."""
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    try:
        out = convert_to_rgb(clear, return_numpy=True)
    except TypeError:  # the older signature: a PIL image back
        out = convert_to_rgb(clear)
    return tuple(np.asarray(out).reshape(-1)[:3]) == (255, 255, 255)


def _theirs(reference, images) -> np.ndarray:
    return np.asarray(reference(images, return_tensors="np")["pixel_values"])


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_released_preset_is_bit_identical_to_clip_image_processor(seed):
    ref, ours = _clip_reference(224), build_processor("released", 224)
    modes = list(CHANNELS) if _composites_alpha() else ["RGB", "L", "P"]
    for i, (h, w) in enumerate(SIZES):
        for mode in modes:
            img = _image(1000 * seed + 10 * i + len(mode), h, w, mode)
            got = ours(img)
            assert got.dtype == torch.float32 and tuple(got.shape) == (1, 3, 224, 224)
            np.testing.assert_array_equal(got.numpy(), _theirs(ref, img), err_msg=f"{h}x{w} {mode}")


@pytest.mark.parametrize("image_size", [336, 448])
def test_released_preset_at_other_resolutions(image_size):
    ref, ours = _clip_reference(image_size), build_processor("released", image_size)
    imgs = [_image(image_size + k, h, w, "RGB") for k, (h, w) in enumerate([(500, 375), (image_size, 601)])]
    np.testing.assert_array_equal(ours(imgs).numpy(), _theirs(ref, imgs))


def test_ml_aim_preset_matches_the_eval_transform():
    """ml-aim: Resize(ceil(s / 0.875), bicubic) + CenterCrop(s) (torchvision offsets) + ToTensor + ImageNet
    Normalize; aimv2.data's EvalTransform(crop_pct=0.875) implements the same torchvision semantics."""
    from aimv2.data.transforms import EvalTransform, Normalize
    ours = build_processor("ml-aim")
    ev, norm = EvalTransform(224, crop_pct=0.875, draft=False), Normalize(IMAGENET_MEAN, IMAGENET_STD)
    for i, (h, w) in enumerate(SIZES):
        img = _image(77 + i, h, w, "RGB")
        torch.testing.assert_close(ours(img)[0], norm(ev(img)), rtol=0, atol=0, msg=f"{h}x{w}")


def test_statistics_are_aimv2_datas():
    from aimv2.data.transforms import NORMALIZATIONS
    assert NORMALIZATIONS["clip"] == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert NORMALIZATIONS["imagenet"] == (IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("preset,image_size,short", [("released", 224, 224), ("released", 336, 336),
                                                     ("ml-aim", 224, 256), ("ml-aim", 336, 384),
                                                     ("ml-aim", 448, 512), ("ml-aim", 100, 115)])
def test_preset_geometry(preset, image_size, short):
    p = build_processor(preset, image_size)
    assert p.size == short and p.crop_size == image_size
    assert p.resized_size(480, 640) == (short, int(short * 640 / 480))  # landscape: height is the short side
    assert p.resized_size(999, 225) == (int(short * 999 / 225), short)
    assert p.output_size(480, 640) == (image_size, image_size) or image_size % 14
    assert (p.image_mean, p.crop_offset) == ((OPENAI_CLIP_MEAN, "floor") if preset == "released"
                                             else (IMAGENET_MEAN, "round"))


def _ramp(height: int, width: int) -> np.ndarray:
    """uint8 image whose red channel is the column index and green the row index (both + 1: 0 is padding)."""
    rows, cols = np.meshgrid(np.arange(height) + 1, np.arange(width) + 1, indexing="ij")
    return np.stack([cols, rows, np.zeros_like(rows)], -1).astype(np.uint8)


@pytest.mark.parametrize("rule,first_row,first_col", [("floor", 1, 3), ("round", 2, 4)])
def test_center_crop_offsets(rule, first_row, first_col):
    """5 x 10 -> 2 x 3: rows (5 - 2) / 2 = 1.5, columns 3.5: transformers floors, torchvision rounds (to even)."""
    p = AIMv2ImageProcessor(do_resize=False, crop_size=(2, 3), crop_offset=rule, do_rescale=False,
                            do_normalize=False, patch_size=1)
    out = p(_ramp(5, 10))[0]
    assert out[0, 0].tolist() == [first_col + 1, first_col + 2, first_col + 3]  # red: column + 1
    assert out[1, :, 0].tolist() == [first_row + 1, first_row + 2]  # green: row + 1


@pytest.mark.parametrize("rule,before", [("floor", 2), ("round", 1)])
def test_center_crop_pads_a_small_image(rule, before):
    """3 x 3 -> 6 x 6: padded with zeros, ceil(3 / 2) = 2 before (transformers) or 3 // 2 = 1 (torchvision)."""
    p = AIMv2ImageProcessor(do_resize=False, crop_size=6, crop_offset=rule, do_rescale=False, do_normalize=False,
                            patch_size=1)
    out = p(_ramp(3, 3))[0, 0]  # red = column + 1
    assert out[before].tolist() == [0] * before + [1, 2, 3] + [0] * (3 - before)
    assert out[:before].sum() == 0 and out[before + 3:].sum() == 0


def test_native_resolution_and_patch_multiples():
    native = build_processor("released", native=True)
    assert not native.do_resize and not native.do_center_crop
    img = _image(5, 70, 113)  # 5 x 8.07 patches
    cropped = native(img)
    assert tuple(cropped.shape) == (1, 3, 70, 112) and native.output_size(70, 113) == (70, 112)
    full = AIMv2ImageProcessor(do_resize=False, do_center_crop=False, patch_size=1)(img)
    assert torch.equal(cropped, full[..., :112])  # the last column dropped, as the HF patch conv does
    pad = AIMv2ImageProcessor(do_resize=False, do_center_crop=False, patch_fit="pad")
    padded = pad(img)
    assert tuple(padded.shape) == (1, 3, 70, 126) and torch.equal(padded[..., :113], full)
    black = (torch.zeros(3) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(padded[0, :, :, 113:], black.view(3, 1, 1).expand(3, 70, 13), rtol=0, atol=1e-6)
    strict = AIMv2ImageProcessor(do_resize=False, do_center_crop=False, patch_fit="error")
    with pytest.raises(ValueError, match=r"images is 70x113 .*patch_size 14"):
        strict(img)
    with pytest.raises(ValueError, match="smaller than one"):
        native(_image(1, 10, 40))
    with pytest.raises(ValueError, match="different sizes.*one at a time"):
        native([img, _image(2, 56, 56)])


def test_the_encoder_takes_the_output():
    enc = AIMv2Encoder(EncoderConfig(image_size=56, patch_size=14, dim=64, depth=1, num_heads=2),
                       backend="reference").eval()
    x = AIMv2ImageProcessor.for_encoder(enc)([_image(3, 90, 70), _image(4, 40, 100, "L")])
    assert tuple(x.shape) == (2, 3, 56, 56)
    with torch.no_grad():
        assert tuple(enc(x).shape) == (2, 16, 64)


# ----------------------------------------------------------------------------------------------- inputs
def test_same_pixels_give_the_same_output_in_every_container():
    p = build_processor("released", 56)
    img = _image(11, 70, 90)
    arr = np.array(img)
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    expected = p(img)
    for name, x in [("numpy uint8 HWC", arr), ("numpy float32", arr.astype(np.float32) / 255),
                    ("numpy float64", arr / 255.0), ("numpy int64", arr.astype(np.int64)),
                    ("torch uint8 CHW", chw), ("torch uint8 HWC", chw.permute(1, 2, 0)),
                    ("torch float CHW", chw.float() / 255), ("torch float16 CHW", (chw.float() / 255).half()),
                    ("torch non-contiguous", chw.permute(1, 2, 0).contiguous().permute(2, 0, 1)),
                    ("list", [arr]), ("tuple", (chw,))]:
        assert torch.equal(p(x), expected), name
    grey = _image(12, 70, 90, "L")
    g = np.array(grey)
    expected = p(grey)
    for name, x in [("HW", g), ("HW1", g[..., None]), ("torch 1HW", torch.from_numpy(g)[None]),
                    ("torch HW", torch.from_numpy(g)), ("float", g / 255.0)]:
        assert torch.equal(p(x), expected), name
    rgba = _image(13, 70, 90, "RGBA")
    assert torch.equal(p(np.asarray(rgba)), p(rgba))
    assert torch.equal(p(torch.from_numpy(np.array(rgba)).permute(2, 0, 1)), p(rgba))


def test_lists_and_batches():
    p = build_processor("released", 56)
    imgs = [_image(20 + i, 60 + 7 * i, 90 - 5 * i, mode) for i, mode in enumerate(["RGB", "L", "RGBA"])]
    batch = p(imgs)
    assert tuple(batch.shape) == (3, 3, 56, 56) and batch.is_contiguous()
    for i, img in enumerate(imgs):
        assert torch.equal(batch[i:i + 1], p(img))
    mixed = p([imgs[0], np.asarray(imgs[1]), torch.from_numpy(np.array(imgs[2])).permute(2, 0, 1)])
    assert torch.equal(mixed, batch)
    same = [_image(30 + i, 64, 80) for i in range(2)]
    stacked = np.stack([np.asarray(x) for x in same])  # (B, H, W, C)
    assert torch.equal(p(stacked), p(same))
    assert torch.equal(p(torch.from_numpy(stacked)), p(same))
    assert torch.equal(p(torch.from_numpy(stacked).permute(0, 3, 1, 2)), p(same))
    assert torch.equal(p.preprocess(same), p(same)) and torch.equal(p(images=same), p(same))


@pytest.mark.parametrize("bad,exc,match", [
    ([], ValueError, r"images is an empty list"),
    (np.zeros((0, 8, 8, 3), np.uint8), ValueError, r"images is an empty batch"),
    (torch.zeros(1, 1, 3, 8, 8), ValueError, r"images has 5 dimensions"),
    (np.zeros((8, 8, 2), np.uint8), ValueError, r"images has shape \(8, 8, 2\)"),
    (np.zeros((3, 8, 8), np.uint8), ValueError, r"transpose"),
    (torch.zeros(5, 8, 7), ValueError, r"images has shape \(5, 8, 7\)"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, r"images is empty"),
    (np.full((8, 8, 3), 1.5), ValueError, r"images has float values in \[1.5, 1.5\]"),
    (np.full((8, 8, 3), np.nan), ValueError, r"images has values that are not finite"),
    (np.full((8, 8, 3), 300, np.int16), ValueError, r"images has integer values in \[300, 300\]"),
    (torch.zeros(3, 8, 8, dtype=torch.bool), TypeError, r"images has dtype torch.bool"),
    (np.zeros((8, 8, 3), complex), TypeError, r"images has dtype complex"),
    ("photo.jpg", TypeError, r"images is a str.*PIL.Image.open"),
    (42, TypeError, r"images must be a PIL.Image.Image, a numpy array or a torch tensor, got int"),
    ([np.zeros((8, 8, 3), np.uint8), torch.zeros(1, 1, 3, 8, 8)], ValueError, r"images\[1\] has 5 dimensions"),
    ([np.zeros((8, 8, 3), np.uint8), None], TypeError, r"images\[1\] must be"),
    ([[np.zeros((8, 8, 3), np.uint8)]], TypeError, r"images\[0\] is a list"),
    ([np.zeros((1, 8, 8, 3), np.uint8)], ValueError, r"images\[0\] is a 4-D batch"),
])
def test_bad_inputs_name_the_argument(bad, exc, match):
    with pytest.raises(exc, match=match):
        build_processor("released", 56)(bad)


def test_convert_rgb_off_needs_rgb():
    p = AIMv2ImageProcessor(size=56, crop_size=56, do_convert_rgb=False)
    assert torch.equal(p(_image(1, 60, 60)), build_processor("released", 56)(_image(1, 60, 60)))
    with pytest.raises(ValueError, match=r"images\[1\] has mode 'L'; do_convert_rgb=False"):
        p([_image(1, 60, 60), _image(2, 60, 60, "L")])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(crop_offset="ceil"), ValueError, "crop_offset must be one of"),
    (dict(patch_fit=1), TypeError, "patch_fit must be a string"),
    (dict(resample=9), ValueError, "resample must be a Pillow filter code"),
    (dict(size=(224, 224, 3)), ValueError, "size must be an int or an"),
    (dict(crop_size=0), ValueError, r"crop_size must be in \[1, "),
    (dict(size=224.0), TypeError, "size must be an int"),
    (dict(image_std=(1.0, 0.0, 1.0)), ValueError, r"image_std\[1\] must be finite and > 0"),
    (dict(image_mean=(0.5, 0.5)), ValueError, "image_mean must be 3 numbers"),
    (dict(do_resize="yes"), TypeError, "do_resize must be a bool"),
    (dict(rescale_factor=float("nan")), ValueError, "rescale_factor must be finite"),
])
def test_bad_fields_name_the_field(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AIMv2ImageProcessor(**kwargs)


def test_bad_preset():
    with pytest.raises(ValueError, match=r"name must be one of \('released', 'ml-aim'\)"):
        build_processor("clip")
    with pytest.raises(TypeError, match="image_size must be an int"):
        AIMv2ImageProcessor.from_preset("released", "224")
    with pytest.raises(TypeError, match="encoder must be"):
        AIMv2ImageProcessor.for_encoder("aimv2-large-patch14-224")


# ----------------------------------------------------------------------------------------------- config files
RELEASED_CONFIG = {  # the released checkpoints' preprocessor_config.json (apple/aimv2-large-patch14-224)
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(OPENAI_CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor", "image_std": list(OPENAI_CLIP_STD), "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
}


def test_to_dict_is_the_released_config():
    assert build_processor("released").to_dict() == RELEASED_CONFIG
    assert AIMv2ImageProcessor.from_dict(RELEASED_CONFIG) == build_processor("released")
    assert AIMv2ImageProcessor.from_dict({}) == AIMv2ImageProcessor()  # CLIPImageProcessor's defaults
    ml = build_processor("ml-aim", 336).to_dict()
    assert ml["size"] == {"shortest_edge": 384} and ml["aimv2_crop_offset"] == "round"
    assert "aimv2_patch_size" not in ml and "aimv2_patch_fit" not in ml


@pytest.mark.parametrize("processor", [
    build_processor("released", 448), build_processor("ml-aim"), build_processor("released", native=True),
    AIMv2ImageProcessor(size=(300, 200), crop_size=(196, 112), resample=2, do_rescale=False, rescale_factor=0.5,
                        do_normalize=False, image_mean=0.5, image_std=(0.1, 0.2, 0.3), patch_size=16,
                        patch_fit="pad", do_convert_rgb=False),
])
def test_from_pretrained_round_trip(tmp_path, processor):
    file = processor.save_pretrained(tmp_path / "export")
    assert file == tmp_path / "export" / CONFIG_NAME
    assert AIMv2ImageProcessor.from_pretrained(tmp_path / "export") == processor
    assert AIMv2ImageProcessor.from_pretrained(str(file)) == processor
    assert json.loads(file.read_text()) == processor.to_dict()


@pytest.mark.parametrize("content,match", [
    (b"{not json", "not a JSON preprocessor config"),
    (b"\xff\xfe", "not a JSON preprocessor config"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (json.dumps({"size": "big"}).encode(), "size must be an int or an object"),
    (json.dumps({"size": {"shortest_edge": 224, "longest_edge": 1333}}).encode(), "is not supported"),
    (json.dumps({"crop_size": {"shortest_edge": 224}}).encode(), "is not supported"),
    (json.dumps({"do_pad": True}).encode(), "do_pad=true is not supported"),
    (json.dumps({"image_processor_type": "SiglipImageProcessor"}).encode(), "'SiglipImageProcessor' is not"),
    (json.dumps({"image_mean": [0.5, "a", 0.5]}).encode(), r"image_mean\[1\] must be a number"),
    (json.dumps({"resample": "bicubic"}).encode(), "resample must be an int"),
    (json.dumps({"do_resize": 1}).encode(), "do_resize must be a bool"),
    (json.dumps({"crop_size": {"height": -1, "width": 3}}).encode(), r"crop_size\[0\] must be in"),
    (json.dumps({"aimv2_patch_fit": "stretch"}).encode(), "patch_fit must be one of"),
    (b" " * (MAX_CONFIG_BYTES + 1), "byte limit"),
])
def test_bad_config_files_name_the_file(tmp_path, content, match):
    file = tmp_path / CONFIG_NAME
    file.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        AIMv2ImageProcessor.from_pretrained(tmp_path)
    assert str(file) in str(info.value)


def test_config_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preprocessor config"):
        AIMv2ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="path must be a str"):
        AIMv2ImageProcessor.from_pretrained(3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        build_processor().save_pretrained(tmp_path / "file")
    extra = {**RELEASED_CONFIG, "processor_class": "CLIPProcessor", "some_future_key": [1], "do_pad": False,
             "image_mean": None}  # unknown keys ignored, nulls are defaults
    (tmp_path / CONFIG_NAME).write_text(json.dumps(extra))
    assert AIMv2ImageProcessor.from_pretrained(tmp_path) == build_processor("released")


# ----------------------------------------------------------------------------------------------- export
def _tiny(pos_embed: str) -> AIMv2Encoder:
    torch.manual_seed(0)
    enc = AIMv2Encoder(EncoderConfig(image_size=56, patch_size=14, dim=64, depth=2, num_heads=2,
                                     pos_embed=pos_embed), backend="reference")
    enc.init_weights()
    return enc.eval()


def _auto_image_processor(folder):
    """transformers' AutoImageProcessor on ``folder``, its PIL backend (``use_fast=False`` before transformers 5:
    without torchvision, CLIPImageProcessor falls back to it anyway)."""
    transformers = pytest.importorskip("transformers")
    major = int(transformers.__version__.split(".")[0])
    kwargs = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    try:
        return transformers.AutoImageProcessor.from_pretrained(str(folder), **kwargs)
    except ImportError as exc:  # transformers 5.17's AutoImageProcessor needs torchvision for any backend
        if "orchvision" not in str(exc):
            raise
        pytest.skip(f"transformers {transformers.__version__}'s AutoImageProcessor needs torchvision, which is not "
                    f"installed (transformers 5.2x loads the PIL backend without it)")


@pytest.mark.parametrize("layout", ["hf", "apple"])
def test_save_encoder_writes_a_config_transformers_loads(tmp_path, layout):
    enc = _tiny("learned")
    folder = save_encoder(enc, tmp_path / "export", layout)
    expected = build_processor("released", 56)
    assert AIMv2ImageProcessor.from_pretrained(folder) == expected
    theirs = _auto_image_processor(folder)
    assert type(theirs).__name__.startswith("CLIPImageProcessor")
    imgs = [_image(40, 80, 60), _image(41, 56, 99, "RGBA")]
    np.testing.assert_array_equal(expected(imgs).numpy(), _theirs(theirs, imgs))
    back = load_pretrained_encoder(folder)  # the extra file does not disturb loading
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), enc.state_dict().values()))


def test_save_encoder_native_and_overrides(tmp_path):
    enc = _tiny("sincos")
    folder = save_encoder(enc, tmp_path / "native")
    native = AIMv2ImageProcessor.from_pretrained(folder)
    assert native == build_processor("released", 56, native=True)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["do_resize"] is False and cfg["do_center_crop"] is False
    img = _image(50, 70, 98)  # sides multiples of 14: transformers leaves them as they are too
    np.testing.assert_array_equal(native(img).numpy(), _theirs(_auto_image_processor(folder), img))

    learned = _tiny("learned")
    save_encoder(learned, tmp_path / "mlaim", processor="ml-aim")
    assert AIMv2ImageProcessor.from_pretrained(tmp_path / "mlaim") == build_processor("ml-aim", 56)
    theirs = _auto_image_processor(tmp_path / "mlaim")  # loads, keeping the aimv2_* key as an inert attribute
    assert list(theirs.image_mean) == list(IMAGENET_MEAN) and theirs.aimv2_crop_offset == "round"
    custom = AIMv2ImageProcessor(size=64, crop_size=56, resample=2)
    save_encoder(learned, tmp_path / "custom", "timm", processor=custom)
    assert AIMv2ImageProcessor.from_pretrained(tmp_path / "custom") == custom
    with pytest.raises(TypeError, match="processor must be an aimv2.processor.AIMv2ImageProcessor"):
        save_encoder(learned, tmp_path / "bad", processor={"size": 3})
    with pytest.raises(ValueError, match="processor must be a preset name"):
        save_encoder(learned, tmp_path / "bad", processor="clip")
    assert not (tmp_path / "bad").exists()


def test_config_without_pillow():
    """aimv2.pretrained (and the processor's config side) import and work without Pillow; processing says
    which extra to install."""
    code = (
        "import sys; sys.modules['PIL'] = None\n"
        "import aimv2.pretrained\n"
        "from aimv2.processor import build_processor\n"
        "p = build_processor('released', 336)\n"
        "assert p.to_dict()['size'] == {'shortest_edge': 336}\n"
        "import numpy as np\n"
        "try:\n"
        "    p(np.zeros((8, 8, 3), np.uint8))\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "aimv2.processor (processing images) needs 'PIL'" in out.stdout and "[train]" in out.stdout


def test_patch_fit_crop_is_what_transformers_native_model_does():
    """A side that is not a multiple of 14: transformers' Aimv2VisionModel (native) ignores the remainder (its
    stride-14 conv), so its features of the uncropped image equal those of patch_fit="crop"'s output."""
    hf = pytest.importorskip("transformers.models.aimv2.modeling_aimv2")
    cfg = hf.Aimv2VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1,
                               image_size=56, patch_size=14, is_native=True, use_head=False)
    torch.manual_seed(0)
    model = hf.Aimv2VisionModel(cfg).eval()
    img = _image(60, 70, 113)
    ours = build_processor("released", native=True)
    theirs = _clip_class()(**{k: v for k, v in ours.to_dict().items() if k != "image_processor_type"})
    full = torch.from_numpy(_theirs(theirs, img))
    assert tuple(full.shape) == (1, 3, 70, 113)
    with torch.no_grad():
        want = model(pixel_values=full).last_hidden_state
        got = model(pixel_values=ours(img)).last_hidden_state
    assert torch.equal(got, want)
