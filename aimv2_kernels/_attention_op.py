"""The custom-op pair every kernel backend of ``prefix_attention`` registers around its launchers."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the ops' schemas from the
# annotations of the decorated functions.
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

# forward(q, k, v, prefix_lens, *, causal, scale) -> (out, lse): out (B, H, S, D) in q's dtype, lse fp32 (B, H, S).
# backward(grad_out, q, k, v, out, lse, prefix_lens, *, causal, scale) -> (dq, dk, dv), each q's shape and dtype.
ForwardLauncher = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
BackwardLauncher = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def define_attention_ops(name: str, forward: ForwardLauncher, backward: BackwardLauncher,
                         device_types: Union[str, Sequence[str], None] = None,
                         ) -> Tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    """Register ``aimv2::<name>`` (forward, returns ``(out, lse)``) and ``aimv2::<name>_backward`` with fake
    implementations and autograd: ``out`` is differentiable w.r.t. q, k and v; ``lse`` is not. The backward
    recomputes the probabilities from the saved ``lse`` (whatever base the launchers agree on).

    Returns ``(forward_op, backward_op)``; ``forward_op(q, k, v, prefix_lens, causal, scale)``.
    """

    @torch.library.custom_op(f"aimv2::{name}", mutates_args=(), device_types=device_types)
    def forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_lens: Optional[torch.Tensor],
                   causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return forward(q, k, v, prefix_lens, causal=causal, scale=scale)

    @torch.library.custom_op(f"aimv2::{name}_backward", mutates_args=(), device_types=device_types)
    def backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, prefix_lens: Optional[torch.Tensor], causal: bool,
                    scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return backward(grad_out, q, k, v, out, lse, prefix_lens, causal=causal, scale=scale)

    @forward_op.register_fake
    def _(q, k, v, prefix_lens, causal, scale):
        batch, heads, seq, head_dim = q.shape
        return q.new_empty((batch, heads, seq, head_dim)), q.new_empty((batch, heads, seq), dtype=torch.float32)

    @backward_op.register_fake
    def _(grad_out, q, k, v, out, lse, prefix_lens, causal, scale):
        return tuple(q.new_empty(q.shape[:4]) for _ in range(3))

    def setup_context(ctx, inputs, output):
        q, k, v, prefix_lens, causal, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, prefix_lens)
        ctx.causal, ctx.scale = causal, scale

    def backward_fn(ctx, grad_out, grad_lse):
        q, k, v, out, lse, prefix_lens = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, prefix_lens, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None

    forward_op.register_autograd(backward_fn, setup_context=setup_context)
    return forward_op, backward_op
