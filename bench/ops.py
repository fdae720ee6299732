"""Benchmark setups for the three ops: ``setup(config, provider, mode) -> callable``, plus their FLOP/byte counts.

Providers: our backends by name (``"triton"``, ``"cpu"``, ``"cuda"``), ``"reference"`` (eager),
``"reference-compiled"`` (the reference under ``torch.compile``) and the installed peers
(``"sdpa-dense-mask"``, ``"flex-attention"``; ``"liger"``, ``"cut-cross-entropy"`` and
``"cce-torch_compile"`` (cut-cross-entropy's ``impl="torch_compile"``, which runs on a CPU) when installed).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import aimv2_kernels as K
from aimv2_kernels.reference import (linear_cross_entropy_reference, patch_mse_loss_reference,
                                     prefix_attention_reference, prefix_mask)

OURS = ("triton", "cpu", "cuda")


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn)


def _step(loss_fn, leaves, mode):
    """fwd: the loss; fwd+bwd: loss and backward; bwd: backward of a saved graph (retain_graph)."""
    if mode == "fwd":
        return lambda: loss_fn()
    if mode == "fwd+bwd":
        def run():
            for t in leaves:
                t.grad = None
            loss_fn().backward()
        return run
    out = loss_fn()

    def run_bwd():
        for t in leaves:
            t.grad = None
        out.backward(retain_graph=True)
    return run_bwd


# -- patch loss ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchConfig:
    batch: int
    image_size: int
    patch: int = 14
    dtype: torch.dtype = torch.bfloat16

    @property
    def name(self) -> str:
        return f"B={self.batch} {self.image_size}px {str(self.dtype).replace('torch.', '')}"

    def min_bytes(self) -> int:
        """Read pred and images once, write grad_pred once (DESIGN.md's floor)."""
        n = (self.image_size // self.patch) ** 2
        pred = self.batch * (n - 1) * 3 * self.patch ** 2
        images = self.batch * 3 * self.image_size ** 2
        return (2 * pred + images) * torch.finfo(self.dtype).bits // 8


def patch_setup(cfg: PatchConfig, provider: str, mode: str, device):
    n = (cfg.image_size // cfg.patch) ** 2
    images = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=cfg.dtype)
    pred = torch.randn(cfg.batch, n - 1, 3 * cfg.patch ** 2, device=device, dtype=cfg.dtype, requires_grad=True)
    lens = torch.randint(1, n, (cfg.batch,), device=device)
    if provider in OURS or provider == "reference":
        fn = functools.partial(K.patch_mse_loss, backend=provider)
    elif provider == "reference-compiled":
        fn = _compiled(patch_mse_loss_reference)
    else:
        raise ValueError(f"no provider {provider!r} for patch_mse_loss")
    return _step(lambda: fn(pred, images, cfg.patch, lens, target_offset=1), [pred], mode)


# -- attention -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionConfig:
    batch: int
    heads: int
    seq: int
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    prefix: str = "random"  # "random" (uniform in [1, S-1] per sample) or "causal" (no prefix)

    @property
    def name(self) -> str:
        return f"B={self.batch} H={self.heads} S={self.seq} D={self.head_dim} {self.prefix}"

    def prefix_lens(self, device) -> torch.Tensor | None:
        if self.prefix == "causal":
            return None
        gen = torch.Generator().manual_seed(0)
        return torch.randint(1, self.seq, (self.batch,), generator=gen).to(device)

    def fwd_flops(self, lens: torch.Tensor | None) -> float:
        """``2 D H sum_b (S^2 + M_b^2)``: visible pairs times 4D (DESIGN.md)."""
        m2 = 0.0 if lens is None else float((lens.double() ** 2).sum())
        return 2.0 * self.head_dim * self.heads * (self.batch * self.seq ** 2 + m2)


def attention_setup(cfg: AttentionConfig, provider: str, mode: str, device):
    shape = (cfg.batch, cfg.heads, cfg.seq, cfg.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=cfg.dtype, requires_grad=True) for _ in range(3))
    lens = cfg.prefix_lens(device)
    if provider in OURS or provider == "reference":
        loss = lambda: K.prefix_attention(q, k, v, lens, backend=provider).float().sum()  # noqa: E731
    elif provider == "reference-compiled":
        ref = _compiled(prefix_attention_reference)
        loss = lambda: ref(q, k, v, lens).float().sum()  # noqa: E731
    elif provider == "sdpa-dense-mask":
        mask = prefix_mask(lens, cfg.batch, cfg.seq, device=device)
        loss = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum()  # noqa: E731
    elif provider == "flex-attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        lens_t = lens if lens is not None else torch.zeros(cfg.batch, dtype=torch.long, device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) | (kv_idx < lens_t[b])
        block_mask = create_block_mask(mask_mod, cfg.batch, None, cfg.seq, cfg.seq, device=device)
        flex = _compiled(flex_attention)
        loss = lambda: flex(q, k, v, block_mask=block_mask).float().sum()  # noqa: E731
    else:
        raise ValueError(f"no provider {provider!r} for prefix_attention")
    return _step(loss, [q, k, v], mode)


# -- linear cross-entropy ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearCEConfig:
    tokens: int
    dim: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def name(self) -> str:
        return f"N={self.tokens} D={self.dim} V={self.vocab} {str(self.dtype).replace('torch.', '')}"

    def flops(self, mode: str) -> float:
        return (2.0 if mode == "fwd" else 6.0) * self.tokens * self.dim * self.vocab

    def logits_mb(self) -> float:
        return self.tokens * self.vocab * torch.finfo(self.dtype).bits / 8 / 2**20


def linear_ce_setup(cfg: LinearCEConfig, provider: str, mode: str, device):
    hidden = torch.randn(cfg.tokens, cfg.dim, device=device, dtype=cfg.dtype, requires_grad=True)
    weight = (torch.randn(cfg.vocab, cfg.dim, device=device) / cfg.dim ** 0.5).to(cfg.dtype).requires_grad_()
    targets = torch.randint(0, cfg.vocab, (cfg.tokens,), device=device)
    if provider in OURS or provider == "reference":
        loss = lambda: K.linear_cross_entropy(hidden, weight, targets, backend=provider)  # noqa: E731
    elif provider == "reference-compiled":
        ref = _compiled(linear_cross_entropy_reference)
        loss = lambda: ref(hidden, weight, targets)  # noqa: E731
    elif provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        loss = lambda: liger(weight, hidden, targets)  # noqa: E731
    elif provider in ("cut-cross-entropy", "cce-torch_compile"):
        from cut_cross_entropy import linear_cross_entropy as cce
        impl = {"impl": "torch_compile"} if provider == "cce-torch_compile" else {}  # the CPU-capable impl
        loss = lambda: cce(hidden, weight, targets, **impl)  # noqa: E731
    else:
        raise ValueError(f"no provider {provider!r} for linear_cross_entropy")
    return _step(loss, [hidden, weight], mode)
