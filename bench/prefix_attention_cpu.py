"""CPU benchmark of ``prefix_attention(backend="cpu")`` against SDPA with a dense boolean mask and the reference.

Usage: ``python bench/prefix_attention_cpu.py [--batch 4 --heads 8 --seq 1024 --head-dim 64 --dtype float32]
[--prefix random|causal] [--providers cpu,sdpa-dense-mask,reference] [--modes fwd,fwd+bwd] [--runs 7]
[--out bench/results | --no-write]``.

The issue's target, at B=4, H=8, S=1024, D=64, fp32, random prefixes, forward+backward: backend "cpu" no slower
than ``F.scaled_dot_product_attention`` with a dense boolean prefix mask on the same tensors, and no more peak
memory. (``bench/cpu_check.py --op prefix_attention`` checks that target alongside the other ops; this script
adds the forward alone, other shapes, dtypes and plain causal masks.) It prints a markdown table and the
verdict, and writes ``OUT/cpu-<date>-prefix_attention.{json,md}`` (default OUT: bench/results).

Timing: the setups of ``bench/ops.py`` (same tensors, same random prefixes in [1, S-1], the loss
``out.float().sum()`` and its backward). Every provider is warmed up once, then the providers take turns, one
call each per round, for ``--runs`` rounds (``harness.time_interleaved``): on a machine shared with other jobs,
a burst of load then hits all of them rather than one. Median and 20th/80th percentiles per provider. The load
averages at the start and end are recorded with the results. GFLOP/s counts the visible pairs only
(``2 D H sum_b (S^2 + M_b^2)`` forward, 2.5x that backward, DESIGN.md), for every provider.

Memory: a fresh subprocess per provider and mode (``harness.rss_peak_growth_mb``). After a warm-up call (thread
pools, .grad buffers), the peak resident memory of one call above what was resident before it. SDPA's dense
mask is built before the measurement starts, so it is not counted against SDPA; each call frees the previous
call's ``.grad`` before making new ones.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import ops  # noqa: E402

DEFAULT_PROVIDERS = ("cpu", "sdpa-dense-mask", "reference")
MODES = ("fwd", "bwd", "fwd+bwd")
RESULTS = Path(__file__).resolve().parent / "results"

# The value checks of prefix_lens (a host read per call) are skipped, as in every benchmark.
os.environ.setdefault("AIMV2_CHECK_VALUES", "0")


def _config_args(args) -> list[str]:
    return ["--batch", str(args.batch), "--heads", str(args.heads), "--seq", str(args.seq), "--head-dim",
            str(args.head_dim), "--dtype", args.dtype, "--prefix", args.prefix, "--threads", str(args.threads)]


def _config(args) -> ops.AttentionConfig:
    return ops.AttentionConfig(args.batch, args.heads, args.seq, args.head_dim, getattr(torch, args.dtype),
                               args.prefix)


def _memory_child(cfg: ops.AttentionConfig, provider: str, mode: str) -> dict:
    """Run in the subprocess: peak resident-memory growth (MB) of one call."""
    fn = ops.attention_setup(cfg, provider, mode, torch.device("cpu"))
    return {"peak_mb": harness.rss_peak_growth_mb(fn)}  # after a warm-up call


def measure_memory(args, provider: str, mode: str) -> float | None:
    env = {**os.environ, **harness.CPU_MEMORY_ENV}
    cmd = [sys.executable, __file__, "--memory-child", provider, mode, *_config_args(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(f"memory of {provider} {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def verdict(results: list[harness.Result]) -> str:
    """The issue's target: cpu against sdpa-dense-mask in fwd+bwd (time <= 1.0x, memory <= 1.0x)."""
    by = {(r.provider, r.mode): r for r in results if r.error is None}
    ours, sdpa = by.get(("cpu", "fwd+bwd")), by.get(("sdpa-dense-mask", "fwd+bwd"))
    if ours is None or sdpa is None:
        return ""
    ratio = ours.median_ms / sdpa.median_ms
    lines = [f"target (fwd+bwd): time {ratio:.2f}x SDPA dense-mask's (<= 1.0x): {'met' if ratio <= 1 else 'MISSED'}"]
    if ours.peak_mem_mb is not None and sdpa.peak_mem_mb:
        mem = ours.peak_mem_mb / sdpa.peak_mem_mb
        lines.append(f"peak memory growth {ours.peak_mem_mb:.0f} MB = {mem:.2f}x SDPA dense-mask's "
                     f"{sdpa.peak_mem_mb:.0f} MB (<= 1.0x): {'met' if mem <= 1 else 'MISSED'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--prefix", default="random", choices=("random", "causal"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                        help="comma-separated; also reference-compiled, flex-attention")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help=f"comma-separated among {MODES}")
    parser.add_argument("--runs", type=int, default=7, help="timed rounds after the warm-up (>= 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where cpu-<date>-prefix_attention.{json,md} go (default bench/results)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--memory-child", nargs=2, metavar=("PROVIDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = _config(args)
    if args.memory_child:
        print(json.dumps(_memory_child(cfg, *args.memory_child)))
        return
    if args.runs < 5:
        parser.error("--runs must be at least 5")

    device = torch.device("cpu")
    load_start = [round(x, 2) for x in os.getloadavg()]
    fwd_flops = cfg.fwd_flops(cfg.prefix_lens(device))
    flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
    config = f"{cfg.name} {args.dtype}"
    results = []
    for mode in args.modes.split(","):
        fns = {}
        for provider in filter(None, args.providers.split(",")):
            try:
                fns[provider] = ops.attention_setup(cfg, provider, mode, device)
            except Exception as exc:  # a missing peer: recorded in the table
                results.append(harness.Result("prefix_attention", config, provider, mode,
                                              error=f"{type(exc).__name__}: {str(exc)[:160]}"))
        for provider, samples in harness.time_interleaved(fns, args.runs).items():
            result = harness.summarize("prefix_attention", config, provider, mode, samples)
            result.derived = {"GFLOP/s": round(flops[mode] / result.median_ms / 1e6, 2)}
            results.append(result)
        del fns
        gc.collect()
        if not args.no_memory:
            for result in results:
                if result.mode == mode and result.error is None:
                    result.peak_mem_mb = measure_memory(args, result.provider, mode)
        for result in results:
            if result.mode == mode and result.error is None:
                print(f"{mode:8s} {result.provider:20s} {result.median_ms:9.1f} ms  peak "
                      f"{result.peak_mem_mb if result.peak_mem_mb is not None else float('nan'):7.1f} MB",
                      file=sys.stderr)
    env = harness.environment(device)
    load_end = [round(x, 2) for x in os.getloadavg()]
    env.update(cpus=os.cpu_count(), runs=args.runs, loadavg_start=load_start, loadavg_end=load_end)
    title = (f"prefix_attention on the CPU ({env['threads']} threads on {env['cpus']} CPUs; median of {args.runs} "
             f"interleaved rounds; 1-min load average {load_start[0]} at the start, {load_end[0]} at the end, on a "
             "machine shared with other jobs)")
    text = harness.to_markdown(results, env, title) + "\n" + verdict(results) + "\n"
    print(text)
    if not args.no_write:
        stem = f"cpu-{env['date']}-prefix_attention"
        for path in harness.write(results, env, args.out, stem, title):
            print(f"wrote {path}", file=sys.stderr)
        (args.out / f"{stem}.md").write_text(text)


if __name__ == "__main__":
    main()
