"""The reference ops against independent formulations and float64 oracles, plus gradcheck."""
import pytest
import torch
import torch.nn.functional as F

from aimv2_kernels import cross_entropy, linear_cross_entropy, patch_mse_loss, prefix_attention
from aimv2_kernels.reference import prefix_mask
from aimv2_kernels.testing import FORWARD_K, GRADIENT_K, assert_within_budget, random_prefix_lens

LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# -- prefix attention ----------------------------------------------------------------------------------------

def _dense_mask(prefix_lens, b, s, causal):
    """Independent construction of the prefix mask, element by element."""
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for bi in range(b):
        m = s if prefix_lens is None and not causal else (0 if prefix_lens is None else int(prefix_lens[bi]))
        for i in range(s):
            for j in range(s):
                mask[bi, 0, i, j] = (not causal) or j <= i or j < m
    return mask


@pytest.mark.parametrize("s", [1, 7, 33])
@pytest.mark.parametrize("causal", [True, False])
def test_prefix_mask_matches_definition(s, causal):
    lens = random_prefix_lens(5, s)
    assert torch.equal(prefix_mask(lens, 5, s, causal=causal), _dense_mask(lens, 5, s, causal))
    assert torch.equal(prefix_mask(None, 5, s, causal=causal), _dense_mask(None, 5, s, causal))


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("s,d", [(37, 64), (16, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_prefix_attention_vs_sdpa(dtype, s, d, causal):
    b, h = 4, 2
    q, k, v = (torch.randn(b, h, s, d, dtype=dtype) for _ in range(3))
    lens = random_prefix_lens(b, s)
    mask = _dense_mask(lens, b, s, causal)
    ours = prefix_attention(q, k, v, lens, causal=causal, backend="reference")
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert ours.dtype == dtype and ours.shape == (b, h, s, d)
    assert_within_budget(ours, sdpa, oracle, k=FORWARD_K, name=f"attention {dtype}")
    if dtype == torch.float32:  # semantics: the fp64 reference equals the fp64 SDPA oracle
        ref64 = prefix_attention(q.double(), k.double(), v.double(), lens, causal=causal, backend="reference")
        torch.testing.assert_close(ref64, oracle, rtol=1e-12, atol=1e-12)


def test_prefix_attention_none_is_causal_and_full_prefix_is_full():
    q, k, v = (torch.randn(2, 2, 9, 64, dtype=torch.float64) for _ in range(3))
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    full = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(prefix_attention(q, k, v, None, backend="reference"), causal)
    torch.testing.assert_close(prefix_attention(q, k, v, torch.tensor([9, 9]), backend="reference"), full)
    torch.testing.assert_close(prefix_attention(q, k, v, torch.tensor([0, 1]), backend="reference"), causal)
    torch.testing.assert_close(prefix_attention(q, k, v, causal=False, backend="reference"), full)


def test_prefix_attention_scale():
    q, k, v = (torch.randn(2, 2, 5, 64, dtype=torch.float64) for _ in range(3))
    ours = prefix_attention(q, k, v, causal=False, scale=0.3, backend="reference")
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_prefix_attention_gradcheck():
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lens = torch.tensor([0, 4])
    assert torch.autograd.gradcheck(lambda q, k, v: prefix_attention(q, k, v, lens, backend="reference"),
                                    (q, k, v))


# -- per-patch-normalized MSE ---------------------------------------------------------------------------------

def _patch_loss_einsum(pred, images, p, lens, offset, eps, reduction):
    """Independent formulation: the MAE/l3m einsum patchify, torch.var, and an explicit mask."""
    b, c, h, w = images.shape
    x = images.double().reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)[:, offset:]
    x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + eps) ** 0.5
    per = ((pred.double() - x) ** 2).mean(-1)
    idx = torch.arange(per.shape[1]) + offset
    mask = torch.ones_like(per, dtype=torch.bool) if lens is None else idx[None] >= lens[:, None]
    per = per * mask
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / max(int(mask.sum()), 1)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("offset", [0, 1])
def test_patch_mse_vs_einsum(dtype, reduction, offset):
    b, c, h, w, p = 5, 3, 28, 42, 14
    n, dim = (h // p) * (w // p), c * p * p
    images = torch.randn(b, c, h, w, dtype=dtype)
    pred = torch.randn(b, n - offset, dim, dtype=dtype)
    lens = random_prefix_lens(b, n)
    ours = patch_mse_loss(pred, images, p, lens, target_offset=offset, reduction=reduction, backend="reference")
    oracle = _patch_loss_einsum(pred, images, p, lens, offset, 1e-6, reduction)
    # The same-dtype independent formulation is the budget's yardstick; inputs are identical low-dtype values.
    independent = _patch_loss_einsum(pred.float(), images.float(), p, lens, offset, 1e-6, reduction).float()
    assert ours.dtype == torch.float32
    assert_within_budget(ours, independent, oracle, k=FORWARD_K, name=f"patch loss {reduction}")


def test_patch_mse_all_uncounted_mean_is_zero_with_zero_grad():
    images = torch.randn(2, 3, 28, 28)
    pred = torch.randn(2, 3, 588, requires_grad=True)
    loss = patch_mse_loss(pred, images, 14, torch.tensor([4, 4]), target_offset=1, backend="reference")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(pred.grad) == 0


def test_patch_mse_gradcheck():
    images = torch.randn(2, 2, 6, 9, dtype=torch.float64)
    pred = torch.randn(2, 5, 18, dtype=torch.float64, requires_grad=True)
    lens = torch.tensor([0, 3])
    assert torch.autograd.gradcheck(
        lambda x: patch_mse_loss(x, images, 3, lens, target_offset=1, backend="reference"), (pred,))


# -- cross-entropy --------------------------------------------------------------------------------------------

def _ce_independent(logits, targets, ignore_index, smoothing, z, reduction):
    flat = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    per = F.cross_entropy(flat, t, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none")
    keep = t != ignore_index
    per = per + z * torch.logsumexp(flat, -1) ** 2 * keep
    if reduction == "none":
        return per.reshape(targets.shape)
    return per.sum() if reduction == "sum" else per.sum() / max(int(keep.sum()), 1)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("smoothing,z", [(0.0, 0.0), (0.1, 1e-3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_vs_torch(dtype, smoothing, z, reduction):
    logits = (3 * torch.randn(4, 9, 1003)).to(dtype)
    targets = torch.randint(0, 1003, (4, 9))
    targets[0, :3] = -100
    ours = cross_entropy(logits, targets, label_smoothing=smoothing, z_loss=z, reduction=reduction,
                         backend="reference")
    oracle = _ce_independent(logits.double(), targets, -100, smoothing, z, reduction)
    independent = _ce_independent(logits.float(), targets, -100, smoothing, z, reduction)
    assert_within_budget(ours, independent, oracle, k=FORWARD_K, name="cross_entropy")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_linear_cross_entropy_vs_torch(dtype):
    hidden = torch.randn(3, 11, 64, dtype=dtype)
    weight = (torch.randn(517, 64) / 8).to(dtype)
    bias = torch.randn(517).to(dtype)
    targets = torch.randint(0, 517, (3, 11))
    targets[1] = 5
    params = (hidden, weight, bias)
    grads = {}
    # "indep" is the same-dtype torch pipeline (low-precision matmul, fp32 softmax-CE): the budget yardstick.
    for name, cast in (("ours", None), ("indep", None), ("oracle", torch.float64)):
        h, w, bb = (x.detach().clone().to(cast or x.dtype).requires_grad_() for x in params)
        if name == "ours":
            loss = linear_cross_entropy(h, w, targets, bias=bb, ignore_index=5, backend="reference")
        else:
            logits = F.linear(h, w, bb) if cast == torch.float64 else F.linear(h, w, bb).float()
            loss = _ce_independent(logits, targets, 5, 0.0, 0.0, "mean")
        loss.backward()
        grads[name] = (loss, h.grad, w.grad, bb.grad)
    for i, what in enumerate(["loss", "d hidden", "d weight", "d bias"]):
        k = FORWARD_K if i == 0 else GRADIENT_K
        assert_within_budget(grads["ours"][i], grads["indep"][i], grads["oracle"][i], k=k, name=what)


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
    logits = torch.randn(6, 50, requires_grad=True)
    loss = cross_entropy(logits, torch.full((6,), -100), backend="reference")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_cross_entropy_large_logits_stay_finite():
    logits = torch.randn(8, 300) * 1e4
    targets = torch.randint(0, 300, (8,))
    loss = cross_entropy(logits, targets, z_loss=1e-4, backend="reference")
    assert torch.isfinite(loss)


def test_cross_entropy_gradcheck():
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, -100, 3, 2])
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy(x, targets, label_smoothing=0.2, z_loss=0.01, backend="reference"), (logits,))


def test_linear_cross_entropy_gradcheck():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 8, -100, 0])
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy(h, w, targets, bias=b, z_loss=0.1, backend="reference"), (h, w, b))
