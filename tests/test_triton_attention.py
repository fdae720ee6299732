"""The Triton prefix-attention kernels (forward and backward) against the reference, within the float64 budget.

Without a GPU they run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py) with one 16x16 tile
config, so the shapes are small but span several tiles, a sequence tail and every prefix edge case.
"""
import pytest
import torch
import triton  # noqa: E402,F401  (a test dependency: a missing triton must fail, not skip)
from attention_cases import check_backend, check_never_visible_tiles_are_never_read
from attention_cases import qkv as _qkv

from aimv2_kernels import prefix_attention
from aimv2_kernels.testing import random_prefix_lens
from aimv2_kernels.triton import attention_backward as bwd_module
from aimv2_kernels.triton import attention_forward as fwd_module
from aimv2_kernels.triton.attention import prefix_attention_triton

LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

KERNELS_TUNED = [fwd_module._attn_fwd_kernel, bwd_module._attn_bwd_dkdv_kernel, bwd_module._attn_bwd_dq_kernel]


@pytest.fixture(params=["pointers", "tma"])
def load_path(request, monkeypatch, device):
    """Both ways the kernels read q, k, v and dO: pointer loads (sm_80, fp32) and tensor descriptors (TMA, fp16
    and bf16 on sm_90+). The interpreter runs both. On a GPU only the path that GPU takes by default runs (each
    path is a separate set of autotuned compiles, and bench/gpu_check.sh caps the GPU test stage)."""
    if device.type == "cuda":
        default = "tma" if fwd_module.tma_for(_capability(device), torch.bfloat16) else "pointers"
        if request.param != default:
            pytest.skip(f"on this GPU the kernels load through {default}; the interpreter tests both paths")
    monkeypatch.setenv(fwd_module.TMA_ENV, "1" if request.param == "tma" else "0")
    return request.param


def _capability(device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _check(q, k, v, lens, **kw):
    """The triton backend vs the same-dtype reference vs the float64 oracle (see attention_cases)."""
    check_backend("triton", q, k, v, lens, **kw)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("s,d", [(1, 64), (17, 128), (40, 64)])
def test_prefix_lens_edges(dtype, s, d, device, load_path):
    if load_path == "tma" and dtype == torch.float32 and device.type == "cpu":
        pytest.skip("fp32 inputs always use pointer loads: the pointers case")
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
def test_views_of_fused_qkv_and_custom_scale(dtype, device, load_path):
    """Permuted views of a fused (B, S, 3, H, D) projection, int32 prefix lengths, and a custom scale (with TMA:
    descriptors over the strided views, no copy)."""
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
def test_unequal_tiles(bm, bn, monkeypatch, device, load_path):
    """BLOCK_M != BLOCK_N (as in the GPU configs) in all three kernels, through the tile-range arithmetic."""
    for kernel in KERNELS_TUNED:
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4,
                                                              num_stages=1)])
    lens = torch.tensor([0, 17, 40, 31], device=device)
    _check(*_qkv(4, 1, 40, 32, torch.bfloat16, device), lens, label=f"tiles {bm}x{bn}")


def _max_block() -> int:
    """The largest tile of any config: a multiple of every tile size (powers of two)."""
    return max(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for kern in KERNELS_TUNED for c in kern.configs)


def test_never_visible_tiles_are_never_read(device):
    check_never_visible_tiles_are_never_read(fwd_module.attention_forward, bwd_module.attention_backward, _max_block(),
                                             device)


def test_never_visible_tiles_are_never_read_through_descriptors(device, monkeypatch):
    """The same with TMA (bf16: fp32 inputs never use descriptors). A descriptor load of a tile past the
    sequence returns zeros, but a tile inside it that the kernel must not need would bring its NaN."""
    if device.type == "cuda" and not fwd_module.tma_for(_capability(device), torch.bfloat16):
        pytest.skip("tensor descriptors need sm_90")
    monkeypatch.setenv(fwd_module.TMA_ENV, "1")
    check_never_visible_tiles_are_never_read(fwd_module.attention_forward, bwd_module.attention_backward,
                                             _max_block(), device, dtype=torch.bfloat16)


@pytest.mark.parametrize("causal", [True, False])
def test_unmasked_path_equals_masked_path(causal, device, load_path):
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


def test_tma_setting(monkeypatch):
    """AIMV2_ATTENTION_TMA: auto is off without a GPU (the interpreter), 1 turns descriptors on for fp16/bf16
    only, anything else is an error that names the variable."""
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    for value, want in (("auto", False), ("", False), ("0", False), ("1", True)):
        monkeypatch.setenv(fwd_module.TMA_ENV, value)
        assert fwd_module.use_tma(bf16) is want, value
        assert fwd_module.use_tma(fp32) is False, value
    monkeypatch.setenv(fwd_module.TMA_ENV, "yes")
    with pytest.raises(ValueError, match=fwd_module.TMA_ENV):
        fwd_module.use_tma(bf16)
    assert fwd_module.tma_for(90, torch.bfloat16) and fwd_module.tma_for(100, torch.float16)
    assert not fwd_module.tma_for(80, torch.bfloat16) and not fwd_module.tma_for(90, torch.float32)


def test_tma_prepare_copies_only_unaddressable_views():
    """With TMA a view is copied only when a descriptor cannot address it: a start or a row stride that is not
    a multiple of 16 bytes. The fused-qkv views of the model are used as they are."""
    qkv = torch.randn(2, 9, 3, 2, 16, dtype=torch.bfloat16)
    q = qkv.permute(2, 0, 3, 1, 4)[0]
    misaligned = torch.randn(2 * 2 * 9 * 16 + 1, dtype=torch.bfloat16)[1:].view(2, 2, 9, 16)  # starts 2 B off
    odd_rows = torch.randn(2, 2, 9, 17, dtype=torch.bfloat16)[..., :16]  # rows 34 B apart
    assert misaligned.data_ptr() % 16 and (odd_rows.stride(2) * 2) % 16
    kept = fwd_module.prepare_inputs(q, misaligned, odd_rows, tma=True)
    assert kept[0] is q
    for before, after in zip((misaligned, odd_rows), kept[1:]):
        assert after is not before and after.is_contiguous() and torch.equal(after, before)
    assert all(a is b for a, b in zip(fwd_module.prepare_inputs(q, misaligned, odd_rows), (q, misaligned, odd_rows)))


def test_tma_scratch_sets_and_restores_the_allocator():
    """The descriptors' scratch: an allocator is set for the launch when the caller has none, and the caller's
    state (none, or their own allocator) is what remains afterwards."""
    from triton.runtime import _allocation
    null = _allocation._NULL_ALLOCATOR
    assert _allocation._allocator.get() is null
    with fwd_module.tma_scratch(True, torch.device("cpu")):
        allocate = _allocation._allocator.get()
        assert allocate is not null
        buffer = allocate(384, 128, None)
        assert buffer.numel() == 384 and buffer.device.type == "cpu"
    assert _allocation._allocator.get() is null
    with fwd_module.tma_scratch(False, torch.device("cpu")):
        assert _allocation._allocator.get() is null

    def own(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)
    token = _allocation._allocator.set(own)
    try:
        with fwd_module.tma_scratch(True, torch.device("cpu")):
            assert _allocation._allocator.get() is own
        assert _allocation._allocator.get() is own
    finally:
        _allocation._allocator.reset(token)


def test_tma_unaligned_inputs(device, monkeypatch):
    """Inputs a descriptor cannot address (2 bytes off a 16-byte boundary) still give the right answer."""
    if device.type == "cuda" and not fwd_module.tma_for(_capability(device), torch.bfloat16):
        pytest.skip("tensor descriptors need sm_90")
    monkeypatch.setenv(fwd_module.TMA_ENV, "1")
    b, h, s, d = 2, 2, 23, 32
    flat = torch.randn(3, b * h * s * d + 1, dtype=torch.bfloat16, device=device)
    q, k, v = (flat[i, 1:].view(b, h, s, d).requires_grad_() for i in range(3))
    assert q.data_ptr() % 16
    _check(q, k, v, torch.tensor([0, 11], device=device), label="unaligned views, TMA")
