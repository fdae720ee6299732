"""aimv2.flops: the model FLOP count (a hand count of a tiny config; bench/train_throughput.py's exact check against
FlopCounterMode is tests/test_train_throughput.py), the datasheet peak of known GPUs (their names and capabilities
faked here), the AIMV2_PEAK_TFLOPS override and MFU."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from aimv2 import flops
from aimv2.config import AIMv2Config, DecoderConfig, EncoderConfig
from aimv2.flops import mfu, model_flops_breakdown, model_flops_per_step, peak_flops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)


def tiny() -> AIMv2Config:
    """Encoder: 8 px images, patch 4 (N = 4 patches of C*p*p = 48 values), D = 8, F = 16, one block; decoder:
    D = 4, F = 8, one block, vocabulary 10, T = 3 caption tokens (S = N + 1 + T = 8)."""
    return AIMv2Config(encoder=EncoderConfig(image_size=8, patch_size=4, dim=8, depth=1, num_heads=2, mlp_hidden=16),
                       decoder=DecoderConfig(dim=4, depth=1, num_heads=2, mlp_hidden=8, vocab_size=10,
                                             context_length=3))


def test_breakdown_matches_a_hand_count():
    """Batch 2, prefixes (1, 3). Each linear part is 2 x tokens x (multiply-adds per token), from the weight
    shapes; attention follows the documented accounting."""
    parts = model_flops_breakdown(tiny(), 2, [1, 3])
    enc_per_token = 8 * 24 + 8 * 8 + 8 * 16 + 8 * 16 + 16 * 8  # qkv, proj, fc1, fc3, fc2: 640
    dec_per_token = 4 * 12 + 4 * 4 + 4 * 8 + 4 * 8 + 8 * 4  # 160
    assert parts == {
        "patch_embed": 2 * (2 * 4) * 48 * 8,  # 6144: (B*N, 48) @ (48, 8)
        "encoder_linear": 2 * (2 * 4) * enc_per_token,  # 10240
        "encoder_attention": 2 * 8 * (2 * 4 ** 2 + 1 ** 2 + 3 ** 2),  # 2 D (B N^2 + sum M^2) = 672
        "image_proj": 2 * (2 * 4) * 8 * 4,  # 512
        "decoder_linear": 2 * (2 * 8) * dec_per_token,  # 5120 over B*S tokens
        "decoder_attention": 2 * 2 * 8 ** 2 * 4,  # 2 B S^2 D = 1024
        "pixel_head": 2 * (2 * 3) * 4 * 48,  # 2304: the N - 1 predicting positions
        "text_head": 2 * (2 * 3) * 4 * 10,  # 480: (B*T, 4) @ (4, V)
    }
    # forward + backward: 3x each matmul, 2x the patch embedding (no gradient for the images)
    assert model_flops_per_step(tiny(), 2, [1, 3]) == 2 * 6144 + 3 * (10240 + 672 + 512 + 5120 + 1024 + 2304 + 480)


@pytest.mark.parametrize("preset", ["aimv2-tiny", "aimv2-demo", "aimv2-large-patch14-224"])
@pytest.mark.parametrize("attention", ["visible", "dense"])
def test_breakdown_sums_to_the_total(preset, attention):
    cfg = AIMv2Config.from_name(preset)
    parts = model_flops_breakdown(cfg, 3, attention=attention)
    total = model_flops_per_step(cfg, 3, attention=attention)
    assert total == pytest.approx(3 * sum(parts.values()) - parts["patch_embed"], rel=1e-12)
    assert all(v > 0 for v in parts.values())


def test_the_bench_uses_the_package_functions():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
    if "train_throughput" not in sys.modules:
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_throughput"] = module
        spec.loader.exec_module(module)
    tt = sys.modules["train_throughput"]
    assert tt.model_flops_per_step is model_flops_per_step
    assert tt.model_flops_breakdown is model_flops_breakdown


def test_argument_errors():
    with pytest.raises(ValueError, match="batch"):
        model_flops_per_step(tiny(), 0)
    with pytest.raises(ValueError, match="prefix_lens"):
        model_flops_per_step(tiny(), 1, [5])
    with pytest.raises(ValueError, match="attention"):
        model_flops_breakdown(tiny(), 1, attention="flash")


# -- peak and MFU ---------------------------------------------------------------------------------------------

def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> torch.device:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return torch.device("cuda", 0)


def test_no_peak_on_the_cpu():
    assert peak_flops("cpu") is None
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops("meta") is None
    assert mfu(1e12, 1.0, "cpu") is None


@pytest.mark.parametrize("name, capability, peak", [
    ("NVIDIA H100 80GB HBM3", (9, 0), 989.4e12),
    ("NVIDIA H100 PCIe", (9, 0), 756e12),
    ("NVIDIA H200", (9, 0), 989.4e12),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 312e12),
    ("NVIDIA A100-PCIE-40GB", (8, 0), 312e12),
    ("NVIDIA A100 80GB PCIe", (8, 0), 312e12),
    ("NVIDIA L40S", (8, 9), 362.05e12),
    ("NVIDIA L40", (8, 9), 181.05e12),
    ("NVIDIA L4", (8, 9), 121e12),
    ("NVIDIA A10", (8, 6), 125e12),
    # not in the table, or a different part under a known name: unknown, never a neighbour's peak
    ("NVIDIA A10G", (8, 6), None),
    ("NVIDIA H100 NVL", (9, 0), None),
    ("NVIDIA H200 NVL", (9, 0), None),
    ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", (8, 0), None),  # a slice of the GPU
    ("NVIDIA GeForce RTX 4090", (8, 9), None),
    ("NVIDIA GH200 480GB", (9, 0), None),
    ("NVIDIA H20", (9, 0), None),
    ("NVIDIA H100 80GB HBM3", (8, 0), None),  # the name and the capability disagree
])
def test_datasheet_peaks(monkeypatch, name, capability, peak):
    device = fake_gpu(monkeypatch, name, capability)
    assert peak_flops(device) == peak
    assert peak_flops("cuda:0") == peak


def test_mfu(monkeypatch):
    device = fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    assert mfu(989.4e12, 2.0, device) == pytest.approx(0.5)
    assert mfu(0, 1.0, device) == 0.0
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9))
    assert mfu(1e12, 1.0, device) is None


def test_the_override_is_in_tflops_for_every_device(monkeypatch):
    monkeypatch.setenv(flops.PEAK_ENV, "2.5")
    assert peak_flops("cpu") == 2.5e12
    assert mfu(1e12, 0.8, "cpu") == pytest.approx(0.5)
    device = fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    assert peak_flops(device) == 2.5e12
    monkeypatch.setenv(flops.PEAK_ENV, "")  # empty: as unset
    assert peak_flops(device) == 989.4e12


@pytest.mark.parametrize("value", ["fast", "0", "-100", "nan", "inf"])
def test_a_bad_override_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(flops.PEAK_ENV, value)
    with pytest.raises(ValueError, match=flops.PEAK_ENV):
        peak_flops("cpu")


@pytest.mark.parametrize("flops_per_step, step_seconds, name", [
    (-1.0, 1.0, "flops_per_step"),
    (math.nan, 1.0, "flops_per_step"),
    (math.inf, 1.0, "flops_per_step"),
    ("1e12", 1.0, "flops_per_step"),
    (True, 1.0, "flops_per_step"),
    (1e12, 0.0, "step_seconds"),
    (1e12, -0.5, "step_seconds"),
    (1e12, math.nan, "step_seconds"),
    (1e12, math.inf, "step_seconds"),
    (1e12, None, "step_seconds"),
])
def test_bad_mfu_arguments_name_the_argument(flops_per_step, step_seconds, name):
    with pytest.raises(ValueError, match=name):
        mfu(flops_per_step, step_seconds, "cpu")
