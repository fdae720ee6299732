"""aimv2.probe: the attentive probe head (Apple's AttentionPoolingClassifier) against a float64 oracle."""
import pytest
import torch

from aimv2 import AIMv2Config, AIMv2Encoder
from aimv2.probe import AttentionPoolingClassifier, probe_heads
from aimv2_kernels.testing import assert_within_budget


def oracle(probe: AttentionPoolingClassifier, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """The probe written out per head in ``dtype`` (BatchNorm in training mode: batch statistics). float64 is
    the oracle; x's own dtype gives the same-precision reference of the error budget."""
    x = x.to(dtype)
    if probe.bn is not None and isinstance(probe.bn, torch.nn.BatchNorm1d):
        mean = x.mean(dim=(0, 1))
        var = x.var(dim=(0, 1), unbiased=False)
        x = (x - mean) / torch.sqrt(var + 1e-6)
    b, n, d = x.shape
    h = probe.num_heads
    hd = d // h
    k = (x @ probe.k.weight.to(dtype).T).reshape(b, n, h, hd)
    v = (x @ probe.v.weight.to(dtype).T).reshape(b, n, h, hd)
    q = probe.query.to(dtype).reshape(probe.num_queries, h, hd)
    scores = torch.einsum("qhc,bnhc->bhqn", q, k) / hd ** 0.5
    pooled = torch.einsum("bhqn,bnhc->bqhc", scores.softmax(-1), v).reshape(b, probe.num_queries, d).mean(1)
    return pooled @ probe.linear.weight.to(dtype).T + probe.linear.bias.to(dtype)


@pytest.mark.parametrize("dim, heads", [(64, 1), (128, 1), (256, 2), (1024, 8), (1536, 12), (3072, 24), (384, 3)])
def test_heads_are_dim_over_128(dim, heads):
    assert probe_heads(dim) == heads
    assert AttentionPoolingClassifier(dim, 10).num_heads == heads


@pytest.mark.parametrize("dim, queries, bn", [(256, 1, True), (64, 3, False), (384, 2, True)])
def test_matches_float64_oracle(dim, queries, bn):
    probe = AttentionPoolingClassifier(dim, 7, num_queries=queries, use_batch_norm=bn)
    torch.nn.init.normal_(probe.linear.bias)
    x = torch.randn(5, 11, dim) * 2 + 0.5
    logits, pooled = probe(x)
    assert logits.shape == (5, 7) and pooled.shape == (5, dim) and logits.dtype == torch.float32
    assert_within_budget(logits, oracle(probe, x, torch.float32), oracle(probe, x), name="logits")


def test_parameter_count_is_two_d_squared_plus_queries():
    probe = AttentionPoolingClassifier(1024, 1000)
    pooling = sum(p.numel() for name, p in probe.named_parameters() if not name.startswith("linear"))
    assert pooling == 2 * 1024 ** 2 + 1024


def test_frozen_trunk_gets_no_gradient():
    cfg = AIMv2Config.from_name("aimv2-tiny").encoder
    trunk = AIMv2Encoder(cfg, backend="reference").eval().requires_grad_(False)
    probe = AttentionPoolingClassifier(cfg.dim, 3)
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        features = trunk(images)
    logits, _ = probe(features)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is None for p in trunk.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probe.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=0, num_classes=3), "dim"), (dict(dim=64, num_classes=0), "num_classes"),
    (dict(dim=64, num_classes=3, num_heads=5), "num_heads"),
    (dict(dim=64, num_classes=3, num_queries=0), "num_queries"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionPoolingClassifier(**kwargs)


def test_bad_features_shape():
    probe = AttentionPoolingClassifier(64, 3)
    with pytest.raises(ValueError, match="features"):
        probe(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="features"):
        probe(torch.randn(5, 64))
