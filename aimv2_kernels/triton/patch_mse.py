"""Triton backend of ``patch_mse_loss``: one fused pass over ``pred`` and the NCHW images, no patchified copy."""
# No ``from __future__ import annotations``: torch.library.custom_op infers the op's schema from the
# annotations of the decorated functions.
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .._backend import triton_interpret
from .._patch_rows_op import define_patch_rows_ops
from .tuning import tuned


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, rounded to nearest even on the bits (as c10::BFloat16 does), NaN kept.

    GPUs round ``x.to(tl.bfloat16)`` to nearest even, but Triton's interpreter truncates it, which doubles the
    rounding error of the tested path; this gives the same bits on both.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(x == x, rounded, quiet_nan).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _patch_mse_kernel(
    pred_ptr, images_ptr, prefix_ptr, grad_rows_ptr, out_ptr,
    n_rows, L, target_offset, patches_w, eps,
    stride_ib, stride_ic, stride_ih, stride_iw, stride_gb, stride_gl,
    C: tl.constexpr, PATCH: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
    HAS_PREFIX: tl.constexpr, GRAD: tl.constexpr,
):
    """Rows ``ROWS * pid ...`` of the flattened ``(B*L, P)`` problem; row (b, l) is patch ``l + target_offset``.

    pred is contiguous ``(B*L, P)``; images are ``(B, C, H, W)`` at the given strides. Without GRAD, writes
    ``out[r] = mean_P (pred - target)^2`` (fp32 ``(B*L,)``); with GRAD, writes
    ``out[r] = grad_rows[b, l] * 2 (pred - target) / P`` (pred's dtype and shape, rounded once). Rows that do
    not count read nothing and get 0.
    """
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) flat row index b * L + l
    in_range = row < n_rows
    b = row // L
    pos = row - b * L  # l, the row within its image
    n = pos + target_offset  # patch index in raster order
    counted = in_range
    if HAS_PREFIX:
        counted = counted & (n >= tl.load(prefix_ptr + b, mask=in_range, other=0))
    ph = n // patches_w
    pw = n - ph * patches_w

    # Flat patch-vector index k, ordered (row in patch, column in patch, channel), channel fastest.
    k = tl.arange(0, BLOCK_P)
    in_patch = k < P
    k_row = k // (PATCH * C)
    k_col = (k // C) % PATCH
    k_ch = k % C
    k_off = k_ch * stride_ic + k_row * stride_ih + k_col * stride_iw  # (BLOCK_P,) offset inside a patch
    patch_off = b * stride_ib + (ph * PATCH) * stride_ih + (pw * PATCH) * stride_iw  # (ROWS,) top-left corner
    mask = counted[:, None] & in_patch[None, :]

    x = tl.load(images_ptr + patch_off[:, None] + k_off[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / P
    centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / (P - 1)  # unbiased; two passes over registers
    rstd = tl.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.sqrt_rn(var + eps))

    pred_off = row[:, None] * P + k[None, :]
    y = tl.load(pred_ptr + pred_off, mask=mask, other=0.0).to(tl.float32)
    diff = y - centered * rstd[:, None]  # 0 outside the patch and on rows that do not count
    if GRAD:
        g = tl.load(grad_rows_ptr + b * stride_gb + pos * stride_gl, mask=counted, other=0.0).to(tl.float32)
        grad = diff * (g * (2.0 / P))[:, None]
        if out_ptr.dtype.element_ty == tl.bfloat16:
            grad = _round_to_bf16(grad)
        tl.store(out_ptr + pred_off, grad.to(out_ptr.dtype.element_ty), mask=in_range[:, None] & in_patch[None, :])
    else:
        tl.store(out_ptr + row, tl.sum(diff * diff, axis=1) / P, mask=in_range)


def _configs():
    """GPU configs; the pruner keeps those of 4 to 16 elements per thread, in this order (rows, then warps)."""
    return [triton.Config({"ROWS": rows}, num_warps=warps)
            for rows in (1, 2, 4, 8, 16, 32, 64, 128) for warps in (2, 4, 8, 16)]


def _prune(configs, named_args, **kwargs):
    """Keep tiles of 4 to 16 elements per thread: enough for vector loads, few enough to stay in registers
    (at most 8 with 16 warps, see below).

    The kernel's only shared memory is the scratch of its row reductions (``ROWS * num_warps`` floats), which
    fits every device, so registers are the binding limit here. Patches too large or too small for that range
    get the one config nearest to 8 elements per thread.

    16 warps: ptxas kept these 512-thread programs at 64 registers or fewer and spilled instead of using more.
    16 elements per thread (ROWS=8 at BLOCK_P=1024) spilled on sm_80 with GRAD: Triton 3.9 12 B stores / 48 B
    loads (bf16) and 8 / 32 B (fp32), Triton 3.6 4 / 12 B (fp32); 60-64 registers without spill on sm_90a. 4
    and 8 elements per thread with 16 warps use 32-48 registers on both (tools/triton_compile_check.py).
    """
    block_p = {**named_args, **kwargs}["BLOCK_P"]

    def per_thread(config):
        return config.kwargs["ROWS"] * block_p / (32 * config.num_warps)

    kept = [c for c in configs if 4 <= per_thread(c) <= (8 if c.num_warps >= 16 else 16)]
    return kept or [min(configs, key=lambda c: abs(math.log2(per_thread(c) / 8)))]


def _rule(configs, args, target):
    """The pruning rule (see .tuning): :func:`_prune`, the same on every target (measured on sm_80 and sm_90a)."""
    return _prune(configs, args)


# Not used under TRITON_INTERPRET=1: _launch then runs the plain kernel with one fixed config.
_patch_mse_kernel_tuned = tuned("patch_mse", _configs(), _rule, key=["n_rows", "P", "GRAD"])(_patch_mse_kernel)


def _launch(pred: torch.Tensor, images: torch.Tensor, patch_size: int, prefix_lens: Optional[torch.Tensor],
            target_offset: int, eps: float, grad_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the kernel on a fresh output; no autograd, no host synchronisation.

    Without ``grad_rows``: returns ``rows``, fp32 ``(B, L)``, ``mean_P (pred - target)^2`` (0 where not
    counted). With ``grad_rows`` (floating ``(B, L)``, expanded tensors included): returns
    ``grad_rows[..., None] * d rows / d pred``, pred's shape and dtype (0 where not counted).
    """
    batch, length, numel = pred.shape
    channels, _, width = images.shape[1:]
    pred = pred.contiguous()  # a no-op for the model's (B, L, P) head output; the gradient shares its offsets
    if grad_rows is not None:
        out = new_output(pred.shape, dtype=pred.dtype, device=pred.device)
    else:
        out = new_output((batch, length), dtype=torch.float32, device=pred.device)
    n_rows = batch * length
    if n_rows == 0:
        return out
    block_p = triton.next_power_of_2(numel)
    strides_g = (0, 0) if grad_rows is None else grad_rows.stride()
    # Pointers a variant does not read are passed as `out`, which the kernel then never loads from.
    args = (pred, images, out if prefix_lens is None else prefix_lens, out if grad_rows is None else grad_rows,
            out, n_rows, length, target_offset, width // patch_size, eps, *images.stride(), *strides_g)
    meta = dict(C=channels, PATCH=patch_size, P=numel, BLOCK_P=block_p, HAS_PREFIX=prefix_lens is not None,
                GRAD=grad_rows is not None)
    if triton_interpret():  # one fixed config: the interpreter runs programs one after another
        rows_per_program = max(1, 2048 // block_p)
        _patch_mse_kernel[(triton.cdiv(n_rows, rows_per_program),)](*args, ROWS=rows_per_program, **meta)
    else:
        with torch.cuda.device(pred.device):  # Triton launches on the current device, which may be another GPU
            _patch_mse_kernel_tuned[lambda m: (triton.cdiv(n_rows, m["ROWS"]),)](*args, **meta)
    return out


patch_mse_rows_op, patch_mse_rows_backward_op = define_patch_rows_ops("patch_mse_rows_triton", _launch)


def patch_mse_rows(pred: torch.Tensor, images: torch.Tensor, patch_size: int,
                   prefix_lens: Optional[torch.Tensor], target_offset: int, eps: float) -> torch.Tensor:
    """Per-row normalized-pixel MSE with Triton (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    Args:
        pred: ``(B, L, P)`` fp32/bf16/fp16, ``L = N - target_offset``, ``P = C * p * p``; any strides (made
            contiguous, a no-op for a Linear's output).
        images: ``(B, C, H, W)``, same dtype and device, any strides (read in place, patch by patch).
        patch_size: p; H and W are multiples of it.
        prefix_lens: None or an integer ``(B,)`` tensor on the same device; row l counts iff
            ``l + target_offset >= prefix_lens[b]``.
        target_offset: row l is compared with patch ``l + target_offset``.
        eps: added to the unbiased variance inside the sqrt.

    Returns:
        fp32 ``(B, L)``: ``mean_P (pred - target)^2`` per row, 0 where the row is not counted. Arguments are
        checked by :func:`aimv2_kernels.patch_mse_loss`. Rows that do not count skip the image and pred reads.
        The backward recomputes the target and writes the gradient of ``pred`` (its dtype) in one pass.
    """
    return patch_mse_rows_op(pred, images, patch_size, prefix_lens, target_offset, eps)
