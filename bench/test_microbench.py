"""CPU microbenchmarks through pytest-benchmark: ``pytest bench/ --benchmark-only``.

One benchmark per (op, provider, mode) on each op's ``MICRO`` shape, grouped per op and mode, so that our
backend, the eager reference, the reference under ``torch.compile`` and the peers that run on a CPU sit in one
table. The first call (compiles, thread pools) is made before timing. A provider that cannot run here is skipped
with its reason (flash-attn, liger, apex and FlexAttention's missing CPU backward).
"""
from __future__ import annotations

import os

import bench_cross_entropy
import bench_linear_cross_entropy
import bench_patch_mse_loss
import bench_prefix_attention
import harness
import pytest
import torch

CPU = torch.device("cpu")
QUICK = os.environ.get("AIMV2_BENCH_QUICK") == "1"
MODULES = (bench_patch_mse_loss, bench_prefix_attention, bench_linear_cross_entropy, bench_cross_entropy)
CASES = [pytest.param(m, provider, mode, id=f"{m.OP}-{provider}-{mode}")
         for m in MODULES for provider in m.providers(CPU) for mode in harness.MODES]


@pytest.mark.parametrize("module, provider, mode", CASES)
def test_microbench(benchmark, module, provider, mode):
    why = module.providers(CPU)[provider]
    if why is not None:
        pytest.skip(why)
    config = module.configs(CPU, quick=True)[0] if QUICK else module.MICRO
    fn = module.setup(config, provider, mode, CPU)
    fn()
    benchmark.group = f"{module.OP}: {config.name}, {mode}"
    benchmark.extra_info.update(config=config.name, provider=provider, mode=mode)
    benchmark(fn)
