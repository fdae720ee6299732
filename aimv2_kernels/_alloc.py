"""Output allocation for kernel launchers, with optional poisoning to catch unwritten elements."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def poison_enabled() -> bool:
    """True when ``AIMV2_POISON_OUTPUTS=1``: launchers fill fresh outputs with NaN (or -1 for integers)."""
    return os.environ.get("AIMV2_POISON_OUTPUTS", "0") == "1"


def new_output(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for launchers; NaN-filled (``-1`` for integer dtypes) under ``AIMV2_POISON_OUTPUTS=1``.

    Every launcher allocates the tensors its kernels write through this function, so the test suite (which
    sets the variable) catches any element a kernel forgets to write.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out
