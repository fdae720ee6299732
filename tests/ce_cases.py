"""Helpers shared by the cross-entropy tests of every backend (test_cross_entropy.py, test_cuda_kernels.py)."""
import torch

from aimv2_kernels.testing import FORWARD_K, GRADIENT_K, assert_within_budget


def targets_with_ignored(shape, v, ignore_index, device="cpu", every=3):
    """Random class ids with every ``every``-th token set to ``ignore_index``."""
    t = torch.randint(0, v, shape, device=device)
    t.view(-1)[::every] = ignore_index
    return t


def upstream(loss_shape, reduction, device="cpu"):
    """A random gradient of the loss: non-uniform per token for "none"."""
    return torch.randn(loss_shape if reduction == "none" else (), device=device)


def run(fn, inputs, args, grad_out, *, with_bias=False, **kw):
    """``fn(*inputs, *args, **kw)`` (the last input passed as ``bias=`` when ``with_bias``), backpropagated
    with ``grad_out``: ``[value, grad of each input]``."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    if with_bias:
        out = fn(*leaves[:-1], *args, bias=leaves[-1], **kw)
    else:
        out = fn(*leaves, *args, **kw)
    (out * grad_out.to(out.dtype)).sum().backward()
    return [out.detach()] + [x.grad for x in leaves]


def check(ours, ref, oracle, what):
    """Value within the forward budget, every gradient within the gradient budget."""
    names = ["loss", "grad 0", "grad 1", "grad 2"]
    for i, (a, r, o) in enumerate(zip(ours, ref, oracle)):
        assert_within_budget(a, r, o, k=FORWARD_K if i == 0 else GRADIENT_K, name=f"{names[i]} {what}")


def check_backend(fn, reference, inputs, args, grad_out, what, **kw):
    """``fn`` vs the same-dtype ``reference`` vs the float64 oracle (``reference`` on float64 copies of
    ``inputs``), as :func:`run` calls them: an fp32 value, each gradient in its input's dtype, all within the
    budget (:func:`check`). Returns ``fn``'s ``[value, grad of each input]``."""
    ours = run(fn, inputs, args, grad_out, **kw)
    ref = run(reference, inputs, args, grad_out, **kw)
    oracle = run(reference, [x.double() for x in inputs], args, grad_out.double(), **kw)
    assert ours[0].dtype == torch.float32 and [g.dtype for g in ours[1:]] == [x.dtype for x in inputs]
    check(ours, ref, oracle, what)
    return ours
