"""The compiled CPU kernels against their targets (issue 4), side by side with the references and the peers.

Usage: ``python bench/cpu_check.py [--op patch_mse_loss|linear_cross_entropy|prefix_attention] [--runs 7]
[--no-memory] [--out bench/results]``. Writes ``cpu-<date>-<op>.json`` and ``.md`` to ``--out`` when given.

Targets, each forward+backward on this project's 2-core machines:
- ``patch_mse_loss(backend="cpu")``, B=32, 224x224x3 fp32: at least 3x faster than the eager reference
  (patchify, normalize and MSE in plain PyTorch).
- ``linear_cross_entropy(backend="cpu")``, N=4096, D=512, V=32000 fp32: time at most 1.0x the reference's,
  peak resident-memory growth at most 15% of the reference's, and no slower than cut-cross-entropy's
  ``impl="torch_compile"`` (when installed: ``pip install cut-cross-entropy``).
- ``prefix_attention(backend="cpu")``, B=4, H=8, S=1024, D=64 fp32, random prefixes: no slower than
  ``F.scaled_dot_product_attention`` with a dense boolean prefix mask on the same tensors, and no more peak
  memory.

Timing: every provider warmed up once, then the providers take turns, one call each per round, for ``--runs``
rounds (median and 20th/80th percentiles). Memory: a fresh subprocess per provider, the growth of the peak
resident size over one call after a warm-up (``harness.rss_peak_growth_mb``).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("AIMV2_CHECK_VALUES", "0")

import bench_linear_cross_entropy as lce
import bench_patch_mse_loss as pm
import bench_prefix_attention as pa
import harness

CPU = torch.device("cpu")
MODE = "fwd+bwd"


@dataclass
class Target:
    op: str
    config: object
    setup: Callable  # (config, provider, mode, device) -> callable
    providers: tuple[str, ...]
    peers: dict[str, str]  # provider -> module that must be importable
    verdict: Callable[[dict], list[str]]  # {provider: Result} -> lines "target: figure (goal) ok/MISSED"


def _ratio_line(what: str, value: float, goal: str, ok: bool) -> str:
    return f"{what}: {value:.2f} ({goal}) {'ok' if ok else 'MISSED'}"


def _patch_verdict(r: dict) -> list[str]:
    ours, ref = r.get("cpu"), r.get("reference")
    if not (ours and ref and ours.median_ms and ref.median_ms):
        return []
    speedup = ref.median_ms / ours.median_ms
    return [_ratio_line("speed-up of cpu over the eager reference", speedup, ">= 3x", speedup >= 3.0)]


def _against(ours, other, name: str, max_time: float, max_memory: float | None) -> list[str]:
    """Lines for ours/other time (goal <= max_time) and peak memory (goal <= max_memory, when given)."""
    if not (ours and other and ours.median_ms and other.median_ms):
        return []
    t = ours.median_ms / other.median_ms
    lines = [_ratio_line(f"time of cpu / {name}", t, f"<= {max_time}x", t <= max_time)]
    if max_memory is not None and ours.peak_mem_mb is not None and other.peak_mem_mb:
        m = ours.peak_mem_mb / other.peak_mem_mb
        lines.append(_ratio_line(f"peak memory of cpu / {name}", m, f"<= {max_memory}", m <= max_memory))
    return lines


def _lce_verdict(r: dict) -> list[str]:
    return (_against(r.get("cpu"), r.get("reference"), "reference", 1.0, 0.15)
            + _against(r.get("cpu"), r.get("cce-torch_compile"), "cut-cross-entropy torch_compile", 1.0, None))


def _attention_verdict(r: dict) -> list[str]:
    return _against(r.get("cpu"), r.get("sdpa-dense-mask"), "SDPA with a dense mask", 1.0, 1.0)


TARGETS = {
    "patch_mse_loss": Target("patch_mse_loss", pm.Config(32, 224, dtype=torch.float32), pm.setup,
                             ("cpu", "reference", "reference-compiled"), {}, _patch_verdict),
    "linear_cross_entropy": Target(
        "linear_cross_entropy", lce.Config(4096, 512, 32000, torch.float32), lce.setup,
        ("cpu", "reference", "reference-compiled", "cce-torch_compile"),
        {"cce-torch_compile": "cut_cross_entropy"}, _lce_verdict),
    "prefix_attention": Target(
        "prefix_attention", pa.Config(4, 8, 1024, 64, torch.float32), pa.setup,
        ("cpu", "reference", "sdpa-dense-mask"), {}, _attention_verdict),
}


def _derived(target: Target, median_ms: float) -> dict:
    cfg = target.config
    if target.op == "patch_mse_loss":
        return {"GB/s": round(cfg.min_bytes() / median_ms / 1e6, 2)}
    if target.op == "linear_cross_entropy":
        return {"GFLOP/s": round(cfg.flops(MODE) / median_ms / 1e6, 2)}
    return {"GFLOP/s": round(3.5 * cfg.fwd_flops() / median_ms / 1e6, 2)}  # backward = 2.5x forward


def memory_in_subprocess(op: str, provider: str) -> float | None:
    cmd = [sys.executable, __file__, "--memory-child", op, provider]
    env = {**os.environ, **harness.CPU_MEMORY_ENV}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        print(f"memory of {op} {provider} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def run_target(target: Target, runs: int, memory: bool) -> tuple[list[harness.Result], list[str]]:
    results, fns = [], {}
    for provider in target.providers:
        module = target.peers.get(provider)
        if module and importlib.util.find_spec(module) is None:
            results.append(harness.Result(target.op, target.config.name, provider, MODE,
                                          error=f"{module} is not installed"))
            continue
        fns[provider] = target.setup(target.config, provider, MODE, CPU)
    by_provider = {}
    for provider, samples in harness.time_interleaved(fns, runs).items():
        result = harness.summarize(target.op, target.config.name, provider, MODE, samples)
        result.derived = _derived(target, result.median_ms)
        by_provider[provider] = result
    del fns
    gc.collect()
    for provider, result in by_provider.items():
        if memory:
            result.peak_mem_mb = memory_in_subprocess(target.op, provider)
        print(f"{target.op:22s} {provider:20s} {result.median_ms:10.1f} ms  peak "
              f"{result.peak_mem_mb if result.peak_mem_mb is not None else float('nan'):8.1f} MB", file=sys.stderr)
        results.append(result)
    return results, target.verdict(by_provider)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", action="append", choices=sorted(TARGETS), help="repeatable; default: all three")
    ap.add_argument("--runs", type=int, default=7, help="timed rounds after the warm-up (at least 5)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", type=Path, help="write cpu-<date>-<op>.{json,md} into this folder")
    ap.add_argument("--memory-child", nargs=2, metavar=("OP", "PROVIDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        target = TARGETS[args.memory_child[0]]
        fn = target.setup(target.config, args.memory_child[1], MODE, CPU)
        print(json.dumps({"peak_mb": harness.rss_peak_growth_mb(fn)}))
        return 0
    if args.runs < 5:
        ap.error("--runs must be at least 5")
    from aimv2_kernels._backend import extension_available
    if not extension_available():
        print("aimv2_kernels._C is not built: pip install --no-build-isolation -e .", file=sys.stderr)
        return 1
    env = harness.environment(CPU)
    for name in args.op or sorted(TARGETS):
        target = TARGETS[name]
        results, verdict = run_target(target, args.runs, not args.no_memory)
        title = (f"{name} on the CPU, forward+backward ({env['threads']} threads; median of {args.runs} interleaved "
                 "rounds; the machine may be shared with other jobs)")
        text = harness.to_markdown(results, env, title) + "\n" + "\n".join(f"- {line}" for line in verdict) + "\n"
        print(text)
        if args.out is not None:
            for path in harness.write(results, env, args.out, f"cpu-{env['date']}-{name}", title):
                print(f"wrote {path}", file=sys.stderr)
            (args.out / f"cpu-{env['date']}-{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
