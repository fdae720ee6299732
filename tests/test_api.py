"""Public API contract: bad input raises ValueError/TypeError naming the argument; backends never fall back."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import aimv2_kernels as K
from aimv2_kernels import BackendUnavailableError, cross_entropy, linear_cross_entropy, patch_mse_loss, prefix_attention


def _qkv(b=2, h=2, s=8, d=64, dtype=torch.float32):
    return [torch.randn(b, h, s, d, dtype=dtype) for _ in range(3)]


ATTENTION_MISUSE = [
    (lambda q, k, v: prefix_attention(q[0], k, v), ValueError, "q"),
    (lambda q, k, v: prefix_attention(q, k[:, :, :5], v), ValueError, "k"),
    (lambda q, k, v: prefix_attention(q, k, v[..., :32]), ValueError, "v"),
    (lambda q, k, v: prefix_attention(q, k.half(), v), TypeError, "k"),
    (lambda q, k, v: prefix_attention(q.int(), k, v), TypeError, "q"),
    (lambda q, k, v: prefix_attention(q.numpy(), k, v), TypeError, "q"),
    (lambda q, k, v: prefix_attention(q, k, v, torch.tensor([1.0, 2.0])), TypeError, "prefix_lens"),
    (lambda q, k, v: prefix_attention(q, k, v, torch.tensor([1, 2, 3])), ValueError, "prefix_lens"),
    (lambda q, k, v: prefix_attention(q, k, v, torch.tensor([1, 9])), ValueError, "prefix_lens"),
    (lambda q, k, v: prefix_attention(q, k, v, torch.tensor([-1, 2])), ValueError, "prefix_lens"),
    (lambda q, k, v: prefix_attention(q, k, v, causal=1), TypeError, "causal"),
    (lambda q, k, v: prefix_attention(q, k, v, scale="x"), TypeError, "scale"),
    (lambda q, k, v: prefix_attention(q, k, v, backend="fast"), ValueError, "backend"),
    (lambda q, k, v: prefix_attention(q, k, v, backend=None), TypeError, "backend"),
]


@pytest.mark.parametrize("call,exc,name", ATTENTION_MISUSE)
def test_attention_misuse(call, exc, name):
    with pytest.raises(exc, match=name):
        call(*_qkv())


def _patch_args(b=2, offset=1):
    images = torch.randn(b, 3, 28, 28)
    return torch.randn(b, 4 - offset, 588), images


PATCH_MISUSE = [
    (lambda p, i: patch_mse_loss(p[0], i, 14), ValueError, "pred"),
    (lambda p, i: patch_mse_loss(p, i[0], 14), ValueError, "images"),
    (lambda p, i: patch_mse_loss(p, i.half(), 14), TypeError, "images"),
    (lambda p, i: patch_mse_loss(p, i, 14.0), TypeError, "patch_size"),
    (lambda p, i: patch_mse_loss(p, i, 0), ValueError, "patch_size"),
    (lambda p, i: patch_mse_loss(p, i, 5), ValueError, "patch_size"),
    (lambda p, i: patch_mse_loss(p, i, 14), ValueError, "pred"),  # offset 0 wants 4 rows
    (lambda p, i: patch_mse_loss(p, i, 14, target_offset=4), ValueError, "target_offset"),
    (lambda p, i: patch_mse_loss(p, i, 14, target_offset=1.0), TypeError, "target_offset"),
    (lambda p, i: patch_mse_loss(p, i, 14, torch.tensor([0, 5]), target_offset=1), ValueError, "prefix_lens"),
    (lambda p, i: patch_mse_loss(p, i, 14, torch.tensor([0.0, 1.0]), target_offset=1), TypeError, "prefix_lens"),
    (lambda p, i: patch_mse_loss(p, i, 14, torch.tensor([1]), target_offset=1), ValueError, "prefix_lens"),
    (lambda p, i: patch_mse_loss(p, i, 14, target_offset=1, reduction="avg"), ValueError, "reduction"),
    (lambda p, i: patch_mse_loss(p, i, 14, target_offset=1, eps=0.0), ValueError, "eps"),
    (lambda p, i: patch_mse_loss(p, i, 14, target_offset=1, backend="gpu"), ValueError, "backend"),
    (lambda p, i: patch_mse_loss(p[..., :1], i[:, :1, :1, :1], 1), ValueError, "patch"),
]


@pytest.mark.parametrize("call,exc,name", PATCH_MISUSE)
def test_patch_mse_misuse(call, exc, name):
    with pytest.raises(exc, match=name):
        call(*_patch_args())


CE_MISUSE = [
    (lambda h, w, t: linear_cross_entropy(h, w.t(), t), ValueError, "weight"),
    (lambda h, w, t: linear_cross_entropy(h, w[None], t), ValueError, "weight"),
    (lambda h, w, t: linear_cross_entropy(h, w.half(), t), TypeError, "weight"),
    (lambda h, w, t: linear_cross_entropy(h, w, t.float()), TypeError, "targets"),
    (lambda h, w, t: linear_cross_entropy(h, w, t.bool()), TypeError, "targets"),
    (lambda h, w, t: linear_cross_entropy(h, w, t[:2]), ValueError, "targets"),
    (lambda h, w, t: linear_cross_entropy(h, w, t + 100), ValueError, "targets"),
    (lambda h, w, t: linear_cross_entropy(h, w, t - 100), ValueError, "targets"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, bias=torch.zeros(3)), ValueError, "bias"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, z_loss=-1.0), ValueError, "z_loss"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=1.0), TypeError, "ignore_index"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, reduction="max"), ValueError, "reduction"),
    (lambda h, w, t: linear_cross_entropy(h.int(), w, t), TypeError, "hidden"),
    (lambda h, w, t: cross_entropy(h, t[:, :1]), ValueError, "targets"),
    (lambda h, w, t: cross_entropy(h, t.float()), TypeError, "targets"),
    (lambda h, w, t: cross_entropy(h, torch.full_like(t, 40)), ValueError, "targets"),
    (lambda h, w, t: cross_entropy(h.long(), t), TypeError, "logits"),
]


@pytest.mark.parametrize("call,exc,name", CE_MISUSE)
def test_cross_entropy_misuse(call, exc, name):
    hidden, weight = torch.randn(3, 4, 16), torch.randn(10, 16)
    targets = torch.randint(0, 10, (3, 4))
    with pytest.raises(exc, match=name):
        call(hidden, weight, targets)


def test_ignore_index_is_allowed_outside_vocab():
    logits = torch.randn(4, 10)
    loss = cross_entropy(logits, torch.tensor([1, -100, 3, -100]))
    assert torch.isfinite(loss)


# -- dispatch ------------------------------------------------------------------------------------------------

def test_unknown_backend_lists_valid_values():
    with pytest.raises(ValueError, match="reference"):
        prefix_attention(*_qkv(), backend="flash")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_explicit_unavailable_backend_raises(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match=backend):
        prefix_attention(*_qkv(), backend=backend)


def test_cpu_backend_without_kernel_raises(monkeypatch):
    monkeypatch.delitem(K._backend.KERNELS, ("prefix_attention", "cpu"))
    with pytest.raises(BackendUnavailableError, match="cpu"):
        prefix_attention(*_qkv(), backend="cpu")


def test_float64_is_reference_only():
    q, k, v = _qkv(dtype=torch.float64)
    assert prefix_attention(q, k, v).dtype == torch.float64  # auto -> reference
    with pytest.raises(TypeError, match="float64"):
        prefix_attention(q, k, v, backend="cpu")


def test_auto_rule_on_cpu():
    expected = "cpu" if K._backend.extension_available() else "reference"
    assert K._backend.resolve_backend("patch_mse_loss", "auto", torch.device("cpu")) == expected
    assert K._backend.resolve_backend("prefix_attention", "auto", torch.device("cpu")) == expected
    assert "reference" in K.available_backends("prefix_attention")


def test_auto_rule_on_cuda_never_picks_unverified_cuda_kernels(monkeypatch):
    """On CUDA tensors "auto" follows CUDA_AUTO; the "cuda" backend is no candidate until verified on a GPU."""
    b = K._backend
    cuda = torch.device("cuda")
    monkeypatch.setattr(b, "_unavailable_reason", lambda op, backend, device: None)  # pretend all are built
    for op in ("patch_mse_loss", "prefix_attention", "cross_entropy", "linear_cross_entropy"):
        assert b.resolve_backend(op, "auto", cuda) == "triton"
        monkeypatch.setitem(b.CUDA_AUTO, op, ("cuda", "test"))
        assert b.resolve_backend(op, "auto", cuda) == "triton"  # not verified: still Triton
        monkeypatch.setattr(b, "CUDA_KERNELS_VERIFIED", True)
        assert b.resolve_backend(op, "auto", cuda) == "cuda"
        monkeypatch.setattr(b, "CUDA_KERNELS_VERIFIED", False)
    monkeypatch.setattr(b, "_unavailable_reason", lambda op, backend, device: None if backend == "cuda" else "no")
    assert b.resolve_backend("cross_entropy", "auto", cuda) == "reference"  # unverified cuda is not a fallback
    assert b.resolve_backend("cross_entropy", "cuda", cuda) == "cuda"  # explicit use works


def test_import_without_triton_or_extension():
    """Block triton and aimv2_kernels._C: both packages import and the reference path runs."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton.") or name == "aimv2_kernels._C":
                    raise ImportError(f"blocked: {name}")
                return None
        sys.meta_path.insert(0, Block())
        import torch, aimv2_kernels, aimv2
        from aimv2_kernels import prefix_attention, patch_mse_loss, available_backends
        q = torch.randn(1, 1, 4, 64)
        out = prefix_attention(q, q, q, torch.tensor([2]))
        assert out.shape == q.shape
        loss = patch_mse_loss(torch.randn(1, 4, 588), torch.randn(1, 3, 28, 28), 14)
        assert available_backends("patch_mse_loss") == ["reference"], available_backends("patch_mse_loss")
        cfg = aimv2.AIMv2Config.from_name("aimv2-tiny")
        model = aimv2.AIMv2(cfg)
        out = model(torch.randn(2, 3, 56, 56), torch.randint(0, 259, (2, 24)))
        out.loss.backward()
        assert "triton" not in sys.modules and "aimv2_kernels._C" not in sys.modules
        print("ok")
    """)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_import_touches_neither_triton_nor_cuda():
    code = ("import sys, torch, aimv2_kernels, aimv2; "
            "print(torch.cuda.is_initialized(), 'triton' in sys.modules, 'aimv2_kernels._C' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


def test_mismatched_devices_are_rejected():
    """A second device ("meta") stands in for a GPU: every op names the misplaced argument."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k is on meta"):
        prefix_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="prefix_lens is on meta"):
        prefix_attention(q, k, v, torch.tensor([1, 2], device="meta"))
    pred, images = _patch_args()
    with pytest.raises(ValueError, match="images is on meta"):
        patch_mse_loss(pred, images.to("meta"), 14, target_offset=1)
    hidden, weight, targets = torch.randn(5, 8), torch.randn(7, 8), torch.randint(0, 7, (5,))
    with pytest.raises(ValueError, match="weight is on meta"):
        linear_cross_entropy(hidden, weight.to("meta"), targets)
    with pytest.raises(ValueError, match="targets is on meta"):
        linear_cross_entropy(hidden, weight, targets.to("meta"))
    with pytest.raises(ValueError, match="targets is on meta"):
        cross_entropy(torch.randn(5, 7), targets.to("meta"))
