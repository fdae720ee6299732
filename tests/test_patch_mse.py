"""patch_mse_loss's kernels, backend by backend, against the reference within the float64 error budget.

How the tests run over the backends: tests/backend_cases.py.
"""
import importlib
from itertools import product

import pytest
import torch
from backend_cases import BACKENDS, case_id, for_backends

from aimv2_kernels import patch_mse_loss
from aimv2_kernels._backend import load_extension
from aimv2_kernels.reference.patch_mse import counted_mask, patch_mse_loss_reference
from aimv2_kernels.testing import FORWARD_K, GRADIENT_K, assert_within_budget, random_prefix_lens

try:
    import triton
    import triton.language as tl
except ImportError:  # the triton cases then fail in the `backend` fixture; the cpu ones still run
    triton = None

OP = "patch_mse_loss"
OPS = ("patch_mse_loss",)  # the `backend` fixture (conftest.py) skips where one cannot run
MODULES = {"cpu": "aimv2_kernels.compiled.patch_mse", "triton": "aimv2_kernels.triton.patch_mse"}
LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
# (B, C, H, W, p). cpu: the AIMv2 patch (C=3, p=14), then small odd patches and non-square images. triton: the
# AIMv2 patch on a non-square image, then patches whose P is not a power of two (C=1 p=5: P=25; C=2 p=3: P=18);
# batch sizes leave partial row blocks (fewer shapes: the interpreter is slow, and on a GPU each is a compile).
SHAPES = {
    "cpu": [(4, 3, 28, 28, 14), (5, 1, 9, 15, 3), (4, 2, 10, 25, 5), (6, 3, 12, 8, 4)],
    "triton": [(5, 3, 28, 42, 14), (4, 1, 10, 15, 5), (5, 2, 9, 12, 3)],
}


@pytest.fixture
def dev(backend, device):
    """Where the backend's tensors live: the CPU for ``cpu``; the GPU, else the CPU (interpreter), for ``triton``."""
    return torch.device("cpu") if backend == "cpu" else device


def _inputs(shape, dtype, target_offset, device):
    """Fresh random images (non-zero mean, non-unit scale) and predictions, drawn in fp32, cast to ``dtype``."""
    b, c, h, w, p = shape
    n = (h // p) * (w // p)
    images = (torch.randn(b, c, h, w) * 2 + 0.5).to(dtype).to(device)
    pred = torch.randn(b, n - target_offset, c * p * p).to(dtype).to(device)
    return images, pred, n


def _loss_and_grad(fn, pred, images, p, lens, target_offset, reduction, upstream):
    pred = pred.detach().clone().requires_grad_()
    out = fn(pred, images, p, lens, target_offset=target_offset, reduction=reduction)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), pred.grad


def _public(backend):
    def fn(pred, images, p, lens, **kw):
        return patch_mse_loss(pred, images, p, lens, backend=backend, **kw)
    return fn


def _check_against_reference(fn, pred, images, p, lens, target_offset, reduction, upstream, what=""):
    """``fn`` vs the same-dtype reference vs the float64 oracle, loss and gradient; returns ``fn``'s."""
    out, grad = _loss_and_grad(fn, pred, images, p, lens, target_offset, reduction, upstream)
    ref, ref_grad = _loss_and_grad(patch_mse_loss_reference, pred, images, p, lens, target_offset, reduction,
                                   upstream)
    oracle, oracle_grad = _loss_and_grad(patch_mse_loss_reference, pred.double(), images.double(), p, lens,
                                         target_offset, reduction, upstream.double())
    assert out.dtype == torch.float32 and grad.dtype == pred.dtype
    assert_within_budget(out, ref, oracle, k=FORWARD_K, name=f"loss {what}")
    assert_within_budget(grad, ref_grad, oracle_grad, k=GRADIENT_K, name=f"grad pred {what}")
    return out, grad


def _reference_cases():
    """``(backend, dtype, shape, target_offset, reduction, with_prefix)``: every case with prefix lengths; for
    ``cpu`` every case without them too, for ``triton`` (interpreter and GPU compile time) only the AIMv2
    shape's per-row losses with target offset 1."""
    for backend in BACKENDS:
        for dtype, shape, offset, reduction in product(LOW_DTYPES, SHAPES[backend], (0, 1), REDUCTIONS):
            yield backend, dtype, shape, offset, reduction, True
            if backend == "cpu" or (shape == SHAPES[backend][0] and offset == 1 and reduction == "none"):
                yield backend, dtype, shape, offset, reduction, False


@pytest.mark.parametrize("backend,dtype,shape,target_offset,reduction,with_prefix", list(_reference_cases()),
                         indirect=["backend"], ids=case_id)
def test_matches_reference(backend, dev, dtype, shape, target_offset, reduction, with_prefix):
    images, pred, n = _inputs(shape, dtype, target_offset, dev)
    batch, length = shape[0], n - target_offset
    lens = random_prefix_lens(batch, n).to(dev) if with_prefix else None  # 0, 1, N-1, N, then random
    upstream = (torch.randn(batch, length) if reduction == "none" else torch.randn(())).to(dev)
    out, grad = _check_against_reference(_public(backend), pred, images, shape[-1], lens, target_offset, reduction,
                                         upstream, f"{backend} {dtype} {reduction}")
    if lens is not None:  # rows that do not count are exactly 0, in the value and in the gradient
        skipped = ~counted_mask(lens, batch, length, target_offset, dev)
        assert skipped.any() and (~skipped).any()
        assert (grad[skipped] == 0).all()
        if reduction == "none":
            assert (out[skipped] == 0).all()


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=case_id)
@pytest.mark.parametrize("target_offset", [0, 1])
@for_backends()
def test_no_counted_rows_gives_zero(backend, dev, dtype, target_offset):
    images, pred, n = _inputs((3, 3, 28, 14, 14), dtype, target_offset, dev)
    lens = torch.full((3,), n, device=dev)
    pred.requires_grad_()
    loss = patch_mse_loss(pred, images, 14, lens, target_offset=target_offset, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert pred.grad is not None and (pred.grad == 0).all()
    rows = patch_mse_loss(pred, images, 14, lens, target_offset=target_offset, reduction="none", backend=backend)
    assert (rows == 0).all()


@for_backends()
def test_empty_batch(backend, dev):
    images, pred, n = _inputs((0, 3, 28, 42, 14), torch.float32, 1, dev)
    for reduction in ("mean", "none"):
        out, grad = _loss_and_grad(_public(backend), pred, images, 14, None, 1, reduction,
                                   torch.ones((), device=dev))
        assert out.shape == (() if reduction == "mean" else (0, n - 1)) and grad.shape == pred.shape
        assert (out == 0).all()


@for_backends()
def test_layouts_and_prefix_dtypes(backend, dev):
    """channels_last images, a non-contiguous pred and int32 prefix lengths give the same rows and gradient."""
    images, pred, n = _inputs((4, 3, 12, 20, 4), torch.float32, 1, dev)
    lens = random_prefix_lens(4, n).to(dev)
    upstream = torch.randn(4, n - 1).to(dev)
    expected = _loss_and_grad(_public(backend), pred, images, 4, lens, 1, "none", upstream)
    images_cl = images.to(memory_format=torch.channels_last)
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)
    assert not pred_t.is_contiguous() and not images_cl.is_contiguous()
    got = _loss_and_grad(_public(backend), pred_t, images_cl, 4, lens.int(), 1, "none",
                         upstream.t().contiguous().t())
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@for_backends()
def test_value_same_with_and_without_autograd(backend, dev):
    images, pred, n = _inputs((4, 3, 28, 28, 14), torch.bfloat16, 1, dev)
    lens = random_prefix_lens(4, n).to(dev)
    fn = _public(backend)
    plain = fn(pred, images, 14, lens, target_offset=1)
    with torch.no_grad():
        no_grad = fn(pred.requires_grad_(), images, 14, lens, target_offset=1)
    with_grad = fn(pred, images, 14, lens, target_offset=1)
    assert with_grad.requires_grad and not no_grad.requires_grad
    assert torch.equal(plain, no_grad) and torch.equal(with_grad.detach(), no_grad)


@pytest.mark.parametrize("dtype,with_prefix,target_offset", [
    (torch.float32, True, 1),
    (torch.bfloat16, False, 0),
], ids=case_id)
@for_backends()
def test_opcheck(backend, dev, dtype, with_prefix, target_offset):
    ops = importlib.import_module(MODULES[backend])
    images, pred, n = _inputs((4, 3, 28, 14, 14), dtype, target_offset, dev)
    lens = random_prefix_lens(4, n).int().to(dev) if with_prefix else None
    args = (images, 14, lens, target_offset, 1e-6)
    torch.library.opcheck(ops.patch_mse_rows_op, (pred.requires_grad_(), *args))
    grad_rows = torch.randn(4, n - target_offset, device=dev)
    torch.library.opcheck(ops.patch_mse_rows_backward_op, (grad_rows, pred.detach(), *args))


@for_backends(pytest.param("cpu", marks=pytest.mark.slow), "triton")
def test_torch_compile_fullgraph_forward_backward(backend, dev):
    images, pred, n = _inputs((4, 3, 28, 42, 14), torch.float32, 1, dev)
    lens = random_prefix_lens(4, n).to(dev)

    def loss_fn(pred, images, lens):
        return patch_mse_loss(pred, images, 14, lens, target_offset=1, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True)
    upstream = torch.randn(()).to(dev)
    _check_against_reference(lambda *a, **kw: compiled(a[0], a[1], a[3]), pred, images, 14, lens, 1, "mean",
                             upstream, f"{backend} compiled")


# ---------------------------------------------------------------- cpu: the C++ op itself

@for_backends("cpu")
def test_raw_op_rows_and_grad_in_one_call(backend):
    """The C++ op can write both outputs at once; they equal the forward and the backward with unit grad_rows."""
    load_extension()
    images, pred, n = _inputs((4, 2, 10, 25, 5), torch.bfloat16, 1, "cpu")
    lens = random_prefix_lens(4, n)
    rows, grad = torch.full((4, n - 1), float("nan")), torch.full_like(pred, float("nan"))
    torch.ops.aimv2.patch_mse_rows_out(pred, images, 5, lens, 1, 1e-6, None, rows, grad)
    x = pred.clone().requires_grad_()
    expected = patch_mse_loss(x, images, 5, lens, target_offset=1, reduction="none", backend="cpu")
    expected.backward(torch.ones_like(expected))
    assert torch.equal(rows, expected.detach()) and torch.equal(grad, x.grad)


@for_backends("cpu")
def test_cpp_entry_checks_arguments(backend):
    """The op itself rejects bad shapes and dtypes (the public function normally catches them first)."""
    load_extension()
    op = torch.ops.aimv2.patch_mse_rows_out
    images, pred, n = _inputs((2, 3, 28, 28, 14), torch.float32, 0, "cpu")
    rows = torch.empty(2, n)
    with pytest.raises(RuntimeError, match="pred must have shape"):
        op(pred[:, 1:], images, 14, None, 0, 1e-6, None, rows, None)
    with pytest.raises(RuntimeError, match="images has dtype"):
        op(pred, images.half(), 14, None, 0, 1e-6, None, rows, None)
    with pytest.raises(RuntimeError, match="rows must have dtype"):
        op(pred, images, 14, None, 0, 1e-6, None, rows.double(), None)
    with pytest.raises(RuntimeError, match="grad must have dtype"):
        op(pred, images, 14, None, 0, 1e-6, None, None, torch.empty(pred.shape, dtype=torch.half))
    with pytest.raises(RuntimeError, match="grad_rows must have shape"):
        op(pred, images, 14, None, 0, 1e-6, rows[:1], None, torch.empty_like(pred))
    with pytest.raises(RuntimeError, match="prefix_lens must be an integer"):
        op(pred, images, 14, torch.zeros(2), 0, 1e-6, None, rows, None)
    with pytest.raises(RuntimeError, match="multiples of patch_size"):
        op(pred, images, 5, None, 0, 1e-6, None, rows, None)


# ---------------------------------------------------------------- triton: the kernel's helpers and tuning

if triton is not None:
    from aimv2_kernels.triton.patch_mse import _round_to_bf16

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, _round_to_bf16(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


@for_backends("triton")
def test_round_to_bf16_matches_torch(backend, dev):
    """The kernel's fp32 -> bf16 rounding gives torch's bits: ties, carries, subnormals, inf and NaN."""
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 15,), dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.3895314e38, float("inf"), -float("inf"),
                          float("nan"), 0.0, -0.0, 1e-40, -1e-40])
    x = torch.cat([bits.view(torch.float32), edges]).to(dev)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=dev)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (y.isnan() & expected.isnan())
    assert same.all(), f"{(~same).sum().item()} values differ, e.g. {x[~same][:4].tolist()}"


@for_backends("triton")
def test_autotune_prune_keeps_configs_in_range(backend):
    """The GPU autotuner's pruning (pure Python) keeps 4-16 elements per thread, and never returns nothing."""
    from aimv2_kernels.triton.patch_mse import _configs, _prune

    for block_p in (2, 32, 1024, 4096, 1 << 16):
        kept = _prune(_configs(), {}, BLOCK_P=block_p)
        assert kept
        per_thread = [c.kwargs["ROWS"] * block_p / (32 * c.num_warps) for c in kept]
        if block_p in (32, 1024, 4096):
            assert all(4 <= t <= 16 for t in per_thread)
        else:
            assert len(kept) == 1
