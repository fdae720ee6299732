"""Comparison helpers shared by the emulator's runners (run_patch_mse.py, run_cross_entropy.py)."""
from __future__ import annotations

import ctypes

import torch

from aimv2_kernels.testing import assert_within_budget, error_budget, max_abs_err


def ptr(t):
    """A tensor's data pointer for ctypes (NULL for None)."""
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def budget(actual, reference, oracle, k, name):
    """assert_within_budget; returns the fraction of the budget used."""
    assert_within_budget(actual, reference, oracle, k=k, name=name)
    return max_abs_err(actual, oracle) / error_budget(reference, oracle, k=k)


def ulps(got, ref, dtype):
    """max |got - ref| in ulps of `dtype` at max(|ref|, 1% of the row's max |ref|) (rows: last dimension)."""
    ref = ref.double()
    mag = torch.maximum(ref.abs(), 0.01 * ref.abs().amax(-1, keepdim=True))
    fi = torch.finfo(dtype)
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    ulp = torch.exp2(torch.floor(torch.log2(mag.clamp_min(fi.tiny))) - mant)  # subnormal spacing below tiny
    return ((got.double() - ref).abs() / ulp).max().item()
