"""Helpers shared by the prefix-attention tests of every backend (test_*attention*.py, test_cuda_kernels.py)."""
import torch

from aimv2_kernels import prefix_attention
from aimv2_kernels.reference.attention import prefix_attention_reference
from aimv2_kernels.testing import FORWARD_K, GRADIENT_K, assert_within_budget, single_key_floor


def qkv(b, h, s, d, dtype, device="cpu"):
    """Fresh random leaves drawn in ``dtype`` (every path sees identical values)."""
    return [torch.randn(b, h, s, d, dtype=dtype, device=device).requires_grad_() for _ in range(3)]


def run(fn, q, k, v, do, lens, **kw):
    """``(out, dq, dk, dv)`` of ``fn`` on ``q, k, v`` (leaves or views of leaves)."""
    out = fn(q, k, v, lens, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def leaves64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def check_backend(backend, q, k, v, lens, *, causal=True, scale=None, label=""):
    """``backend`` vs the same-dtype reference vs the float64 oracle, forward and the three gradients."""
    do = torch.randn_like(q)
    ours = run(prefix_attention, q, k, v, do, lens, causal=causal, scale=scale, backend=backend)
    ref = run(prefix_attention_reference, q, k, v, do, lens, causal=causal, scale=scale)
    oracle = run(prefix_attention_reference, *leaves64(q, k, v), do.double(), lens, causal=causal, scale=scale)
    floor = single_key_floor(q, k, v, do) if q.shape[2] == 1 and scale is None else None
    assert ours[0].dtype == q.dtype and ours[0].shape == q.shape
    for name, a, r, o in zip(("out", "dq", "dk", "dv"), ours, ref, oracle):
        assert a.dtype == q.dtype
        if name == "out":
            assert_within_budget(a, r, o, k=FORWARD_K, name=f"{name} {label}")
        else:
            assert_within_budget(a, r, o, k=GRADIENT_K, floor=floor if name in ("dq", "dk") else None,
                                 name=f"{name} {label}")


def check_never_visible_tiles_are_never_read(forward, backward, tile, device="cpu", head_dim=32,
                                             dtype=torch.float32):
    """NaN in K/V rows at or past T, or in Q/dO rows before T, must not reach what cannot see them.

    ``forward(q, k, v, lens, causal=, scale=) -> (out, lse)`` and ``backward(do, q, k, v, out, lse, lens,
    causal=, scale=) -> (dq, dk, dv)`` are a backend's launchers, ``tile`` (T) its largest tile. With every
    prefix <= T: query rows < T see keys < T only, and keys >= T are seen by queries >= T only. A kernel that
    loaded (even masked off) a tile it does not need would turn 0 * NaN into NaN. The poisoned rows themselves
    do come out NaN, which shows the poison is live.
    """
    t = tile
    b, h, s, d = 2, 1, 2 * t + 8, head_dim
    q, k, v, do = (torch.randn(b, h, s, d, device=device).to(dtype) for _ in range(4))
    lens = torch.tensor([t, t // 2 + 1], device=device)
    kw = dict(causal=True, scale=d ** -0.5)
    ref = run(prefix_attention_reference, *(x.clone().requires_grad_() for x in (q, k, v)), do, lens, **kw)
    oracle = run(prefix_attention_reference, *leaves64(q, k, v), do.double(), lens, **kw)

    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, t:], v_bad[:, :, t:] = float("nan"), float("nan")
    out, lse = forward(q, k_bad, v_bad, lens, **kw)
    dq = backward(do, q, k_bad, v_bad, out, lse, lens, **kw)[0]
    assert out[:, :, t:].isnan().all()
    assert_within_budget(out[:, :, :t], ref[0][:, :, :t], oracle[0][:, :, :t], name="out, keys >= T poisoned")
    assert_within_budget(dq[:, :, :t], ref[1][:, :, :t], oracle[1][:, :, :t], k=GRADIENT_K,
                         name="dq, keys >= T poisoned")

    q_bad, do_bad = q.clone(), do.clone()
    q_bad[:, :, :t], do_bad[:, :, :t] = float("nan"), float("nan")
    out, lse = forward(q_bad, k, v, lens, **kw)
    _, dk, dv = backward(do_bad, q_bad, k, v, out, lse, lens, **kw)
    assert out[:, :, :t].isnan().all() and dk[:, :, :t].isnan().all()
    for name, ours, i in (("dk", dk, 2), ("dv", dv, 3)):
        assert_within_budget(ours[:, :, t:], ref[i][:, :, t:], oracle[i][:, :, t:], k=GRADIENT_K,
                             name=f"{name}, queries < T poisoned")
