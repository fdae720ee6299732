"""Reference prefix-causal attention: dense scores, a boolean mask, fp32 softmax."""
from __future__ import annotations

import torch


def prefix_mask(prefix_lens: torch.Tensor | None, batch: int, seq_len: int, *, causal: bool = True,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``(B, 1, S, S)``; True where query i may see key j: ``not causal or j <= i or j < M_b``.

    ::

        S=5, M=2 (x = visible)      keys j ->
                           q 0:  x x . . .
                           q 1:  x x . . .
                           q 2:  x x x . .
                           q 3:  x x x x .
                           q 4:  x x x x x
    """
    i = torch.arange(seq_len, device=device)
    if not causal:
        return torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool, device=device)
    visible = (i[None, :] <= i[:, None])[None, None].expand(batch, 1, seq_len, seq_len)
    if prefix_lens is None:
        return visible
    in_prefix = i[None, None, None, :] < prefix_lens.to(device)[:, None, None, None]
    return visible | in_prefix


def prefix_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               prefix_lens: torch.Tensor | None = None, *, causal: bool = True,
                               scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale, masked) v`` with the softmax in fp32 (fp64 for fp64 inputs).

    Shapes ``(B, H, S, D)``; returns q's dtype.
    """
    b, _, s, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Scores from the upcast inputs (as a tensor-core kernel accumulates exact products in fp32), the
    # probabilities cast back to v's dtype for the second matmul (as flash attention does).
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    mask = prefix_mask(prefix_lens, b, s, causal=causal, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v).to(q.dtype)
