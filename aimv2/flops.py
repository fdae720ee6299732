"""Model FLOPs of an AIMv2 training step, the peak bf16 rate of known GPUs, and MFU.

:func:`model_flops_per_step` counts the matmul FLOPs (2 per multiply-add) of one forward + backward;
:func:`peak_flops` is the dense bf16 Tensor Core peak of the device (vendor datasheet values, or
``AIMV2_PEAK_TFLOPS``); :func:`mfu` divides the achieved model FLOP rate by it.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Sequence

import torch

from .config import AIMv2Config

PEAK_ENV = "AIMV2_PEAK_TFLOPS"

# Dense (no 2:4 sparsity) bf16 Tensor Core peaks in FLOP/s. These are NVIDIA datasheet values: the datasheets print
# the sparse rate with an asterisk ("* with sparsity"); the dense rate is half of it (the H100 figures are those of
# the NVIDIA H100 Tensor Core GPU Architecture whitepaper, which prints both). Each entry: a pattern matched
# against ``torch.cuda.get_device_name`` (upper-cased), the compute capability the GPU must report, the peak.
# Order matters: the first match wins. Variants whose peak differs and that are not listed (H100 NVL, H200 NVL,
# A10G, ...) must match nothing here: they give None (an unknown GPU), never a neighbour's peak.
_PEAKS: tuple[tuple[str, tuple[int, int], float | None], ...] = (
    (r"\bH100\b.*\bNVL\b|\bH200\b.*\bNVL\b", (9, 0), None),  # NVL cards: a lower peak than the SXM part
    (r"\bH100\b.*\bPCIE\b", (9, 0), 756e12),  # H100 PCIe: 1,513 TFLOPS with sparsity (H100 datasheet, whitepaper)
    (r"\bH100\b", (9, 0), 989.4e12),  # H100 SXM5: 1,979 with sparsity (H100 datasheet, whitepaper: 989.4 dense)
    (r"\bH200\b", (9, 0), 989.4e12),  # H200 SXM: 1,979 with sparsity (H200 datasheet; the H100 SXM's GH100)
    (r"\bA100\b", (8, 0), 312e12),  # A100 40 GB / 80 GB, PCIe and SXM: 312 | 624* (A100 datasheet)
    (r"\bL40S\b", (8, 9), 362.05e12),  # L40S: 362.05 | 733* (L40S datasheet)
    (r"\bL40\b", (8, 9), 181.05e12),  # L40: 181.05 | 362.1* (L40 datasheet)
    (r"\bL4\b", (8, 9), 121e12),  # L4: 242* (L4 datasheet)
    (r"\bA10\b", (8, 6), 125e12),  # A10: 125 | 250* (A10 datasheet); the A10G (AWS) is not an A10
)


def _sum_prefix_squares(prefix_lens: torch.Tensor | Sequence[int] | None, batch: int, n: int) -> float:
    """``sum_b M_b^2`` of the drawn prefixes, or its expectation for M uniform in ``{1, ..., N-1}``."""
    if prefix_lens is None:
        return batch * n * (2 * n - 1) / 6  # E[M^2] = sum_{m=1}^{N-1} m^2 / (N-1) = N (2N - 1) / 6
    values = [int(m) for m in (prefix_lens.tolist() if isinstance(prefix_lens, torch.Tensor) else prefix_lens)]
    if len(values) != batch:
        raise ValueError(f"prefix_lens must hold {batch} values (one per sample), got {len(values)}")
    if any(not 0 <= m <= n for m in values):
        raise ValueError(f"prefix_lens values must be in [0, {n}], got {values}")
    return float(sum(m * m for m in values))


def model_flops_breakdown(cfg: AIMv2Config, batch: int, prefix_lens: torch.Tensor | Sequence[int] | None = None, *,
                          attention: str = "visible") -> dict[str, float]:
    """Forward matmul FLOPs (2 per multiply-add) of one batch, per part of the model.

    Parts: ``patch_embed`` (the conv as a ``(B*N, C*p*p) @ (C*p*p, D)`` matmul), ``encoder_linear`` (per block
    qkv ``D x 3D``, proj ``D x D`` and the SwiGLU's fc1, fc3 ``D x F`` and fc2 ``F x D`` over B*N tokens),
    ``encoder_attention``, ``image_proj`` (``D_enc x D_dec`` over B*N tokens), ``decoder_linear`` (the same per
    block over ``S = N + 1 + T`` tokens), ``decoder_attention``, ``pixel_head`` (``D_dec x C*p*p`` over the
    ``N - 1`` predicting positions) and ``text_head`` (``D_dec x V`` over the T caption positions).
    Norms, softmax, element-wise ops and the optimizer are not counted.

    Attention (both matmuls, ``QK^T`` and ``PV``), with ``D`` the model width (heads x head dim):
    ``attention="visible"`` counts the visible (query, key) pairs, as the op benchmarks' accounting
    (bench/README.md) does: prefix-causal encoder ``2 D sum_b (N^2 + M_b^2)`` per block, causal decoder
    ``2 B S^2 D`` (half of full); ``attention="dense"`` counts every pair, ``4 B S^2 D`` per block, which is
    what the reference backend computes (dense scores, then a mask).

    Args:
        cfg: the model's config.
        batch: images per step.
        prefix_lens: the encoder's per-sample prefix lengths (``(B,)`` ints in ``[0, N]``), or None for the
            expectation over AIMv2's draw, uniform in ``{1, ..., N-1}``.
        attention: ``"visible"`` or ``"dense"``.

    Returns:
        FLOPs (not FLOP/s) of one forward pass over ``batch`` images, keyed by part; the values sum to the
        forward total.
    """
    if attention not in ("visible", "dense"):
        raise ValueError(f"attention must be 'visible' or 'dense', got {attention!r}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    enc, dec = cfg.encoder, cfg.decoder
    n, t, patch = enc.num_patches, dec.context_length, enc.patch_dim
    s = n + 1 + t

    def linears(tokens: int, dim: int, hidden: int, depth: int) -> int:
        return depth * 2 * tokens * (3 * dim * dim + dim * dim + 3 * dim * hidden)

    if attention == "visible":
        enc_attn = enc.depth * 2 * enc.dim * (batch * n * n + _sum_prefix_squares(prefix_lens, batch, n))
        dec_attn = dec.depth * 2 * batch * s * s * dec.dim
    else:
        if prefix_lens is not None:
            _sum_prefix_squares(prefix_lens, batch, n)  # the same argument checks
        enc_attn = enc.depth * 4 * batch * n * n * enc.dim
        dec_attn = dec.depth * 4 * batch * s * s * dec.dim
    return {
        "patch_embed": 2 * batch * n * patch * enc.dim,
        "encoder_linear": linears(batch * n, enc.dim, enc.mlp_hidden, enc.depth),
        "encoder_attention": enc_attn,
        "image_proj": 2 * batch * n * enc.dim * dec.dim,
        "decoder_linear": linears(batch * s, dec.dim, dec.mlp_hidden, dec.depth),
        "decoder_attention": dec_attn,
        "pixel_head": 2 * batch * (n - 1) * dec.dim * patch,
        "text_head": 2 * batch * t * dec.dim * dec.vocab_size,
    }


def model_flops_per_step(cfg: AIMv2Config, batch: int, prefix_lens: torch.Tensor | Sequence[int] | None = None, *,
                         attention: str = "visible") -> float:
    """Model FLOPs of one training step (forward + backward), for MFU.

    Every matmul costs 3x its forward (the forward, the gradient of its input, the gradient of its weight),
    except the patch embedding, 2x: nothing needs the gradient of the images. These are model FLOPs: an
    attention kernel that recomputes the scores in its backward (bench/README.md counts that backward as 2.5x
    the forward) does more work than this counts, and masked-out score blocks that a dense kernel computes
    anyway are not counted with ``attention="visible"``. Arguments as :func:`model_flops_breakdown`.

    Returns:
        FLOPs (not FLOP/s) of one optimizer step over ``batch`` images (all of them: divide by the number of
        devices for one device's share).
    """
    parts = model_flops_breakdown(cfg, batch, prefix_lens, attention=attention)
    return 2 * parts["patch_embed"] + 3 * sum(v for k, v in parts.items() if k != "patch_embed")


def _check_number(name: str, value: object, *, positive: bool) -> float:
    """``value`` as a float, or a ValueError naming ``name`` when it is not a finite real number that is
    positive (``positive``) or non-negative."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, got {value!r}")
    return x


def _peak_from_env() -> float | None:
    text = os.environ.get(PEAK_ENV)
    if text is None or not text.strip():
        return None
    try:
        tflops = float(text)
    except ValueError:
        raise ValueError(f"{PEAK_ENV} must be the device's peak in TFLOP/s (a positive number), "
                         f"got {text!r}") from None
    if not math.isfinite(tflops) or tflops <= 0:
        raise ValueError(f"{PEAK_ENV} must be the device's peak in TFLOP/s (a finite positive number), got {text!r}")
    return tflops * 1e12


def peak_flops(device: torch.device | str) -> float | None:
    """The dense bf16 Tensor Core peak of ``device`` in FLOP/s, or None where it is not known.

    ``AIMV2_PEAK_TFLOPS`` (in TFLOP/s, e.g. ``989.4``), when set, is the answer for every device, the CPU
    included (a ValueError naming it when it is not a finite positive number). Otherwise a CUDA device whose
    ``torch.cuda.get_device_name`` and compute capability match a GPU of the table gives its datasheet peak
    (H100 SXM and H200 989.4e12, H100 PCIe 756e12, A100 312e12, L40S 362.05e12, L40 181.05e12, L4 121e12,
    A10 125e12); the CPU, other device types, an unknown GPU, a name whose capability does not match, and a
    MIG slice (a fraction of the GPU) give None.
    """
    override = _peak_from_env()
    if override is not None:
        return override
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    if re.search(r"\bMIG\b", name):
        return None  # a MIG instance has a fraction of the SMs
    capability = tuple(torch.cuda.get_device_capability(device))
    for pattern, cap, peak in _PEAKS:
        if re.search(pattern, name):
            return peak if capability == cap else None
    return None


def mfu(flops_per_step: float, step_seconds: float, device: torch.device | str) -> float | None:
    """Model FLOPs utilisation: ``flops_per_step / step_seconds / peak_flops(device)``, a fraction (0.4 = 40%).

    Args:
        flops_per_step: model FLOPs (not FLOP/s) that this device computes in one step, e.g.
            :func:`model_flops_per_step` for its own batch (the global count divided by the number of devices).
        step_seconds: wall time of one step in seconds.
        device: the device that ran it.

    Returns:
        The fraction, or None where the device's peak is unknown (the CPU, an unknown GPU: see
        :func:`peak_flops`). A ValueError names an argument that is negative, zero (``step_seconds``) or not
        finite.
    """
    flops = _check_number("flops_per_step", flops_per_step, positive=False)
    seconds = _check_number("step_seconds", step_seconds, positive=True)
    peak = peak_flops(device)
    return None if peak is None else flops / seconds / peak
