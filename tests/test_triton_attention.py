"""The Triton prefix-attention kernels (forward and backward) against the reference, within the float64 budget.

Without a GPU they run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py) with one 16x16 tile
config, so the shapes are small but span several tiles, a sequence tail and every prefix edge case.
"""
import pytest
import torch

import triton  # noqa: E402,F401  (a test dependency: a missing triton must fail, not skip)

from aimv2_kernels import prefix_attention  # noqa: E402
from aimv2_kernels.testing import random_prefix_lens  # noqa: E402
from aimv2_kernels.triton import attention_backward as bwd_module  # noqa: E402
from aimv2_kernels.triton import attention_forward as fwd_module  # noqa: E402
from aimv2_kernels.triton.attention import prefix_attention_triton  # noqa: E402

from attention_cases import (  # noqa: E402
    check_backend, check_never_visible_tiles_are_never_read, qkv as _qkv)


LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

KERNELS_TUNED = [fwd_module._attn_fwd_kernel, bwd_module._attn_bwd_dkdv_kernel, bwd_module._attn_bwd_dq_kernel]


def _check(q, k, v, lens, **kw):
    """The triton backend vs the same-dtype reference vs the float64 oracle (see attention_cases)."""
    check_backend("triton", q, k, v, lens, **kw)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("s,d", [(1, 64), (17, 128), (40, 64)])
def test_prefix_lens_edges(dtype, s, d, device):
    b = 4 if s > 1 else 2
    lens = random_prefix_lens(b, s).to(device)  # 0, 1, S-1, S
    _check(*_qkv(b, 2, s, d, dtype, device), lens, label=f"{dtype} S={s} D={d}")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("mode", ["plain_causal", "full"])
def test_causal_and_full(dtype, mode, device):
    q, k, v = _qkv(2, 2, 40, 64, dtype, device)
    if mode == "plain_causal":
        _check(q, k, v, None, label=f"{dtype} {mode}")
    else:  # prefix_lens is ignored when causal=False
        _check(q, k, v, torch.tensor([0, 3], device=device), causal=False, label=f"{dtype} {mode}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_of_fused_qkv_and_custom_scale(dtype, device):
    """Permuted views of a fused (B, S, 3, H, D) projection, int32 prefix lengths, and a custom scale."""
    b, s, h, d = 3, 33, 2, 64
    qkv = torch.randn(b, s, 3, h, d, dtype=dtype, device=device).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    lens = torch.tensor([5, 0, 33], dtype=torch.int32, device=device)
    _check(q, k, v, lens, scale=0.3, label=f"{dtype} views")


def test_non_unit_head_dim_stride(device):
    """A view whose head dimension is not contiguous is copied once by the launcher."""
    q, k, v = (torch.randn(2, 2, 64, 32, device=device).transpose(-1, -2).requires_grad_() for _ in range(3))
    assert q.stride(-1) != 1
    _check(q, k, v, torch.tensor([7, 32], device=device), label="transposed head dim, S = 32")


@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32)])
def test_unequal_tiles(bm, bn, monkeypatch, device):
    """BLOCK_M != BLOCK_N (as in the GPU configs) in all three kernels, through the tile-range arithmetic."""
    import triton
    for kernel in KERNELS_TUNED:
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4,
                                                              num_stages=1)])
    lens = torch.tensor([0, 17, 40, 31], device=device)
    _check(*_qkv(4, 1, 40, 32, torch.bfloat16, device), lens, label=f"tiles {bm}x{bn}")


def _max_block() -> int:
    """The largest tile of any config: a multiple of every tile size (powers of two)."""
    return max(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for kern in KERNELS_TUNED for c in kern.configs)


def test_never_visible_tiles_are_never_read(device):
    check_never_visible_tiles_are_never_read(fwd_module.attention_forward, bwd_module.attention_backward, _max_block(), device)


@pytest.mark.parametrize("causal", [True, False])
def test_unmasked_path_equals_masked_path(causal, device):
    """Skipping the mask on fully visible tiles changes nothing: same values as masking every tile."""
    q, k, v, do = (torch.randn(4, 1, 40, 32, dtype=torch.bfloat16, device=device) for _ in range(4))
    lens = random_prefix_lens(4, 40).to(device)
    results = []
    for every in (False, True):
        kw = dict(causal=causal, scale=0.2, mask_every_tile=every)
        out, lse = fwd_module.attention_forward(q, k, v, lens, **kw)
        results.append((out, lse, *bwd_module.attention_backward(do, q, k, v, out, lse, lens, **kw)))
    for name, fast, masked in zip(("out", "lse", "dq", "dk", "dv"), *results):
        if device.type == "cpu":  # the interpreter evaluates both paths in the same order: bit-identical
            assert torch.equal(fast, masked), name
        else:  # compiled code may contract multiply-adds differently around the mask
            torch.testing.assert_close(fast, masked, msg=name)


@pytest.mark.parametrize("d", [8, 48, 256])
def test_rejects_unsupported_head_dim(d):
    q, k, v = (torch.randn(1, 1, 4, d) for _ in range(3))
    with pytest.raises(ValueError, match="q"):
        prefix_attention_triton(q, k, v, None, causal=True, scale=None)


def test_opcheck(device):
    q, k, v = _qkv(2, 1, 17, 16, torch.float32, device)
    lens = torch.tensor([3, 17], device=device)
    torch.library.opcheck(torch.ops.aimv2.prefix_attention_triton.default, (q, k, v, lens, True, 0.25))
    out, lse = torch.ops.aimv2.prefix_attention_triton(q, k, v, None, True, 0.25)
    do = torch.randn_like(out)
    torch.library.opcheck(torch.ops.aimv2.prefix_attention_triton_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, None, True, 0.25))


def test_torch_compile_fullgraph(device):
    q, k, v = _qkv(2, 1, 17, 16, torch.bfloat16, device)
    lens = torch.tensor([0, 9], device=device)

    def loss(q, k, v, lens):
        return prefix_attention(q, k, v, lens, backend="triton").float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, lens), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v, lens), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
