"""Argument checks shared by the public ops. Every failure names the argument."""
from __future__ import annotations

import math
import os
from collections.abc import Collection

import torch

# float64 is accepted for the reference backend only (gradcheck and float64 oracles); kernels reject it.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _values_checkable() -> bool:
    """Whether to run the data-dependent checks (prefix_lens and targets ranges).

    They are skipped under torch.compile (they would break the graph) and when ``AIMV2_CHECK_VALUES=0``: on
    CUDA tensors each check is a host synchronisation, which benchmarks and long runs may turn off.
    """
    return not torch.compiler.is_compiling() and os.environ.get("AIMV2_CHECK_VALUES", "1") != "0"


def check_tensor(name: str, x: object, *, ndim: int | None = None, min_ndim: int | None = None,
                 dtypes: Collection[torch.dtype] | None = FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def check_integer(name: str, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")


def check_float(name: str, value: object, *, low: float, low_open: bool = False,
                high: float | None = None) -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` when ``low_open``): TypeError naming ``name``
    for a non-number (bools included), ValueError for NaN, infinities or a value out of range. Returns it as
    a float. Every backend gets the same checked value: the public ops call this before dispatch."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        f = float(value)
    except OverflowError:  # an int beyond the float range
        f = math.inf if value > 0 else -math.inf
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if (f <= low if low_open else f < low) or (high is not None and f > high):
        interval = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return f


def check_ignore_index(ignore_index: object) -> int:
    """An int (not a bool) representable in int64, the dtype every backend compares targets in."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 [{INT64_MIN}, {INT64_MAX}], got {ignore_index}")
    return int(ignore_index)


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_prefix_lens(prefix_lens: torch.Tensor | None, batch: int, upper: int, device: torch.device) -> None:
    """``prefix_lens`` is None or an integer tensor ``(batch,)`` with values in ``[0, upper]``."""
    if prefix_lens is None:
        return
    check_integer("prefix_lens", prefix_lens)
    if prefix_lens.shape != (batch,):
        raise ValueError(f"prefix_lens must have shape ({batch},), got {tuple(prefix_lens.shape)}")
    if prefix_lens.device != device:
        raise ValueError(f"prefix_lens is on {prefix_lens.device} but the inputs are on {device}")
    if _values_checkable() and batch > 0:
        lo, hi = int(prefix_lens.min()), int(prefix_lens.max())
        if lo < 0 or hi > upper:
            raise ValueError(f"prefix_lens must lie in [0, {upper}], got values in [{lo}, {hi}]")


def check_targets(targets: torch.Tensor, shape: torch.Size, num_classes: int, ignore_index: int,
                  device: torch.device) -> None:
    check_integer("targets", targets)
    if targets.shape != shape:
        raise ValueError(f"targets must have shape {tuple(shape)}, got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the inputs are on {device}")
    if _values_checkable() and targets.numel() > 0:
        # Compare values in int64, as the kernels do: in a narrower dtype ``ignore_index`` would wrap around
        # (uint8 targets: -100 is 156) and an out-of-range target could pass as ignored.
        targets = targets if targets.dtype == torch.int64 else targets.long()
        bad = ((targets < 0) | (targets >= num_classes)) & (targets != ignore_index)
        if bool(bad.any()):
            value = int(targets[bad][0])
            raise ValueError(f"targets must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, "
                             f"found {value}")
