"""The compiled CPU cross_entropy and linear_cross_entropy against the reference, within the float64 error budget."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import aimv2_kernels
from aimv2_kernels._backend import extension_available, load_extension
from aimv2_kernels.reference.cross_entropy import cross_entropy_reference, linear_cross_entropy_reference
from ce_cases import (
    check as _check, check_backward_only_scales, check_compile_fullgraph, check_empty_inputs,
    check_never_holds_full_logits,
    check_partial_requires_grad, run as _run, targets_with_ignored as _targets, upstream as _upstream)

pytestmark = pytest.mark.skipif(not extension_available(), reason="aimv2_kernels._C is not built")

if extension_available():
    from aimv2_kernels.compiled import linear_cross_entropy as lce_module
    from aimv2_kernels.compiled.cross_entropy import cross_entropy_backward_op, cross_entropy_op
    from aimv2_kernels.compiled.linear_cross_entropy import (
        linear_cross_entropy_backward_op, linear_cross_entropy_op)
    from aimv2_kernels.compiled.cross_entropy import cross_entropy_compiled as cross_entropy_cpu
    from aimv2_kernels.compiled.linear_cross_entropy import linear_cross_entropy_compiled as linear_cross_entropy_cpu

LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
# (ignore_index, label_smoothing, z_loss): the defaults; then all features, with an in-range ignore_index
# (AIMv2's pad id 1); then an ignore_index above V.
OPTIONS = [(-100, 0.0, 0.0), (1, 0.1, 1e-3), (5000, 0.2, 0.0)]


# ---------------------------------------------------------------- cross_entropy over given logits

def _public_ce(logits, targets, **kw):
    return aimv2_kernels.cross_entropy(logits, targets, backend="cpu", **kw)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (9, 50), (7, 1003), (3, 11, 33), (4, 4099)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTIONS[:2])
def test_cross_entropy_matches_reference(dtype, shape, reduction, options):
    """V of 1, 7, 33, 50, 1003 and 4099: no multiple of a vector width, the tails and single-lane rows.
    (An ignore_index outside [0, V) is covered by test_cross_entropy_target_dtypes_and_ignore_index.)"""
    ignore_index, eps, z = options
    logits = (torch.randn(shape) * 3).to(dtype)
    targets = _targets(shape[:-1], shape[-1], ignore_index)
    upstream = _upstream(shape[:-1], reduction)
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
def test_cross_entropy_all_ignored(dtype, reduction):
    logits = torch.randn(5, 50).to(dtype).requires_grad_()
    targets = torch.full((5,), -100)
    loss = cross_entropy_cpu(logits, targets, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    loss.sum().backward()
    assert (loss == 0).all() and loss.shape == ((5,) if reduction == "none" else ())
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_large_logits(dtype, reduction):
    """Logits of magnitude 1e4 (with z-loss, so lse^2 ~ 1e8) give finite values and gradients."""
    logits = (torch.randn(6, 300) * 1e4).clamp(-6e4, 6e4).to(dtype)
    targets = _targets((6,), 300, -100, every=4)
    targets[1] = logits[1].float().argmax()  # a target at the row's maximum: a loss near 0 next to 1e4 logits
    upstream = _upstream((6,), reduction)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    ours = _run(cross_entropy_cpu, [logits], [targets], upstream, **kw)
    ref = _run(cross_entropy_reference, [logits], [targets], upstream, **kw)
    oracle = _run(cross_entropy_reference, [logits.double()], [targets], upstream.double(), **kw)
    _check(ours, ref, oracle, f"1e4 logits {dtype} {reduction}")


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int16, torch.uint8])
def test_cross_entropy_target_dtypes_and_ignore_index(target_dtype):
    """Any integer target dtype gives the int64 result; ignore_index may lie inside or outside [0, V)."""
    logits = torch.randn(9, 50)
    for ignore_index in (-100, 1, 50, 255) if target_dtype.is_signed else (1, 50, 255):
        targets = _targets((9,), 50, ignore_index)
        expected = cross_entropy_cpu(logits, targets, ignore_index=ignore_index, reduction="none")
        got = cross_entropy_cpu(logits, targets.to(target_dtype), ignore_index=ignore_index, reduction="none")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cross_entropy_non_contiguous_inputs():
    logits = torch.randn(50, 7).t()  # column stride 7
    targets = _targets((14,), 50, -100)[::2]
    expected = cross_entropy_cpu(logits.contiguous(), targets.contiguous(), reduction="none")
    torch.testing.assert_close(cross_entropy_cpu(logits, targets, reduction="none"), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- the raw C++ ops

def _raw(op, *args):
    load_extension()
    return getattr(torch.ops.aimv2, op)(*args)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_raw_ops_agree(dtype):
    """Forward with gradient, backward from the saved lse, and in place give one gradient; loss and lse agree
    with the reference. Per-row and scalar scales."""
    n, v = 11, 1003
    logits = (torch.randn(n, v) * 2).to(dtype)
    targets = _targets((n,), v, -100)
    args = (targets, -100, 0.1, 1e-3)
    rows, grad = torch.full((n,), float("nan")), torch.full_like(logits, 7)
    lse = torch.full((n,), float("nan"), dtype=torch.float64)
    scale = torch.randn(n)
    _raw("cross_entropy_rows_out", logits, *args, None, scale, rows, lse, grad)
    again = torch.full_like(logits, 7)
    _raw("cross_entropy_rows_out", logits, *args, lse, scale, None, None, again)
    in_place = logits.clone()
    _raw("cross_entropy_rows_inplace", in_place, *args, None, scale, None, None)
    expected = cross_entropy_reference(logits, targets, label_smoothing=0.1, z_loss=1e-3, reduction="none")
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(logits.double(), -1), rtol=1e-6, atol=1e-6)
    # exp(x - lse) against exp(x - max) / sum: fp32 values a few ulp apart, which may round to neighbours
    tol = dict(rtol=1e-6, atol=1e-8) if dtype == torch.float32 else dict(rtol=torch.finfo(dtype).eps, atol=1e-7)
    torch.testing.assert_close(again, grad, **tol)
    torch.testing.assert_close(in_place, grad, rtol=0, atol=0)
    scalar = torch.full_like(logits, 7)
    _raw("cross_entropy_rows_out", logits, *args, lse, torch.tensor([2.0]), None, None, scalar)
    unit = torch.full_like(logits, 7)
    _raw("cross_entropy_rows_out", logits, *args, lse, None, None, None, unit)
    torch.testing.assert_close(scalar.float(), unit.float() * 2, rtol=0, atol=1e-7)  # fp16 subnormals round


def test_cpp_entry_checks_arguments():
    """The ops themselves reject bad shapes, dtypes, targets and aliasing (the public function normally
    catches the first three)."""
    logits, targets = torch.randn(4, 10), torch.tensor([0, 3, -100, 9])
    rows = torch.empty(4)

    def call(*a, op="cross_entropy_rows_out"):
        return _raw(op, *a)

    with pytest.raises(RuntimeError, match="logits must be"):
        call(logits[0], targets, -100, 0.0, 0.0, None, None, rows, None, None)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        call(logits.double(), targets, -100, 0.0, 0.0, None, None, rows, None, None)
    with pytest.raises(RuntimeError, match="targets must be an integer"):
        call(logits, targets.float(), -100, 0.0, 0.0, None, None, rows, None, None)
    with pytest.raises(RuntimeError, match="targets must have shape"):
        call(logits, targets[:3], -100, 0.0, 0.0, None, None, rows, None, None)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 10\).*found 10"):
        call(logits, torch.tensor([0, 10, 1, 2]), -100, 0.0, 0.0, None, None, rows, None, None)
    with pytest.raises(RuntimeError, match="found -100"):
        call(logits, targets, -1, 0.0, 0.0, None, None, rows, None, None)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        call(logits, targets, -100, 1.5, 0.0, None, None, rows, None, None)
    with pytest.raises(RuntimeError, match="z_loss"):
        call(logits, targets, -100, 0.0, -1.0, None, None, rows, None, None)
    with pytest.raises(RuntimeError, match="loss_rows must have dtype"):
        call(logits, targets, -100, 0.0, 0.0, None, None, rows.double(), None, None)
    with pytest.raises(RuntimeError, match="lse must have dtype Double"):
        call(logits, targets, -100, 0.0, 0.0, None, None, None, torch.empty(4), None)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        call(logits, targets, -100, 0.0, 0.0, None, None, None, torch.empty(5, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="grad must have the logits' dtype"):
        call(logits, targets, -100, 0.0, 0.0, None, None, None, None, torch.empty(4, 10).half())
    with pytest.raises(RuntimeError, match="grad_scale must have shape"):
        call(logits, targets, -100, 0.0, 0.0, None, torch.ones(3), None, None, torch.empty(4, 10))
    with pytest.raises(RuntimeError, match="only the gradient"):
        call(logits, targets, -100, 0.0, 0.0, torch.zeros(4), None, rows, None, torch.empty(4, 10))
    with pytest.raises(RuntimeError, match="single memory location"):  # out= the logits: not in place
        call(logits, targets, -100, 0.0, 0.0, None, None, None, None, logits)
    with pytest.raises(RuntimeError, match="unit column stride"):
        call(torch.randn(10, 4).t(), targets, -100, 0.0, 0.0, None, None, None, None, op="cross_entropy_rows_inplace")


def _portable_case():
    torch.manual_seed(0)
    logits = (torch.randn(6, 1003) * 4).requires_grad_()
    targets = torch.randint(0, 1003, (6,))
    targets[0] = -100
    loss = cross_entropy_cpu(logits, targets, label_smoothing=0.1, z_loss=1e-3, reduction="none")
    loss.backward(torch.arange(6.0) - 2)
    return loss.detach(), logits.grad


def test_portable_simd_path_matches(tmp_path):
    """The portable (non-AVX2) build of the row loops, forced by AIMV2_CPU_SIMD=portable in a subprocess,
    gives this process's loss and gradients up to fp32 rounding."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[2])
        from test_cross_entropy_cpu import _portable_case
        torch.save(_portable_case(), sys.argv[1])
    """)
    path = tmp_path / "portable.pt"
    env = dict(os.environ, AIMV2_CPU_SIMD="portable")
    subprocess.run([sys.executable, "-c", script, str(path), os.path.dirname(__file__)], check=True, env=env,
                   timeout=300)
    (loss_p, grad_p), (loss_n, grad_n) = torch.load(path), _portable_case()
    torch.testing.assert_close(loss_p, loss_n, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_p, grad_n, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- linear_cross_entropy

def _lce(chunk):
    def fn(hidden, weight, targets, **kw):
        return linear_cross_entropy_cpu(hidden, weight, targets, chunk_size=chunk, **kw)
    return fn


def _lce_case(dtype, n, d, v, chunk, reduction, options, with_bias, fn=None):
    ignore_index, eps, z = options
    hidden = torch.randn(n, d).to(dtype)
    weight = (torch.randn(v, d) / d ** 0.5).to(dtype)
    bias = torch.randn(v).to(dtype) if with_bias else None
    targets = _targets((n,), v, ignore_index)
    upstream = _upstream((n,), reduction)
    kw = dict(ignore_index=ignore_index, label_smoothing=eps, z_loss=z, reduction=reduction, with_bias=with_bias)
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    ours = _run(fn or _lce(chunk), inputs, [targets], upstream, **kw)
    ref = _run(linear_cross_entropy_reference, inputs, [targets], upstream, **kw)
    oracle = _run(linear_cross_entropy_reference, [x.double() for x in inputs], [targets], upstream.double(), **kw)
    assert ours[0].dtype == torch.float32 and all(g.dtype == dtype for g in ours[1:])
    _check(ours, ref, oracle, f"{dtype} n={n} v={v} chunk={chunk} {reduction} {options} bias={with_bias}")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("options", OPTIONS)
def test_linear_cross_entropy_matches_reference(dtype, reduction, with_bias, options):
    """33 tokens in chunks of 10 (three full chunks and a remainder of 3), V = 50."""
    _lce_case(dtype, 33, 32, 50, 10, reduction, options, with_bias)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n, chunk", [(1, None), (7, 3), (40, None)])
def test_linear_cross_entropy_wide_vocab(dtype, reduction, n, chunk):
    """V = 1003 (vector tails), one token, 7 tokens in chunks of 3, and 40 tokens in one default chunk."""
    _lce_case(dtype, n, 64, 1003, chunk, reduction, OPTIONS[1], True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_public_api(reduction):
    """Through aimv2_kernels.linear_cross_entropy(backend="cpu"), with (B, S, D) hidden and (B, S) targets."""
    def fn(hidden, weight, targets, **kw):
        return aimv2_kernels.linear_cross_entropy(hidden.view(3, 7, -1), weight, targets.view(3, 7), backend="cpu",
                                                  **kw).reshape(-1 if reduction == "none" else ())
    _lce_case(torch.float32, 21, 32, 77, None, reduction, OPTIONS[1], True, fn=fn)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_all_ignored(reduction):
    hidden = torch.randn(2, 5, 32).bfloat16().requires_grad_()
    weight = torch.randn(50, 32).bfloat16().requires_grad_()
    bias = torch.randn(50).bfloat16().requires_grad_()
    targets = torch.full((2, 5), 3)
    loss = linear_cross_entropy_cpu(hidden, weight, targets, bias=bias, ignore_index=3, z_loss=1e-3,
                                    label_smoothing=0.1, reduction=reduction, chunk_size=4)
    loss.sum().backward()
    assert (loss == 0).all() and loss.shape == ((2, 5) if reduction == "none" else ())
    assert all((g == 0).all() for g in (hidden.grad, weight.grad, bias.grad))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_large_logits(reduction):
    """Logits of magnitude ~1e4 from the matmul stay finite, with z-loss."""
    hidden = torch.randn(12, 16) * 100
    weight = torch.randn(300, 16) * 25
    targets = _targets((12,), 300, -100, every=4)
    up = _upstream((12,), reduction)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    ours = _run(_lce(5), [hidden, weight], [targets], up, **kw)
    ref = _run(linear_cross_entropy_reference, [hidden, weight], [targets], up, **kw)
    oracle = _run(linear_cross_entropy_reference, [hidden.double(), weight.double()], [targets], up.double(), **kw)
    _check(ours, ref, oracle, f"1e4 logits {reduction}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_partial_requires_grad(reduction):
    check_partial_requires_grad(linear_cross_entropy_cpu, "cpu", reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_never_holds_full_logits(reduction, dtype):
    """Neither fp32 (gradients computed in the forward) nor bf16 (recomputed in the backward) holds N x V."""
    check_never_holds_full_logits(linear_cross_entropy_cpu, "cpu", reduction, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_backward_only_scales(reduction):
    check_backward_only_scales(linear_cross_entropy_cpu, "cpu", reduction)


def test_empty_inputs():
    check_empty_inputs(cross_entropy_cpu, linear_cross_entropy_cpu, "cpu")


def test_chunk_rows_default():
    assert lce_module.chunk_rows(100_000, 32000) == lce_module.CHUNK_ELEMENTS // 32000
    assert 4 * 2**20 <= lce_module.CHUNK_ELEMENTS * 4 <= 64 * 2**20  # an fp32 chunk of a few to tens of MiB
    assert lce_module.chunk_rows(7, 32000) == 7 and lce_module.chunk_rows(5, 10 ** 9) == 1
    assert lce_module.chunk_rows(33, 50, 10) == 10 and lce_module.chunk_rows(0, 50) == 1


# ---------------------------------------------------------------- registration: opcheck and torch.compile

def test_opcheck_cross_entropy():
    logits = torch.randn(6, 70, requires_grad=True)
    targets = _targets((6,), 70, -100)
    for reduction in REDUCTIONS:
        torch.library.opcheck(cross_entropy_op, (logits, targets, -100, 0.1, 1e-3, reduction))
    lse = torch.logsumexp(logits.detach().double(), -1)
    torch.library.opcheck(cross_entropy_backward_op,
                          (torch.randn(6), logits.detach(), targets, lse, -100, 0.1, 1e-3, "none"))


def test_opcheck_linear_cross_entropy():
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(70, 16, requires_grad=True)
    bias = torch.randn(70, requires_grad=True)
    targets = _targets((9,), 70, -100)
    for reduction, grads in (("mean", True), ("sum", True), ("none", False)):
        torch.library.opcheck(linear_cross_entropy_op, (hidden, weight, targets, bias, -100, 0.1, 1e-3, reduction,
                                                        grads, grads, grads, 4))
    lse = torch.logsumexp((hidden.detach() @ weight.detach().t() + bias.detach()).double(), -1)
    torch.library.opcheck(linear_cross_entropy_backward_op,
                          (torch.randn(9), hidden.detach(), weight.detach(), targets, bias.detach(),
                           lse, -100, 0.1, 1e-3, True, True, True, 4))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    check_compile_fullgraph(cross_entropy_cpu, linear_cross_entropy_cpu, "cpu", reduction)


