"""Helpers shared by the cross-entropy tests of every backend (test_*cross_entropy*.py)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from aimv2_kernels.reference.cross_entropy import linear_cross_entropy_reference
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


# ------------------------------------------------------------ test bodies shared by the backends' test files
# ``ce`` and ``lce`` are a backend's cross_entropy and linear_cross_entropy entry points (keyword arguments as
# the public ops, plus ``chunk_size`` for ``lce``).

def check_partial_requires_grad(lce, device, reduction):
    """A frozen head (weight without grad) and a frozen trunk (hidden without grad) give the same grads."""
    hidden = torch.randn(9, 32, device=device)
    weight = torch.randn(50, 32, device=device)
    targets = targets_with_ignored((9,), 50, -100, device)
    up = upstream((9,), reduction, device)
    full = run(lambda h, w, t, **kw: lce(h, w, t, chunk_size=4, **kw), [hidden, weight], [targets], up,
               reduction=reduction)
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


def check_backward_only_scales(lce, device, reduction):
    """fp32 "mean"/"sum" compute the gradients in the forward, so the backward only scales them. It creates no
    zero-filled tensor (autograd would hand it zeros for every output that gets no gradient, the (V, D) weight
    gradient among them, unless the op turns that off) and, when the graph is not kept, no new tensor either: it
    scales the saved gradients in place. With ``retain_graph`` the saved gradients are left alone: each replay
    gives the first backward's gradients exactly (their values against the oracle are checked elsewhere)."""
    n, d, v = 24, 16, 40
    hidden = torch.randn(n, d, device=device, requires_grad=True)
    weight = torch.randn(v, d, device=device, requires_grad=True)
    targets = torch.randint(0, v, (n,), device=device)
    loss = lce(hidden, weight, targets, reduction=reduction)
    mode = RecordOps()
    with mode:
        (2.5 * loss).backward()
    made = [name for name in mode.names if any(k in name for k in ("zero", "fill", "empty", "clone", "copy"))]
    assert not made, made
    assert mode.names.count("aten::mul_") == 2, mode.names
    expected = [x.grad for x in (hidden, weight)]
    loss = lce(hidden, weight, targets, reduction=reduction)
    for _ in range(2):  # the graph is kept: the saved gradients must not be scaled in place
        hidden.grad = weight.grad = None
        (2.5 * loss).backward(retain_graph=True)
        for x, g in zip((hidden, weight), expected):
            torch.testing.assert_close(x.grad, g, rtol=0, atol=0)


def check_never_holds_full_logits(lce, device, reduction, dtype=torch.float32):
    """No tensor of N x V elements exists, forward or backward; the (chunk, V) buffer does."""
    n, d, v, chunk = 40, 32, 50, 8  # N*V = 2000 > V*D = 1600
    hidden = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(v, device=device, dtype=dtype, requires_grad=True)
    targets = targets_with_ignored((n,), v, -100, device)
    for fn, kw in ((lce, dict(chunk_size=chunk)), (linear_cross_entropy_reference, {})):
        mode = RecordShapes()
        with mode:
            fn(hidden, weight, targets, bias=bias, reduction=reduction, **kw).sum().backward()
        largest = max(torch.Size(s).numel() for s in mode.shapes)
        if fn is linear_cross_entropy_reference:
            assert largest >= n * v  # the recorder sees the reference's full logits
        else:
            assert largest < n * v, max(mode.shapes, key=lambda s: torch.Size(s).numel())
            assert (chunk, v) in mode.shapes


def check_empty_inputs(ce, lce, device):
    """Zero tokens: "mean" and "sum" give 0, "none" an empty loss, and zero gradients."""
    logits = torch.randn(0, 50, device=device, requires_grad=True)
    hidden = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum", "none"):
        a = ce(logits, targets, reduction=reduction)
        b = lce(hidden, weight, targets, reduction=reduction)
        assert a.shape == b.shape == ((0,) if reduction == "none" else ())
        (a.sum() + b.sum()).backward()
        assert (a == 0).all() and (b == 0).all() and (weight.grad == 0).all()


def check_compile_fullgraph(ce, lce, device, reduction):
    """Both ops under torch.compile(fullgraph=True), forward and backward, match eager."""
    torch._dynamo.reset()
    hidden = torch.randn(2, 5, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device, requires_grad=True)
    targets = targets_with_ignored((2, 5), 50, -100, device)

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
