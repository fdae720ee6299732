"""The compiled CPU prefix-attention kernels (forward and backward) against the reference, within the float64 budget.

Tiles are 64 x 64, so the shapes span several tiles, sequence tails, every prefix edge case (0, 1, S-1, S in one
batch), plain causal, full attention, a custom scale, head dims that are not a multiple of 16 and strided views.
"""
import os
import subprocess
import sys

import pytest
import torch
from attention_cases import check_backend, check_never_visible_tiles_are_never_read
from attention_cases import leaves64 as _leaves64
from attention_cases import qkv as _qkv
from attention_cases import run as _run

from aimv2_kernels import prefix_attention
from aimv2_kernels._backend import extension_available
from aimv2_kernels.reference.attention import prefix_attention_reference
from aimv2_kernels.testing import FORWARD_K, GRADIENT_K, assert_within_budget, random_prefix_lens

pytestmark = pytest.mark.skipif(not extension_available(), reason="aimv2_kernels._C is not built")

if extension_available():
    from aimv2_kernels.compiled import attention as cpu_attention
    from aimv2_kernels.compiled.attention import backward_op, forward_op

LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

TILE = 64  # the kernels' largest tile (kBlockM, kBlockN, kBwdBlockM, kBwdBlockN in csrc/attention_cpu.cpp)


def _check(q, k, v, lens, **kw):
    """The cpu backend vs the same-dtype reference vs the float64 oracle (see attention_cases)."""
    check_backend("cpu", q, k, v, lens, **kw)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("s,d", [(1, 64), (67, 64), (130, 128), (200, 40)])
def test_prefix_lens_edges(dtype, s, d):
    """Prefix lengths 0, 1, S-1, S and random ones in one batch; S not a multiple of the tile; D = 40."""
    b = 6 if s > 1 else 2
    lens = random_prefix_lens(b, s)
    _check(*_qkv(b, 2, s, d, dtype), lens, label=f"{dtype} S={s} D={d}")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("mode", ["plain_causal", "full"])
def test_causal_and_full(dtype, mode):
    q, k, v = _qkv(2, 2, 150, 64, dtype)
    if mode == "plain_causal":
        _check(q, k, v, None, label=f"{dtype} {mode}")
    else:  # prefix_lens is ignored when causal=False
        _check(q, k, v, torch.tensor([0, 3]), causal=False, label=f"{dtype} {mode}")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_views_of_fused_qkv_and_custom_scale(dtype):
    """Permuted views of a fused (B, S, 3, H, D) projection, int32 prefix lengths, and a custom scale."""
    b, s, h, d = 3, 97, 2, 64
    qkv = torch.randn(b, s, 3, h, d, dtype=dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    lens = torch.tensor([5, 0, 97], dtype=torch.int32)
    _check(q, k, v, lens, scale=0.3, label=f"{dtype} views")


def test_non_unit_head_dim_stride_and_odd_head_dim():
    """A view whose head dimension is not contiguous is copied once; D = 24 is padded inside the kernels."""
    q, k, v = (torch.randn(2, 2, 24, 70).transpose(-1, -2).requires_grad_() for _ in range(3))
    assert q.stride(-1) != 1
    _check(q, k, v, torch.tensor([7, 70]), label="transposed head dim, D = 24")


@pytest.mark.parametrize("path", ["fused", "split"])
def test_backward_paths(path, monkeypatch):
    """Both backward schedules: fused (one task per (b, h), dQ in a per-thread buffer; the default when there
    are at least 4 (b, h) per thread) and split (dK/dV per key tile, then dQ per query tile)."""
    monkeypatch.setenv("AIMV2_CPU_ATTENTION_BACKWARD", path)
    for dtype in (torch.float32, torch.bfloat16):
        _check(*_qkv(5, 1, 150, 40, dtype), random_prefix_lens(5, 150), label=f"{path} backward {dtype}")
    _check(*_qkv(1, 2, 70, 64, torch.float16), None, label=f"{path} backward causal")


def test_negative_scale():
    """The mask is applied after scaling, so a negative scale still masks (no -inf * negative = +inf)."""
    _check(*_qkv(3, 1, 80, 32, torch.float32), torch.tensor([0, 40, 80]), scale=-0.2, label="scale < 0")


@pytest.mark.parametrize("path", ["fused", "split"])
def test_never_visible_tiles_are_never_read(path, monkeypatch):
    monkeypatch.setenv("AIMV2_CPU_ATTENTION_BACKWARD", path)
    check_never_visible_tiles_are_never_read(cpu_attention.attention_forward, cpu_attention.attention_backward,
                                             TILE, "cpu")


_BASELINE_SCRIPT = """
import sys, torch
from aimv2_kernels.compiled.attention import attention_forward, attention_backward
q, k, v, do, lens = torch.load(sys.argv[1])
out, lse = attention_forward(q, k, v, lens, causal=True, scale=0.125)
torch.save((lse, out, *attention_backward(do, q, k, v, out, lse, lens, causal=True, scale=0.125)), sys.argv[2])
"""


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def test_baseline_isa_path(tmp_path):
    """AIMV2_CPU_SIMD=portable runs the kernels compiled for the baseline ISA; within budget too."""
    q, k, v, do = (torch.randn(3, 2, 75, 64, dtype=torch.bfloat16) for _ in range(4))
    lens = torch.tensor([0, 75, 30])
    torch.save((q, k, v, do, lens), tmp_path / "inputs.pt")
    env = {**os.environ, "AIMV2_CPU_SIMD": "portable"}
    subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=120)
    lse, *baseline = torch.load(tmp_path / "out.pt")
    kw = dict(causal=True, scale=0.125)
    ref = _run(prefix_attention_reference, *(x.clone().requires_grad_() for x in (q, k, v)), do, lens, **kw)
    oracle = _run(prefix_attention_reference, *_leaves64(q, k, v), do.double(), lens, **kw)
    for name, a, r, o, kk in zip(("out", "dq", "dk", "dv"), baseline, ref, oracle, (FORWARD_K,) + (GRADIENT_K,) * 3):
        assert_within_budget(a, r, o, k=kk, name=f"{name}, baseline ISA")
    if _has_avx2():  # the AVX2+FMA build rounds differently (fp32 lse): the subprocess took the other path
        assert not torch.equal(cpu_attention.attention_forward(q, k, v, lens, **kw)[1], lse)


def test_cpp_entry_checks_arguments():
    """The ops themselves reject bad arguments (the public function normally catches them first)."""
    op, bwd = torch.ops.aimv2.prefix_attention_forward_out, torch.ops.aimv2.prefix_attention_backward_out
    q, k, v = (torch.randn(2, 1, 8, 16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(2, 1, 8)
    with pytest.raises(RuntimeError, match="k must have the shape of q"):
        op(q, k[:, :, 1:], v, None, True, 0.25, out, lse)
    with pytest.raises(RuntimeError, match="v has dtype"):
        op(q, k, v.half(), None, True, 0.25, out, lse)
    with pytest.raises(RuntimeError, match="q must be float32, bfloat16 or float16"):
        op(q.double(), k.double(), v.double(), None, True, 0.25, out.double(), lse)
    with pytest.raises(RuntimeError, match=r"prefix_lens must lie in \[0, 8\]"):
        op(q, k, v, torch.tensor([3, 9]), True, 0.25, out, lse)
    with pytest.raises(RuntimeError, match="prefix_lens must be an integer"):
        op(q, k, v, torch.tensor([3.0, 1.0]), True, 0.25, out, lse)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        op(q, k, v, None, True, 0.25, out, lse[:, :, 1:])
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        op(q, k, v, None, True, 0.25, out.transpose(2, 3).contiguous().transpose(2, 3), lse)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(q, k, v, None, True, float("inf"), out, lse)
    op(q, k, v, None, True, 0.25, out, lse)
    grads = [torch.empty_like(q) for _ in range(3)]
    with pytest.raises(RuntimeError, match="lse must be a float32"):
        bwd(q, q, k, v, out, lse.double(), None, True, 0.25, *grads)
    with pytest.raises(RuntimeError, match="grad_k must have dtype"):
        bwd(q, q, k, v, out, lse, None, True, 0.25, grads[0], grads[1].half(), grads[2])


@pytest.mark.parametrize("dtype,with_prefix", [(torch.float32, True), (torch.bfloat16, False)])
def test_opcheck(dtype, with_prefix):
    q, k, v = _qkv(2, 1, 70, 16, dtype)
    lens = torch.tensor([3, 70]) if with_prefix else None
    torch.library.opcheck(forward_op, (q, k, v, lens, True, 0.25))
    out, lse = forward_op(q.detach(), k.detach(), v.detach(), lens, True, 0.25)
    do = torch.randn_like(out)
    torch.library.opcheck(backward_op,
                          (do, q.detach(), k.detach(), v.detach(), out, lse, lens, True, 0.25))


def test_torch_compile_fullgraph():
    q, k, v = _qkv(2, 1, 70, 16, torch.bfloat16)
    lens = torch.tensor([0, 9])

    def loss(q, k, v, lens):
        return prefix_attention(q, k, v, lens, backend="cpu").float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, lens), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v, lens), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
