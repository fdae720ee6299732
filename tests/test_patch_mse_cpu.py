"""The compiled CPU kernel of patch_mse_loss against the reference, within the float64 error budget."""
import pytest
import torch

from aimv2_kernels import patch_mse_loss
from aimv2_kernels._backend import extension_available
from aimv2_kernels.reference.patch_mse import counted_mask, patch_mse_loss_reference
from aimv2_kernels.testing import FORWARD_K, GRADIENT_K, assert_within_budget, random_prefix_lens

pytestmark = pytest.mark.skipif(not extension_available(), reason="aimv2_kernels._C is not built")

LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, C, H, W, p): the AIMv2 patch (C=3, p=14), then small odd patches and non-square images.
SHAPES = [(4, 3, 28, 28, 14), (5, 1, 9, 15, 3), (4, 2, 10, 25, 5), (6, 3, 12, 8, 4)]


def _inputs(shape, dtype, target_offset):
    """Fresh random images (non-zero mean, non-unit scale) and predictions, drawn in ``dtype``."""
    b, c, h, w, p = shape
    n = (h // p) * (w // p)
    images = torch.randn(b, c, h, w, dtype=dtype) * 2 + 0.5
    pred = torch.randn(b, n - target_offset, c * p * p, dtype=dtype)
    return images, pred, n


def _loss_and_grad(fn, pred, images, p, lens, target_offset, reduction, upstream):
    pred = pred.detach().clone().requires_grad_()
    out = fn(pred, images, p, lens, target_offset=target_offset, reduction=reduction)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), pred.grad


def _cpu(pred, images, p, lens, **kw):
    return patch_mse_loss(pred, images, p, lens, backend="cpu", **kw)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target_offset", [0, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_cpu_matches_reference(dtype, shape, target_offset, reduction, with_prefix):
    images, pred, n = _inputs(shape, dtype, target_offset)
    p = shape[-1]
    lens = random_prefix_lens(shape[0], n) if with_prefix else None  # 0, 1, N-1, N, then random
    upstream = torch.randn(shape[0], n - target_offset) if reduction == "none" else torch.randn(())
    out, grad = _loss_and_grad(_cpu, pred, images, p, lens, target_offset, reduction, upstream)
    ref, ref_grad = _loss_and_grad(patch_mse_loss_reference, pred, images, p, lens, target_offset, reduction,
                                   upstream)
    oracle, oracle_grad = _loss_and_grad(patch_mse_loss_reference, pred.double(), images.double(), p, lens,
                                         target_offset, reduction, upstream.double())
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_within_budget(out, ref, oracle, k=FORWARD_K, name=f"loss {dtype} {reduction}")
    assert_within_budget(grad, ref_grad, oracle_grad, k=GRADIENT_K, name=f"grad pred {dtype} {reduction}")
    if lens is not None:  # rows that do not count are exactly 0, in the value and in the gradient
        skipped = ~counted_mask(lens, shape[0], n - target_offset, target_offset, pred.device)
        assert (grad[skipped] == 0).all()
        if reduction == "none":
            assert (out[skipped] == 0).all()


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("target_offset", [0, 1])
def test_no_counted_rows_gives_zero(dtype, target_offset):
    shape = (3, 3, 28, 14, 14)
    images, pred, n = _inputs(shape, dtype, target_offset)
    lens = torch.full((shape[0],), n)
    pred.requires_grad_()
    loss = patch_mse_loss(pred, images, 14, lens, target_offset=target_offset, backend="cpu")
    loss.backward()
    assert loss.item() == 0.0
    assert pred.grad is not None and (pred.grad == 0).all()
    rows = patch_mse_loss(pred, images, 14, lens, target_offset=target_offset, reduction="none", backend="cpu")
    assert (rows == 0).all()


def test_layouts_and_prefix_dtypes():
    """Non-contiguous inputs and int32 prefix lengths give the same result as contiguous int64 ones."""
    images, pred, n = _inputs((4, 3, 12, 20, 4), torch.float32, 1)
    lens = random_prefix_lens(4, n)
    expected = patch_mse_loss(pred, images, 4, lens, target_offset=1, reduction="none", backend="cpu")
    images_cl = images.to(memory_format=torch.channels_last)
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)
    got = patch_mse_loss(pred_t, images_cl, 4, lens.int(), target_offset=1, reduction="none", backend="cpu")
    assert not pred_t.is_contiguous() and not images_cl.is_contiguous()
    assert torch.equal(got, expected)


def test_raw_op_rows_and_grad_in_one_call():
    """The C++ op can write both outputs at once; they equal the forward and the backward with unit grad_rows."""
    from aimv2_kernels._backend import load_extension

    load_extension()
    images, pred, n = _inputs((4, 2, 10, 25, 5), torch.bfloat16, 1)
    lens = random_prefix_lens(4, n)
    rows, grad = torch.full((4, n - 1), float("nan")), torch.full_like(pred, float("nan"))
    torch.ops.aimv2.patch_mse_rows_out(pred, images, 5, lens, 1, 1e-6, None, rows, grad)
    x = pred.clone().requires_grad_()
    expected = patch_mse_loss(x, images, 5, lens, target_offset=1, reduction="none", backend="cpu")
    expected.backward(torch.ones_like(expected))
    assert torch.equal(rows, expected.detach()) and torch.equal(grad, x.grad)


def test_cpp_entry_checks_arguments():
    """The op itself rejects bad shapes and dtypes (the public function normally catches them first)."""
    from aimv2_kernels._backend import load_extension

    load_extension()
    op = torch.ops.aimv2.patch_mse_rows_out
    images, pred, n = _inputs((2, 3, 28, 28, 14), torch.float32, 0)
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


@pytest.mark.parametrize("dtype,with_prefix,target_offset", [
    (torch.float32, True, 1),
    (torch.bfloat16, False, 0),
])
def test_opcheck(dtype, with_prefix, target_offset):
    from aimv2_kernels.compiled.patch_mse import patch_mse_rows_backward_op, patch_mse_rows_op

    images, pred, n = _inputs((4, 3, 28, 14, 14), dtype, target_offset)
    lens = random_prefix_lens(4, n).int() if with_prefix else None
    args = (images, 14, lens, target_offset, 1e-6)
    torch.library.opcheck(patch_mse_rows_op, (pred.requires_grad_(), *args))
    torch.library.opcheck(patch_mse_rows_backward_op, (torch.randn(4, n - target_offset), pred.detach(), *args))


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_backward():
    images, pred, n = _inputs((4, 3, 28, 42, 14), torch.float32, 1)
    lens = random_prefix_lens(4, n)

    def loss_fn(pred, images, lens):
        return patch_mse_loss(pred, images, 14, lens, target_offset=1, backend="cpu")

    compiled = torch.compile(loss_fn, fullgraph=True)
    upstream = torch.randn(())
    loss, grad = _loss_and_grad(lambda *a, **kw: compiled(a[0], a[1], a[3]), pred, images, 14, lens, 1, "mean",
                                upstream)
    ref, ref_grad = _loss_and_grad(patch_mse_loss_reference, pred, images, 14, lens, 1, "mean", upstream)
    oracle, oracle_grad = _loss_and_grad(patch_mse_loss_reference, pred.double(), images.double(), 14, lens, 1,
                                         "mean", upstream.double())
    assert_within_budget(loss, ref, oracle, k=FORWARD_K, name="compiled loss")
    assert_within_budget(grad, ref_grad, oracle_grad, k=GRADIENT_K, name="compiled grad pred")
