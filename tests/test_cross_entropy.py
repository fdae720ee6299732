"""cross_entropy and linear_cross_entropy's kernels, backend by backend, against the reference within the float64
error budget.

How the tests run over the backends: tests/backend_cases.py.
"""
import importlib
import os
import subprocess
import sys
import textwrap
from itertools import product
from types import SimpleNamespace

import pytest
import torch
from backend_cases import BACKENDS, case_id, for_backends
from ce_cases import check_backend
from ce_cases import run as _run
from ce_cases import targets_with_ignored as _targets
from ce_cases import upstream as _upstream
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import aimv2_kernels
from aimv2_kernels._backend import load_extension
from aimv2_kernels.reference.cross_entropy import cross_entropy_reference, linear_cross_entropy_reference

OPS = ("cross_entropy", "linear_cross_entropy")  # the `backend` fixture (conftest.py) skips where one cannot run
LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
# (ignore_index, label_smoothing, z_loss): the defaults; then all features, with an in-range ignore_index
# (AIMv2's pad id 1); then an ignore_index above V.
OPTIONS = [(-100, 0.0, 0.0), (1, 0.1, 1e-3), (5000, 0.2, 0.0)]
# Logits shapes of cross_entropy_matches_reference. cpu: V of 1, 7, 33, 50, 1003 and 4099, no multiple of a
# vector width: the tails and single-lane rows. triton (interpreter and GPU compile time): one row, several
# blocks over V with a partial last one, and (B, S, V) logits.
CE_SHAPES = {"cpu": [(1, 1), (5, 7), (9, 50), (7, 1003), (3, 11, 33), (4, 4099)],
             "triton": [(1, 50), (7, 1003), (3, 11, 50)]}
# (tokens, chunk) of linear_cross_entropy_wide_vocab: one token, 7 tokens in chunks of 3; cpu also 40 tokens in
# one default chunk.
WIDE_VOCAB = {"cpu": [(1, None), (7, 3), (40, None)], "triton": [(1, None), (7, 3)]}
# The backends' modules: the entry points called directly and the custom ops; the dtype of the saved lse.
MODULES = {"cpu": ("aimv2_kernels.compiled", "compiled", torch.float64),
           "triton": ("aimv2_kernels.triton", "triton", torch.float32)}


def _cases(per_backend, *axes):
    """``(backend, *one value of each axis, one value of the backend's list in per_backend)``, every combination."""
    return [(b, *case) for b in BACKENDS for case in product(*axes, per_backend[b])]


@pytest.fixture
def dev(backend, device):
    """Where the backend's tensors live: the CPU for ``cpu``; the GPU, else the CPU (interpreter), for ``triton``."""
    return torch.device("cpu") if backend == "cpu" else device


def _kernels(backend):
    """The backend's ``ce`` and ``lce`` entry points (keyword arguments as the public ops, plus ``chunk_size``
    for ``lce``), its two modules and the dtype of the lse it saves."""
    package, suffix, lse_dtype = MODULES[backend]
    ce_module = importlib.import_module(f"{package}.cross_entropy")
    lce_module = importlib.import_module(f"{package}.linear_cross_entropy")
    return SimpleNamespace(ce=getattr(ce_module, f"cross_entropy_{suffix}"),
                           lce=getattr(lce_module, f"linear_cross_entropy_{suffix}"),
                           ce_module=ce_module, lce_module=lce_module, lse_dtype=lse_dtype)


@pytest.fixture
def kernels(backend):
    return _kernels(backend)


# ---------------------------------------------------------------- cross_entropy over given logits

@pytest.mark.parametrize("backend,dtype,reduction,options,shape",
                         _cases(CE_SHAPES, LOW_DTYPES, REDUCTIONS, OPTIONS[:2]), indirect=["backend"], ids=case_id)
def test_cross_entropy_matches_reference(backend, dev, dtype, shape, reduction, options):
    """Through aimv2_kernels.cross_entropy(backend=...). (An ignore_index outside [0, V) is covered by
    test_cross_entropy_target_dtypes_and_ignore_index.)"""
    ignore_index, eps, z = options
    logits = (torch.randn(shape, device=dev) * 3).to(dtype)
    targets = _targets(shape[:-1], shape[-1], ignore_index, dev)
    upstream = _upstream(shape[:-1], reduction, dev)

    def public(logits, targets, **kw):
        return aimv2_kernels.cross_entropy(logits, targets, backend=backend, **kw)

    kw = dict(ignore_index=ignore_index, label_smoothing=eps, z_loss=z, reduction=reduction)
    ours = check_backend(public, cross_entropy_reference, [logits], [targets], upstream,
                         f"{backend} {dtype} {shape} {reduction} {options}", **kw)
    counted = targets != ignore_index
    assert (ours[1][~counted] == 0).all()
    if reduction == "none":
        assert (ours[0][~counted] == 0).all()


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=case_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@for_backends()
def test_cross_entropy_all_ignored(backend, dev, kernels, dtype, reduction):
    logits = torch.randn(5, 50, device=dev).to(dtype).requires_grad_()
    targets = torch.full((5,), -100, device=dev)
    loss = kernels.ce(logits, targets, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    loss.sum().backward()
    assert (loss == 0).all() and loss.shape == ((5,) if reduction == "none" else ())
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=case_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@for_backends()
def test_cross_entropy_large_logits(backend, dev, kernels, dtype, reduction):
    """Logits of magnitude 1e4 (with z-loss, so lse^2 ~ 1e8) give finite values and gradients."""
    logits = (torch.randn(6, 300, device=dev) * 1e4).clamp(-6e4, 6e4).to(dtype)
    targets = _targets((6,), 300, -100, dev, every=4)
    targets[1] = logits[1].float().argmax()  # a target at the row's maximum: a loss near 0 next to 1e4 logits
    upstream = _upstream((6,), reduction, dev)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    check_backend(kernels.ce, cross_entropy_reference, [logits], [targets], upstream,
                  f"1e4 logits {backend} {dtype} {reduction}", **kw)


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int16, torch.uint8], ids=case_id)
@for_backends()
def test_cross_entropy_target_dtypes_and_ignore_index(backend, dev, kernels, target_dtype):
    """Any integer target dtype gives the int64 result; ignore_index may lie inside or outside [0, V)."""
    logits = torch.randn(9, 50, device=dev)
    for ignore_index in (-100, 1, 50, 255) if target_dtype.is_signed else (1, 50, 255):
        targets = _targets((9,), 50, ignore_index, dev)
        expected = kernels.ce(logits, targets, ignore_index=ignore_index, reduction="none")
        got = kernels.ce(logits, targets.to(target_dtype), ignore_index=ignore_index, reduction="none")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@for_backends()
def test_cross_entropy_non_contiguous_inputs(backend, dev, kernels):
    logits = torch.randn(50, 7, device=dev).t()  # column stride 7
    targets = _targets((14,), 50, -100, dev)[::2]
    expected = kernels.ce(logits.contiguous(), targets.contiguous(), reduction="none")
    torch.testing.assert_close(kernels.ce(logits, targets, reduction="none"), expected, rtol=0, atol=0)


@for_backends("triton")
def test_out_of_range_target_without_value_checks_gives_nan(backend, dev, monkeypatch):
    """With AIMV2_CHECK_VALUES=0 a bad target is not caught on the host: its row must come out NaN (loss and
    gradient), never silently wrong, and the other rows must be unaffected. (The cpu op checks its targets
    itself: test_cpp_entry_checks_arguments.)"""
    monkeypatch.setenv("AIMV2_CHECK_VALUES", "0")
    logits = torch.randn(4, 50, device=dev, requires_grad=True)
    targets = torch.tensor([3, 50, -1, 7], device=dev)
    loss = aimv2_kernels.cross_entropy(logits, targets, reduction="none", backend=backend)
    loss.sum().backward()
    assert loss[1:3].isnan().all() and logits.grad[1:3].isnan().all()
    good = [0, 3]
    ref = torch.nn.functional.cross_entropy(logits.detach()[good], targets[good], reduction="none")
    torch.testing.assert_close(loss.detach()[good], ref)
    assert torch.isfinite(logits.grad[good]).all()


# ---------------------------------------------------------------- cpu: the raw C++ ops

def _raw(op, *args):
    load_extension()
    return getattr(torch.ops.aimv2, op)(*args)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=case_id)
@for_backends("cpu")
def test_raw_ops_agree(backend, dtype):
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


@for_backends("cpu")
def test_cpp_entry_checks_arguments(backend):
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
    loss = _kernels("cpu").ce(logits, targets, label_smoothing=0.1, z_loss=1e-3, reduction="none")
    loss.backward(torch.arange(6.0) - 2)
    return loss.detach(), logits.grad


@for_backends("cpu")
def test_portable_simd_path_matches(backend, tmp_path):
    """The portable (non-AVX2) build of the row loops, forced by AIMV2_CPU_SIMD=portable in a subprocess,
    gives this process's loss and gradients up to fp32 rounding."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[2])
        from test_cross_entropy import _portable_case
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

def _lce_case(dev, fn, dtype, n, d, v, reduction, options, with_bias, what):
    ignore_index, eps, z = options
    hidden = torch.randn(n, d, device=dev).to(dtype)
    weight = (torch.randn(v, d, device=dev) / d ** 0.5).to(dtype)
    bias = torch.randn(v, device=dev).to(dtype) if with_bias else None
    targets = _targets((n,), v, ignore_index, dev)
    upstream = _upstream((n,), reduction, dev)
    kw = dict(ignore_index=ignore_index, label_smoothing=eps, z_loss=z, reduction=reduction, with_bias=with_bias)
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    check_backend(fn, linear_cross_entropy_reference, inputs, [targets], upstream,
                  f"{what} {dtype} n={n} v={v} {reduction} {options} bias={with_bias}", **kw)


def _chunked(lce, chunk):
    def fn(hidden, weight, targets, **kw):
        return lce(hidden, weight, targets, chunk_size=chunk, **kw)
    return fn


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=case_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("options", OPTIONS, ids=case_id)
@for_backends()
def test_linear_cross_entropy_matches_reference(backend, dev, kernels, dtype, reduction, with_bias, options):
    """33 tokens in chunks of 10 (three full chunks and a remainder of 3), V = 50."""
    _lce_case(dev, _chunked(kernels.lce, 10), dtype, 33, 32, 50, reduction, options, with_bias,
              f"{backend} chunk=10")


@pytest.mark.parametrize("backend,dtype,reduction,n_chunk", _cases(WIDE_VOCAB, LOW_DTYPES, REDUCTIONS),
                         indirect=["backend"], ids=case_id)
def test_linear_cross_entropy_wide_vocab(backend, dev, kernels, dtype, reduction, n_chunk):
    """V = 1003 (vector tails; several blocks over V, the last one partial) with a bias, in the chunks of
    WIDE_VOCAB."""
    n, chunk = n_chunk
    _lce_case(dev, _chunked(kernels.lce, chunk), dtype, n, 64, 1003, reduction, OPTIONS[1], True,
              f"{backend} chunk={chunk}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@for_backends("cpu")
def test_linear_cross_entropy_public_api(backend, dev, reduction):
    """Through aimv2_kernels.linear_cross_entropy(backend=...), with (B, S, D) hidden and (B, S) targets."""
    def fn(hidden, weight, targets, **kw):
        return aimv2_kernels.linear_cross_entropy(hidden.view(3, 7, -1), weight, targets.view(3, 7),
                                                  backend=backend, **kw).reshape(-1 if reduction == "none" else ())
    _lce_case(dev, fn, torch.float32, 21, 32, 77, reduction, OPTIONS[1], True, f"{backend} public")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@for_backends()
def test_linear_cross_entropy_all_ignored(backend, dev, kernels, reduction):
    hidden = torch.randn(2, 5, 32, device=dev).bfloat16().requires_grad_()
    weight = torch.randn(50, 32, device=dev).bfloat16().requires_grad_()
    bias = torch.randn(50, device=dev).bfloat16().requires_grad_()
    targets = torch.full((2, 5), 3, device=dev)
    loss = kernels.lce(hidden, weight, targets, bias=bias, ignore_index=3, z_loss=1e-3,
                       label_smoothing=0.1, reduction=reduction, chunk_size=4)
    loss.sum().backward()
    assert (loss == 0).all() and loss.shape == ((2, 5) if reduction == "none" else ())
    assert all((g == 0).all() for g in (hidden.grad, weight.grad, bias.grad))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@for_backends("cpu")
def test_linear_cross_entropy_large_logits(backend, dev, kernels, reduction):
    """Logits of magnitude ~1e4 from the matmul stay finite, with z-loss."""
    hidden = torch.randn(12, 16, device=dev) * 100
    weight = torch.randn(300, 16, device=dev) * 25
    targets = _targets((12,), 300, -100, dev, every=4)
    up = _upstream((12,), reduction, dev)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    check_backend(_chunked(kernels.lce, 5), linear_cross_entropy_reference, [hidden, weight], [targets], up,
                  f"1e4 logits {backend} {reduction}", **kw)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@for_backends()
def test_linear_cross_entropy_partial_requires_grad(backend, dev, kernels, reduction):
    """A frozen head (weight without grad) and a frozen trunk (hidden without grad) give the same grads."""
    lce = kernels.lce
    hidden = torch.randn(9, 32, device=dev)
    weight = torch.randn(50, 32, device=dev)
    targets = _targets((9,), 50, -100, dev)
    up = _upstream((9,), reduction, dev)
    full = _run(_chunked(lce, 4), [hidden, weight], [targets], up, reduction=reduction)
    for frozen in (0, 1):
        xs = [hidden.clone().requires_grad_(frozen != 0), weight.clone().requires_grad_(frozen != 1)]
        loss = lce(*xs, targets, reduction=reduction, chunk_size=4)
        (loss * up).sum().backward()
        assert xs[frozen].grad is None
        torch.testing.assert_close(xs[1 - frozen].grad, full[2 - frozen], rtol=0, atol=0)
    with torch.no_grad():
        value = lce(hidden, weight, targets, reduction=reduction, chunk_size=4)
    torch.testing.assert_close(value, full[0], rtol=0, atol=0)


class RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op, including those inside our custom ops."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import OPDEFS

        name = func._schema.name
        if name in OPDEFS:  # a Python custom op: run its body under this mode, to see its allocations
            with self:
                out = OPDEFS[name]._init_fn(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(x.shape) for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
        return out


class RecordOps(RecordShapes):
    """RecordShapes that also records the name of every aten op."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("backend,reduction,dtype",
                         _cases({"cpu": [torch.float32, torch.bfloat16], "triton": [torch.float32]},
                                ["mean", "none"]), indirect=["backend"], ids=case_id)
def test_linear_cross_entropy_never_holds_full_logits(backend, dev, kernels, reduction, dtype):
    """No tensor of N x V elements exists, forward or backward; the (chunk, V) buffer does. (cpu: neither fp32,
    gradients computed in the forward, nor bf16, recomputed in the backward.)"""
    n, d, v, chunk = 40, 32, 50, 8  # N*V = 2000 > V*D = 1600
    hidden = torch.randn(n, d, device=dev, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, device=dev, dtype=dtype, requires_grad=True)
    bias = torch.randn(v, device=dev, dtype=dtype, requires_grad=True)
    targets = _targets((n,), v, -100, dev)
    for fn, kw in ((kernels.lce, dict(chunk_size=chunk)), (linear_cross_entropy_reference, {})):
        mode = RecordShapes()
        with mode:
            fn(hidden, weight, targets, bias=bias, reduction=reduction, **kw).sum().backward()
        largest = max(torch.Size(s).numel() for s in mode.shapes)
        if fn is linear_cross_entropy_reference:
            assert largest >= n * v  # the recorder sees the reference's full logits
        else:
            assert largest < n * v, max(mode.shapes, key=lambda s: torch.Size(s).numel())
            assert (chunk, v) in mode.shapes


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@for_backends()
def test_linear_cross_entropy_backward_only_scales(backend, dev, kernels, reduction):
    """fp32 "mean"/"sum" compute the gradients in the forward, so the backward only scales them. It creates no
    zero-filled tensor (autograd would hand it zeros for every output that gets no gradient, the (V, D) weight
    gradient among them, unless the op turns that off) and, when the graph is not kept, no new tensor either: it
    scales the saved gradients in place. With ``retain_graph`` the saved gradients are left alone: each replay
    gives the first backward's gradients exactly (their values against the oracle are checked elsewhere)."""
    n, d, v = 24, 16, 40
    hidden = torch.randn(n, d, device=dev, requires_grad=True)
    weight = torch.randn(v, d, device=dev, requires_grad=True)
    targets = torch.randint(0, v, (n,), device=dev)
    loss = kernels.lce(hidden, weight, targets, reduction=reduction)
    mode = RecordOps()
    with mode:
        (2.5 * loss).backward()
    made = [name for name in mode.names if any(k in name for k in ("zero", "fill", "empty", "clone", "copy"))]
    assert not made, made
    assert mode.names.count("aten::mul_") == 2, mode.names
    expected = [x.grad for x in (hidden, weight)]
    loss = kernels.lce(hidden, weight, targets, reduction=reduction)
    for _ in range(2):  # the graph is kept: the saved gradients must not be scaled in place
        hidden.grad = weight.grad = None
        (2.5 * loss).backward(retain_graph=True)
        for x, g in zip((hidden, weight), expected):
            torch.testing.assert_close(x.grad, g, rtol=0, atol=0)


@for_backends()
def test_empty_inputs(backend, dev, kernels):
    """Zero tokens: "mean" and "sum" give 0, "none" an empty loss, and zero gradients."""
    logits = torch.randn(0, 50, device=dev, requires_grad=True)
    hidden = torch.randn(0, 16, device=dev, requires_grad=True)
    weight = torch.randn(50, 16, device=dev, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=dev)
    for reduction in ("mean", "sum", "none"):
        a = kernels.ce(logits, targets, reduction=reduction)
        b = kernels.lce(hidden, weight, targets, reduction=reduction)
        assert a.shape == b.shape == ((0,) if reduction == "none" else ())
        (a.sum() + b.sum()).backward()
        assert (a == 0).all() and (b == 0).all() and (weight.grad == 0).all()


@for_backends()
def test_chunk_rows_default(backend, kernels):
    lce_module = kernels.lce_module
    assert lce_module.chunk_rows(100_000, 32000) == lce_module.CHUNK_ELEMENTS // 32000
    if backend == "cpu":  # an fp32 chunk of a few to tens of MiB (Triton's is sized for GPU memory)
        assert 4 * 2**20 <= lce_module.CHUNK_ELEMENTS * 4 <= 64 * 2**20
    assert lce_module.chunk_rows(7, 32000) == 7 and lce_module.chunk_rows(5, 10 ** 9) == 1
    assert lce_module.chunk_rows(33, 50, 10) == 10 and lce_module.chunk_rows(0, 50) == 1


@for_backends("triton")
def test_autotune_pruning(backend):
    """The GPU config space, pruned: blocks no wider than needed, 1..64 elements per thread."""
    import triton

    from aimv2_kernels.triton.cross_entropy import _prune

    configs = [triton.Config({"BLOCK_V": b}, num_warps=w) for b in (256, 1024, 8192) for w in (4, 8, 16)]
    kept = lambda v: {(c.kwargs["BLOCK_V"], c.num_warps) for c in _prune(configs, {"V": v})}
    assert kept(50) == {(256, 4), (256, 8)}
    assert kept(32000) == {(1024, 4), (1024, 8), (1024, 16), (8192, 4), (8192, 8), (8192, 16)}
    assert _prune(configs[-1:], {"V": 1}) == configs[-1:]  # never empty


# ---------------------------------------------------------------- registration: opcheck and torch.compile

@for_backends()
def test_opcheck_cross_entropy(backend, dev, kernels):
    ops = kernels.ce_module
    logits = torch.randn(6, 70, device=dev, requires_grad=True)
    targets = _targets((6,), 70, -100, dev)
    for reduction in REDUCTIONS:
        torch.library.opcheck(ops.cross_entropy_op, (logits, targets, -100, 0.1, 1e-3, reduction))
    lse = torch.logsumexp(logits.detach().to(kernels.lse_dtype), -1)
    torch.library.opcheck(ops.cross_entropy_backward_op,
                          (torch.randn(6, device=dev), logits.detach(), targets, lse, -100, 0.1, 1e-3, "none"))


@for_backends()
def test_opcheck_linear_cross_entropy(backend, dev, kernels):
    ops = kernels.lce_module
    hidden = torch.randn(9, 16, device=dev, requires_grad=True)
    weight = torch.randn(70, 16, device=dev, requires_grad=True)
    bias = torch.randn(70, device=dev, requires_grad=True)
    targets = _targets((9,), 70, -100, dev)
    for reduction, grads in (("mean", True), ("sum", True), ("none", False)):
        torch.library.opcheck(ops.linear_cross_entropy_op, (hidden, weight, targets, bias, -100, 0.1, 1e-3,
                                                            reduction, grads, grads, grads, 4))
    logits = hidden.detach() @ weight.detach().t() + bias.detach()
    lse = torch.logsumexp(logits.to(kernels.lse_dtype), -1)
    torch.library.opcheck(ops.linear_cross_entropy_backward_op,
                          (torch.randn(9, device=dev), hidden.detach(), weight.detach(), targets, bias.detach(),
                           lse, -100, 0.1, 1e-3, True, True, True, 4))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@for_backends()
def test_compile_fullgraph(backend, dev, kernels, reduction):
    """Both ops under torch.compile(fullgraph=True), forward and backward, match eager."""
    ce, lce = kernels.ce, kernels.lce
    torch._dynamo.reset()
    hidden = torch.randn(2, 5, 16, device=dev, requires_grad=True)
    weight = torch.randn(50, 16, device=dev, requires_grad=True)
    targets = _targets((2, 5), 50, -100, dev)

    def model(h, w):
        logits = h @ w.t()
        a = ce(logits, targets, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
        b = lce(h, w, targets, label_smoothing=0.1, z_loss=1e-3, reduction=reduction, chunk_size=4)
        return (a * 2 + b).sum()

    eager = torch.autograd.grad(model(hidden, weight), (hidden, weight))
    compiled = torch.compile(model, fullgraph=True)
    got = torch.autograd.grad(compiled(hidden, weight), (hidden, weight))
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)
