"""Test helpers: error-budget comparisons against a float64 oracle.

The rule (as in flash-attention, cut-cross-entropy and attention-gym): a kernel's error against a float64
oracle must be at most ``k`` times the error of the same-dtype PyTorch reference against that oracle, plus a
tiny floor for results the reference happens to get exactly right. ``k`` is 2 for forward values and 3 for
gradients.
"""
from __future__ import annotations

import torch

FORWARD_K = 2.0
GRADIENT_K = 3.0


def max_abs_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return (x.detach().double() - oracle.detach().double()).abs().max().item() if x.numel() else 0.0


def error_budget(reference: torch.Tensor, oracle: torch.Tensor, *, k: float = FORWARD_K,
                 floor: float | None = None) -> float:
    """Allowed max-abs error: ``k * err(reference vs oracle) + floor``.

    The floor defaults to ``4 * eps(fp32) * max|oracle|``: fp32 rounding of the result itself, which the
    reference may avoid by luck (for example when it computes in float64 internally).
    """
    if floor is None:
        scale = oracle.detach().double().abs().max().item() if oracle.numel() else 0.0
        floor = 4 * torch.finfo(torch.float32).eps * max(scale, 1e-30)
    return k * max_abs_err(reference, oracle) + floor


def assert_within_budget(actual: torch.Tensor, reference: torch.Tensor, oracle: torch.Tensor, *,
                         k: float = FORWARD_K, floor: float | None = None, name: str = "output") -> None:
    """Assert ``max|actual - oracle| <= k * max|reference - oracle| + floor``, with shapes equal and all finite.

    Args:
        actual: the kernel's result (any dtype).
        reference: the package's same-dtype reference result on the same inputs.
        oracle: the float64 reference result on the same (upcast) inputs.
        k: the budget multiple: :data:`FORWARD_K` for values, :data:`GRADIENT_K` for gradients.
        name: what is compared, for the message.
    """
    if actual.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != oracle shape {tuple(oracle.shape)}")
    if reference.shape != oracle.shape:
        raise AssertionError(f"{name}: reference shape {tuple(reference.shape)} != {tuple(oracle.shape)}")
    if not torch.isfinite(actual).all():
        bad = (~torch.isfinite(actual)).sum().item()
        raise AssertionError(f"{name}: {bad} non-finite elements (unwritten or overflowed)")
    err = max_abs_err(actual, oracle)
    budget = error_budget(reference, oracle, k=k, floor=floor)
    if not err <= budget:
        ref_err = max_abs_err(reference, oracle)
        raise AssertionError(f"{name}: max abs error {err:.3e} vs the float64 oracle exceeds the budget "
                             f"{budget:.3e} ({k} x reference error {ref_err:.3e} + floor)")


def random_prefix_lens(batch: int, upper: int, *, generator: torch.Generator | None = None,
                       include_edges: bool = True) -> torch.Tensor:
    """Random ``(batch,)`` int64 prefix lengths in ``[0, upper]``; the first four are 0, 1, upper-1, upper."""
    lens = torch.randint(0, upper + 1, (batch,), generator=generator)
    if include_edges:
        edges = torch.tensor([0, 1, max(upper - 1, 0), upper])[:batch]
        lens[: len(edges)] = edges
    return lens


def single_key_floor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor) -> float:
    """Rounding floor of attention's dq and dk when every query sees exactly one key (S = 1, default scale).

    Both gradients are exactly 0 there. The reference's softmax backward returns an exact 0 by construction,
    while FlashAttention's ``P * (dP - delta)`` cancels two fp32 dot products of size ``max|dP|``: the floor is
    their fp32 rounding carried through ``scale * k`` (or ``scale * q``).
    """
    dp = (grad_out.double() @ v.double().transpose(-1, -2)).abs().max().item()
    qk = max(q.double().abs().max().item(), k.double().abs().max().item())
    return 4 * torch.finfo(torch.float32).eps * dp * q.shape[-1] ** -0.5 * qk
