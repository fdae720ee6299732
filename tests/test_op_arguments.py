"""Scalar arguments of the public ops (eps, scale, z_loss, label_smoothing, ignore_index) and integer target dtypes:
checked in the public op before dispatch, so every backend refuses (or computes) the same thing."""
import math

import pytest
import torch

from aimv2_kernels import cross_entropy, linear_cross_entropy, patch_mse_loss, prefix_attention
from aimv2_kernels._backend import available_backends

BACKENDS = ("reference", "cpu", "triton")
NOT_FINITE = (math.nan, math.inf, -math.inf)
INT64_MAX = 2 ** 63 - 1
INT64_MIN = -(2 ** 63)


def _need(op: str, backend: str) -> None:
    if backend not in available_backends(op, "cpu"):
        pytest.skip(f"{backend} is not available for {op} on this machine")


def _patch_args():
    return torch.randn(2, 3, 588), torch.randn(2, 3, 28, 28)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, -1e-6, *NOT_FINITE, 10 ** 400])
def test_patch_mse_eps(backend, eps):
    pred, images = _patch_args()
    with pytest.raises(ValueError, match="eps"):
        patch_mse_loss(pred, images, 14, target_offset=1, eps=eps, backend=backend)


@pytest.mark.parametrize("eps", ["1e-6", True, None, torch.tensor(1e-6)])
def test_patch_mse_eps_type(eps):
    pred, images = _patch_args()
    with pytest.raises(TypeError, match="eps"):
        patch_mse_loss(pred, images, 14, target_offset=1, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", NOT_FINITE)
def test_attention_scale(backend, scale):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match="scale"):
        prefix_attention(q, k, v, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_scale_none_and_positive_agree(backend):
    _need("prefix_attention", backend)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    default = prefix_attention(q, k, v, backend=backend)
    explicit = prefix_attention(q, k, v, scale=16 ** -0.5, backend=backend)
    torch.testing.assert_close(default, explicit)


def _ce_calls(**options):
    logits, hidden, weight = torch.randn(6, 10), torch.randn(6, 8), torch.randn(10, 8)
    targets = torch.randint(0, 10, (6,))
    return [lambda backend: cross_entropy(logits, targets, backend=backend, **options),
            lambda backend: linear_cross_entropy(hidden, weight, targets, backend=backend, **options)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value", [
    *[("z_loss", v) for v in (-1e-4, *NOT_FINITE, 10 ** 400)],
    *[("label_smoothing", v) for v in (-0.1, 1.5, *NOT_FINITE)],
])
def test_cross_entropy_float_options(backend, name, value):
    for call in _ce_calls(**{name: value}):
        with pytest.raises(ValueError, match=name):
            call(backend)


@pytest.mark.parametrize("name,value", [("z_loss", "0"), ("z_loss", True), ("label_smoothing", None)])
def test_cross_entropy_float_option_types(name, value):
    for call in _ce_calls(**{name: value}):
        with pytest.raises(TypeError, match=name):
            call("reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [INT64_MAX + 1, INT64_MIN - 1, 10 ** 30])
def test_ignore_index_outside_int64(backend, ignore_index):
    for call in _ce_calls(ignore_index=ignore_index):
        with pytest.raises(ValueError, match="ignore_index"):
            call(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_boundary_values_are_accepted(backend):
    _need("cross_entropy", backend)
    for options in ({"label_smoothing": 0.0}, {"label_smoothing": 1.0}, {"z_loss": 0.0},
                    {"ignore_index": INT64_MAX}, {"ignore_index": INT64_MIN}):
        for call in _ce_calls(**options):
            assert torch.isfinite(call(backend))


INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _ce_all_backends(fn) -> dict[str, torch.Tensor]:
    out = {}
    for backend in BACKENDS:
        if backend in available_backends("cross_entropy", "cpu"):
            out[backend] = fn(backend)
    assert "reference" in out
    return out


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("ignore_index", [-100, 3, 100, 300, INT64_MAX])
def test_integer_target_dtypes_agree_across_backends(dtype, ignore_index):
    """int8/16/32/64 and uint8 targets give the int64 result on every backend (uint8 100 is not int8 -100...)."""
    v = 120
    logits, hidden, weight = torch.randn(5, v), torch.randn(5, 8), torch.randn(v, 8)
    targets = torch.tensor([100, 3, 9, 0, 119])
    typed = targets.to(dtype)

    def run(backend, t):
        ce = cross_entropy(logits, t, ignore_index=ignore_index, reduction="none", label_smoothing=0.1,
                           z_loss=1e-3, backend=backend)
        lce = linear_cross_entropy(hidden, weight, t, ignore_index=ignore_index, backend=backend)
        return torch.cat([ce, lce.reshape(1)])

    expected = run("reference", targets)
    for backend, got in _ce_all_backends(lambda b: run(b, typed)).items():
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{backend} {dtype}")
    if ignore_index == 100:
        assert expected[0] == 0  # only the target equal to ignore_index is ignored


@pytest.mark.parametrize("dtype,value,ignore_index", [(torch.uint8, 156, -100), (torch.int8, 44, 300)])
def test_narrow_targets_do_not_wrap_ignore_index(dtype, value, ignore_index):
    """156 (uint8) is not -100 and 44 (int8) is not 300: out of range for 10 classes, refused on every backend."""
    targets = torch.tensor([1, value], dtype=dtype)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="targets"):
            cross_entropy(torch.randn(2, 10), targets, ignore_index=ignore_index, backend=backend)
