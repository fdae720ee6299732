"""Triton cross_entropy and linear_cross_entropy against the reference, within the float64 error budget."""
import pytest
import torch

import aimv2_kernels
from aimv2_kernels.reference.cross_entropy import cross_entropy_reference, linear_cross_entropy_reference
from ce_cases import (
    check as _check, check_backward_only_scales, check_compile_fullgraph, check_empty_inputs,
    check_never_holds_full_logits,
    check_partial_requires_grad, run as _run, targets_with_ignored as _targets, upstream as _upstream)

import triton  # noqa: E402,F401  (a test dependency: a missing triton must fail, not skip)
from aimv2_kernels.triton import linear_cross_entropy as lce_module  # noqa: E402
from aimv2_kernels.triton.cross_entropy import (  # noqa: E402
    cross_entropy_backward_op, cross_entropy_op, cross_entropy_triton)
from aimv2_kernels.triton.linear_cross_entropy import (  # noqa: E402
    linear_cross_entropy_backward_op, linear_cross_entropy_op, linear_cross_entropy_triton)


LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
# (ignore_index, label_smoothing, z_loss): the defaults; then all features, with an in-range ignore_index
# (AIMv2's pad id 1); then an ignore_index above V.
OPTIONS = [(-100, 0.0, 0.0), (1, 0.1, 1e-3), (5000, 0.2, 0.0)]


# ---------------------------------------------------------------- cross_entropy over given logits

def _public_ce(logits, targets, **kw):
    return aimv2_kernels.cross_entropy(logits, targets, backend="triton", **kw)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("shape", [(1, 50), (7, 1003), (3, 11, 50)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTIONS[:2])
def test_cross_entropy_matches_reference(device, dtype, shape, reduction, options):
    ignore_index, eps, z = options
    logits = (torch.randn(shape, device=device) * 3).to(dtype)
    targets = _targets(shape[:-1], shape[-1], ignore_index, device)
    upstream = _upstream(shape[:-1], reduction, device)
    kw = dict(ignore_index=ignore_index, label_smoothing=eps, z_loss=z, reduction=reduction)
    ours = _run(_public_ce, [logits], [targets], upstream, **kw)
    ref = _run(cross_entropy_reference, [logits], [targets], upstream, **kw)
    oracle = _run(cross_entropy_reference, [logits.double()], [targets], upstream.double(), **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    _check(ours, ref, oracle, f"{dtype} {shape} {reduction} {options}")
    counted = targets != ignore_index
    assert (ours[1][~counted] == 0).all()
    if reduction == "none":
        assert (ours[0][~counted] == 0).all()


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_all_ignored(device, dtype, reduction):
    logits = torch.randn(5, 50, device=device).to(dtype).requires_grad_()
    targets = torch.full((5,), -100, device=device)
    loss = cross_entropy_triton(logits, targets, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    loss.sum().backward()
    assert (loss == 0).all() and loss.shape == ((5,) if reduction == "none" else ())
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_large_logits(device, dtype, reduction):
    """Logits of magnitude 1e4 (with z-loss, so lse^2 ~ 1e8) give finite values and gradients."""
    logits = (torch.randn(6, 300, device=device) * 1e4).clamp(-6e4, 6e4).to(dtype)
    targets = _targets((6,), 300, -100, device, every=4)
    upstream = _upstream((6,), reduction, device)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    ours = _run(cross_entropy_triton, [logits], [targets], upstream, **kw)
    ref = _run(cross_entropy_reference, [logits], [targets], upstream, **kw)
    oracle = _run(cross_entropy_reference, [logits.double()], [targets], upstream.double(), **kw)
    _check(ours, ref, oracle, f"1e4 logits {dtype} {reduction}")


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int16, torch.uint8])
def test_cross_entropy_target_dtypes_and_ignore_index(device, target_dtype):
    """Any integer target dtype gives the int64 result; ignore_index may lie inside or outside [0, V)."""
    logits = torch.randn(9, 50, device=device)
    for ignore_index in (-100, 1, 50, 255) if target_dtype.is_signed else (1, 50, 255):
        targets = _targets((9,), 50, ignore_index, device)
        expected = cross_entropy_triton(logits, targets, ignore_index=ignore_index, reduction="none")
        got = cross_entropy_triton(logits, targets.to(target_dtype), ignore_index=ignore_index, reduction="none")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cross_entropy_non_contiguous_logits(device):
    logits = torch.randn(50, 7, device=device).t()  # column stride 7
    targets = _targets((7,), 50, -100, device)
    expected = cross_entropy_triton(logits.contiguous(), targets, reduction="none")
    torch.testing.assert_close(cross_entropy_triton(logits, targets, reduction="none"), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- linear_cross_entropy

def _lce(chunk):
    def fn(hidden, weight, targets, **kw):
        return linear_cross_entropy_triton(hidden, weight, targets, chunk_size=chunk, **kw)
    return fn


def _lce_case(device, dtype, n, d, v, chunk, reduction, options, with_bias):
    ignore_index, eps, z = options
    hidden = torch.randn(n, d, device=device).to(dtype)
    weight = (torch.randn(v, d, device=device) / d ** 0.5).to(dtype)
    bias = torch.randn(v, device=device).to(dtype) if with_bias else None
    targets = _targets((n,), v, ignore_index, device)
    upstream = _upstream((n,), reduction, device)
    kw = dict(ignore_index=ignore_index, label_smoothing=eps, z_loss=z, reduction=reduction, with_bias=with_bias)
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    ours = _run(_lce(chunk), inputs, [targets], upstream, **kw)
    ref = _run(linear_cross_entropy_reference, inputs, [targets], upstream, **kw)
    oracle = _run(linear_cross_entropy_reference, [x.double() for x in inputs], [targets], upstream.double(), **kw)
    assert ours[0].dtype == torch.float32 and all(g.dtype == dtype for g in ours[1:])
    _check(ours, ref, oracle, f"{dtype} n={n} v={v} chunk={chunk} {reduction} {options} bias={with_bias}")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("options", OPTIONS)
def test_linear_cross_entropy_matches_reference(device, dtype, reduction, with_bias, options):
    """33 tokens in chunks of 10 (three full chunks and a remainder of 3), V = 50."""
    _lce_case(device, dtype, 33, 32, 50, 10, reduction, options, with_bias)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n, chunk", [(1, None), (7, 3)])
def test_linear_cross_entropy_wide_vocab(device, dtype, reduction, n, chunk):
    """V = 1003 (several blocks over V, the last one partial), one token, and 7 tokens in chunks of 3."""
    _lce_case(device, dtype, n, 64, 1003, chunk, reduction, OPTIONS[1], True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_all_ignored(device, reduction):
    hidden = torch.randn(2, 5, 32, device=device).bfloat16().requires_grad_()
    weight = torch.randn(50, 32, device=device).bfloat16().requires_grad_()
    bias = torch.randn(50, device=device).bfloat16().requires_grad_()
    targets = torch.full((2, 5), 3, device=device)
    loss = linear_cross_entropy_triton(hidden, weight, targets, bias=bias, ignore_index=3, z_loss=1e-3,
                                       label_smoothing=0.1, reduction=reduction, chunk_size=4)
    loss.sum().backward()
    assert (loss == 0).all() and loss.shape == ((2, 5) if reduction == "none" else ())
    assert all((g == 0).all() for g in (hidden.grad, weight.grad, bias.grad))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_partial_requires_grad(device, reduction):
    check_partial_requires_grad(linear_cross_entropy_triton, device, reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_never_holds_full_logits(device, reduction):
    check_never_holds_full_logits(linear_cross_entropy_triton, device, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_backward_only_scales(device, reduction):
    check_backward_only_scales(linear_cross_entropy_triton, device, reduction)


def test_empty_inputs(device):
    check_empty_inputs(cross_entropy_triton, linear_cross_entropy_triton, device)


def test_autotune_pruning():
    """The GPU config space, pruned: blocks no wider than needed, 1..64 elements per thread."""
    import triton

    from aimv2_kernels.triton.cross_entropy import _prune

    configs = [triton.Config({"BLOCK_V": b}, num_warps=w) for b in (256, 1024, 8192) for w in (4, 8, 16)]
    kept = lambda v: {(c.kwargs["BLOCK_V"], c.num_warps) for c in _prune(configs, {"V": v})}  # noqa: E731
    assert kept(50) == {(256, 4), (256, 8)}
    assert kept(32000) == {(1024, 4), (1024, 8), (1024, 16), (8192, 4), (8192, 8), (8192, 16)}
    assert _prune(configs[-1:], {"V": 1}) == configs[-1:]  # never empty


def test_chunk_rows_default():
    assert lce_module.chunk_rows(100_000, 32000) == lce_module.CHUNK_ELEMENTS // 32000
    assert lce_module.chunk_rows(7, 32000) == 7 and lce_module.chunk_rows(5, 10 ** 9) == 1
    assert lce_module.chunk_rows(33, 50, 10) == 10 and lce_module.chunk_rows(0, 50) == 1


# ---------------------------------------------------------------- registration: opcheck and torch.compile

def test_opcheck_cross_entropy(device):
    logits = torch.randn(6, 70, device=device, requires_grad=True)
    targets = _targets((6,), 70, -100, device)
    for reduction in REDUCTIONS:
        torch.library.opcheck(cross_entropy_op, (logits, targets, -100, 0.1, 1e-3, reduction))
    lse = torch.logsumexp(logits.detach(), -1)
    torch.library.opcheck(cross_entropy_backward_op,
                          (torch.randn(6, device=device), logits.detach(), targets, lse, -100, 0.1, 1e-3, "none"))


def test_opcheck_linear_cross_entropy(device):
    hidden = torch.randn(9, 16, device=device, requires_grad=True)
    weight = torch.randn(70, 16, device=device, requires_grad=True)
    bias = torch.randn(70, device=device, requires_grad=True)
    targets = _targets((9,), 70, -100, device)
    for reduction, grads in (("mean", True), ("sum", True), ("none", False)):
        torch.library.opcheck(linear_cross_entropy_op, (hidden, weight, targets, bias, -100, 0.1, 1e-3, reduction,
                                                        grads, grads, grads, 4))
    lse = torch.logsumexp(hidden.detach() @ weight.detach().t() + bias.detach(), -1)
    torch.library.opcheck(linear_cross_entropy_backward_op,
                          (torch.randn(9, device=device), hidden.detach(), weight.detach(), targets, bias.detach(),
                           lse, -100, 0.1, 1e-3, True, True, True, 4))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(device, reduction):
    check_compile_fullgraph(cross_entropy_triton, linear_cross_entropy_triton, device, reduction)




def test_out_of_range_target_without_value_checks_gives_nan(device, monkeypatch):
    """With AIMV2_CHECK_VALUES=0 a bad target is not caught on the host: its row must come out NaN (loss and
    gradient), never silently wrong, and the other rows must be unaffected."""
    monkeypatch.setenv("AIMV2_CHECK_VALUES", "0")
    logits = torch.randn(4, 50, device=device, requires_grad=True)
    targets = torch.tensor([3, 50, -1, 7], device=device)
    loss = aimv2_kernels.cross_entropy(logits, targets, reduction="none", backend="triton")
    loss.sum().backward()
    assert loss[1:3].isnan().all() and logits.grad[1:3].isnan().all()
    good = [0, 3]
    ref = torch.nn.functional.cross_entropy(logits.detach()[good], targets[good], reduction="none")
    torch.testing.assert_close(loss.detach()[good], ref)
    assert torch.isfinite(logits.grad[good]).all()
