"""The Triton kernel of patch_mse_loss (the interpreter without a GPU) against the reference, within the budget."""
import pytest
import torch

from aimv2_kernels import patch_mse_loss
from aimv2_kernels.reference.patch_mse import counted_mask, patch_mse_loss_reference
from aimv2_kernels.testing import FORWARD_K, GRADIENT_K, assert_within_budget, random_prefix_lens

import triton  # noqa: E402  (a test dependency: a missing triton must fail, not skip)
import triton.language as tl  # noqa: E402

from aimv2_kernels.triton.patch_mse import (  # noqa: E402
    _configs, _prune, _round_to_bf16, patch_mse_rows_backward_op, patch_mse_rows_op,
)



LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, C, H, W, p): the AIMv2 patch (C=3, p=14, P=588) on a non-square image, then patches whose P is not a
# power of two (C=1 p=5: P=25; C=2 p=3: P=18). Batch sizes leave partial row blocks.
SHAPES = [(5, 3, 28, 42, 14), (4, 1, 10, 15, 5), (5, 2, 9, 12, 3)]


def _inputs(shape, dtype, target_offset, device):
    """Fresh random images (non-zero mean, non-unit scale) and predictions, drawn in ``dtype``."""
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


def _triton(pred, images, p, lens, **kw):
    return patch_mse_loss(pred, images, p, lens, backend="triton", **kw)


def _check_against_reference(fn, pred, images, p, lens, target_offset, reduction, upstream, what=""):
    out, grad = _loss_and_grad(fn, pred, images, p, lens, target_offset, reduction, upstream)
    ref, ref_grad = _loss_and_grad(patch_mse_loss_reference, pred, images, p, lens, target_offset, reduction,
                                   upstream)
    oracle, oracle_grad = _loss_and_grad(patch_mse_loss_reference, pred.double(), images.double(), p, lens,
                                         target_offset, reduction, upstream.double())
    assert out.dtype == torch.float32 and grad.dtype == pred.dtype
    assert_within_budget(out, ref, oracle, k=FORWARD_K, name=f"loss {what}")
    assert_within_budget(grad, ref_grad, oracle_grad, k=GRADIENT_K, name=f"grad pred {what}")
    return out, grad


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target_offset", [0, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_matches_reference(dtype, shape, target_offset, reduction, device):
    images, pred, n = _inputs(shape, dtype, target_offset, device)
    batch, length = shape[0], n - target_offset
    lens = random_prefix_lens(batch, n).to(device)  # 0, 1, N-1, N, then random, in one batch
    upstream = (torch.randn(batch, length) if reduction == "none" else torch.randn(())).to(device)
    out, grad = _check_against_reference(_triton, pred, images, shape[-1], lens, target_offset, reduction,
                                         upstream, f"{dtype} {reduction}")
    skipped = ~counted_mask(lens, batch, length, target_offset, device)
    assert skipped.any() and (~skipped).any()
    assert (grad[skipped] == 0).all()  # rows that do not count are exactly 0, in the value and the gradient
    if reduction == "none":
        assert (out[skipped] == 0).all()


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_without_prefix(dtype, device):
    images, pred, n = _inputs(SHAPES[0], dtype, 1, device)
    upstream = torch.randn(SHAPES[0][0], n - 1).to(device)
    _check_against_reference(_triton, pred, images, 14, None, 1, "none", upstream, f"{dtype} no prefix")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("target_offset", [0, 1])
def test_no_counted_rows_gives_zero(dtype, target_offset, device):
    images, pred, n = _inputs((3, 3, 28, 14, 14), dtype, target_offset, device)
    lens = torch.full((3,), n, device=device)
    pred.requires_grad_()
    loss = _triton(pred, images, 14, lens, target_offset=target_offset)
    loss.backward()
    assert loss.item() == 0.0
    assert pred.grad is not None and (pred.grad == 0).all()
    rows = _triton(pred, images, 14, lens, target_offset=target_offset, reduction="none")
    assert (rows == 0).all()


def test_empty_batch(device):
    images, pred, n = _inputs((0, 3, 28, 42, 14), torch.float32, 1, device)
    for reduction in ("mean", "none"):
        out, grad = _loss_and_grad(_triton, pred, images, 14, None, 1, reduction, torch.ones((), device=device))
        assert out.shape == (() if reduction == "mean" else (0, n - 1)) and grad.shape == pred.shape
        assert (out == 0).all()


def test_layouts_and_prefix_dtypes(device):
    """channels_last images, a non-contiguous pred and int32 prefix lengths give the same rows and gradient."""
    images, pred, n = _inputs((4, 3, 12, 20, 4), torch.float32, 1, device)
    lens = random_prefix_lens(4, n).to(device)
    upstream = torch.randn(4, n - 1).to(device)
    expected = _loss_and_grad(_triton, pred, images, 4, lens, 1, "none", upstream)
    images_cl = images.to(memory_format=torch.channels_last)
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)
    assert not pred_t.is_contiguous() and not images_cl.is_contiguous()
    got = _loss_and_grad(_triton, pred_t, images_cl, 4, lens.int(), 1, "none", upstream.t().contiguous().t())
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_value_same_with_and_without_autograd(device):
    images, pred, n = _inputs((4, 3, 28, 28, 14), torch.bfloat16, 1, device)
    lens = random_prefix_lens(4, n).to(device)
    plain = _triton(pred, images, 14, lens, target_offset=1)
    with torch.no_grad():
        no_grad = _triton(pred.requires_grad_(), images, 14, lens, target_offset=1)
    with_grad = _triton(pred, images, 14, lens, target_offset=1)
    assert with_grad.requires_grad and not no_grad.requires_grad
    assert torch.equal(plain, no_grad) and torch.equal(with_grad.detach(), no_grad)


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _round_to_bf16(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_round_to_bf16_matches_torch(device):
    """The kernel's fp32 -> bf16 rounding gives torch's bits: ties, carries, subnormals, inf and NaN."""
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 15,), dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.3895314e38, float("inf"), -float("inf"),
                          float("nan"), 0.0, -0.0, 1e-40, -1e-40])
    x = torch.cat([bits.view(torch.float32), edges]).to(device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (y.isnan() & expected.isnan())
    assert same.all(), f"{(~same).sum().item()} values differ, e.g. {x[~same][:4].tolist()}"


@pytest.mark.parametrize("dtype,with_prefix,target_offset", [
    (torch.float32, True, 1),
    (torch.bfloat16, False, 0),
])
def test_opcheck(dtype, with_prefix, target_offset, device):
    images, pred, n = _inputs((4, 3, 28, 14, 14), dtype, target_offset, device)
    lens = random_prefix_lens(4, n).int().to(device) if with_prefix else None
    args = (images, 14, lens, target_offset, 1e-6)
    torch.library.opcheck(patch_mse_rows_op, (pred.requires_grad_(), *args))
    grad_rows = torch.randn(4, n - target_offset, device=device)
    torch.library.opcheck(patch_mse_rows_backward_op, (grad_rows, pred.detach(), *args))


def test_torch_compile_fullgraph_forward_backward(device):
    images, pred, n = _inputs((4, 3, 28, 42, 14), torch.float32, 1, device)
    lens = random_prefix_lens(4, n).to(device)

    def loss_fn(pred, images, lens):
        return patch_mse_loss(pred, images, 14, lens, target_offset=1, backend="triton")

    compiled = torch.compile(loss_fn, fullgraph=True)
    upstream = torch.randn(()).to(device)
    _check_against_reference(lambda *a, **kw: compiled(a[0], a[1], a[3]), pred, images, 14, lens, 1, "mean",
                             upstream, "compiled")


def test_autotune_prune_keeps_configs_in_range():
    """The GPU autotuner's pruning (pure Python) keeps 4-16 elements per thread, and never returns nothing."""
    for block_p in (2, 32, 1024, 4096, 1 << 16):
        kept = _prune(_configs(), {}, BLOCK_P=block_p)
        assert kept
        per_thread = [c.kwargs["ROWS"] * block_p / (32 * c.num_warps) for c in kept]
        if block_p in (32, 1024, 4096):
            assert all(4 <= t <= 16 for t in per_thread)
        else:
            assert len(kept) == 1
