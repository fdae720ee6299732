"""CPU benchmark of ``linear_cross_entropy(backend="cpu")`` against the reference and cut-cross-entropy.

Usage: ``python bench/linear_cross_entropy_cpu.py [--tokens 4096 --dim 512 --vocab 32000 --dtype float32]
[--providers cpu,reference,reference-compiled,cce-torch_compile] [--modes fwd+bwd] [--runs 7] [--out DIR]``.

The issue's target, at N=4096 tokens, D=512, V=32000, fp32, forward+backward with "mean": peak resident-memory
growth at most 15% of the reference's, and time at most 1.0x the reference's.

Timing: the setups of ``bench/ops.py`` (same tensors, loss and backward; ``cce-torch_compile`` is
cut-cross-entropy's ``linear_cross_entropy(..., impl="torch_compile")``, skipped when ``cut_cross_entropy`` is not
importable). Every provider is warmed up once, then the providers take turns, one call each per round, for
``--runs`` rounds: on a machine shared with other jobs, a burst of load then hits all of them rather than one.
Median and 20th/80th percentiles per provider; GFLOP/s from ``6 N D V`` (forward and backward, DESIGN.md).

Memory: a fresh subprocess per provider and mode. After a warm-up call (thread pools, compiled graphs, .grad
buffers), the peak resident memory of one call above what was resident before it, read from ``VmHWM`` in
``/proc/self/status`` after resetting it (``/proc/self/clear_refs``), with glibc told to return every large block
to the system on free so that the resident size follows live memory. The reference's peak is dominated by its
(N, V) fp32 tensors (logits, log-softmax, their gradients: 500 MiB each at the default size).

``--chunks 262,524`` adds backend "cpu" at other chunk sizes (rows) to the same rounds; the default chunk and
the measurements behind it are noted at ``aimv2_kernels.compiled.linear_cross_entropy.CHUNK_ELEMENTS``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import ops  # noqa: E402
from aimv2_kernels import _backend  # noqa: E402

DEFAULT_PROVIDERS = ("cpu", "reference", "reference-compiled", "cce-torch_compile")
MODES = ("fwd", "bwd", "fwd+bwd")


def cce_available() -> bool:
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def setup(cfg: ops.LinearCEConfig, provider: str, mode: str, chunk: int | None = None):
    """A callable running one step of ``provider`` in ``mode`` (see ``bench/ops.py``)."""
    device = torch.device("cpu")
    if provider == "cce-torch_compile":
        if not cce_available():
            raise ImportError("cut_cross_entropy is not installed")
        from cut_cross_entropy import linear_cross_entropy as cce

        hidden = torch.randn(cfg.tokens, cfg.dim, dtype=cfg.dtype, requires_grad=True)
        weight = (torch.randn(cfg.vocab, cfg.dim) / cfg.dim ** 0.5).to(cfg.dtype).requires_grad_()
        targets = torch.randint(0, cfg.vocab, (cfg.tokens,))
        return ops._step(lambda: cce(hidden, weight, targets, impl="torch_compile"), [hidden, weight], mode)
    if provider == "cpu" and chunk is not None:
        from aimv2_kernels.compiled.linear_cross_entropy import linear_cross_entropy_compiled

        hidden = torch.randn(cfg.tokens, cfg.dim, dtype=cfg.dtype, requires_grad=True)
        weight = (torch.randn(cfg.vocab, cfg.dim) / cfg.dim ** 0.5).to(cfg.dtype).requires_grad_()
        targets = torch.randint(0, cfg.vocab, (cfg.tokens,))
        loss = lambda: linear_cross_entropy_compiled(hidden, weight, targets, chunk_size=chunk)  # noqa: E731
        return ops._step(loss, [hidden, weight], mode)
    return ops.linear_ce_setup(cfg, provider, mode, device)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(cfg: ops.LinearCEConfig, provider: str, mode: str, chunk: int | None) -> dict:
    """Run in the subprocess: peak resident memory (MB) of one call above what was resident before it."""
    fn = setup(cfg, provider, mode, chunk)
    fn()  # warm-up: thread pools, compiled graphs, .grad buffers
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident size
        f.write("5")
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return {"peak_mb": (peak - before) / 1024}


def measure_memory(args, provider: str, mode: str, chunk: int | None = None) -> float | None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--memory-child", provider, mode, *_config_args(args)]
    if chunk is not None:
        cmd += ["--chunk", str(chunk)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        print(f"memory of {provider} {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def time_interleaved(fns: dict, runs: int) -> dict[str, list[float]]:
    """One warm-up call each, then ``runs`` rounds of one call per callable; milliseconds per callable."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _config_args(args) -> list[str]:
    return ["--tokens", str(args.tokens), "--dim", str(args.dim), "--vocab", str(args.vocab), "--dtype", args.dtype,
            "--threads", str(args.threads)]


def _config(args) -> ops.LinearCEConfig:
    return ops.LinearCEConfig(args.tokens, args.dim, args.vocab, getattr(torch, args.dtype))


def _result(cfg, name: str, provider: str, mode: str, samples: list[float]) -> harness.Result:
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else [samples[0]] * 9
    median = statistics.median(samples)
    return harness.Result(op="linear_cross_entropy", config=name, provider=provider, mode=mode, median_ms=median,
                          p20_ms=q[1], p80_ms=q[7], derived={"GFLOP/s": round(cfg.flops(mode) / median / 1e6, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help="comma-separated")
    parser.add_argument("--modes", default="fwd+bwd", help=f"comma-separated among {MODES}")
    parser.add_argument("--runs", type=int, default=7, help="timed rounds after the warm-up (>= 5)")
    parser.add_argument("--chunks", default="", help="also time backend 'cpu' with these chunk sizes (rows)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, help="also write linear_cross_entropy_cpu.{json,md} there")
    parser.add_argument("--memory-child", nargs=2, metavar=("PROVIDER", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = _config(args)
    if args.memory_child:
        print(json.dumps(_memory_child(cfg, *args.memory_child, args.chunk)))
        return

    providers = [p for p in args.providers.split(",") if p]
    chunks = [int(c) for c in args.chunks.split(",") if c]
    skipped = {p: "cut_cross_entropy is not installed" for p in providers
               if p == "cce-torch_compile" and not cce_available()}
    results = []
    for mode in args.modes.split(","):
        fns, labels = {}, {}
        for provider in providers:
            if provider in skipped:
                results.append(harness.Result("linear_cross_entropy", cfg.name, provider, mode,
                                              error=skipped[provider]))
                continue
            fns[provider], labels[provider] = setup(cfg, provider, mode), (provider, None)
        for chunk in chunks:
            name = f"cpu chunk={chunk}"
            fns[name], labels[name] = setup(cfg, "cpu", mode, chunk), ("cpu", chunk)
        for name, samples in time_interleaved(fns, args.runs).items():
            result = _result(cfg, cfg.name, name, mode, samples)
            if not args.no_memory:
                result.peak_mem_mb = measure_memory(args, *labels[name][:1], mode, labels[name][1])
            results.append(result)
            print(f"{mode:8s} {name:20s} {result.median_ms:9.1f} ms  peak "
                  f"{result.peak_mem_mb if result.peak_mem_mb is not None else float('nan'):7.1f} MB",
                  file=sys.stderr)
        del fns
        gc.collect()
    env = harness.environment(torch.device("cpu"))
    title = (f"linear_cross_entropy on the CPU ({env['threads']} threads; logits would take {cfg.logits_mb():.0f} MB; "
             "timings on a machine that may be shared with other jobs)")
    print(harness.to_markdown(results, env, title))
    print(_verdict(results))
    if args.out is not None:
        for path in harness.write(results, env, args.out, "linear_cross_entropy_cpu", title):
            print(f"wrote {path}", file=sys.stderr)


def _verdict(results: list[harness.Result]) -> str:
    """The issue's target: cpu against the reference in fwd+bwd (memory <= 15%, time <= 1.0x)."""
    by = {(r.provider, r.mode): r for r in results if r.error is None}
    ours, ref = by.get(("cpu", "fwd+bwd")), by.get(("reference", "fwd+bwd"))
    if ours is None or ref is None:
        return ""
    lines = [f"target (fwd+bwd): time {ours.median_ms / ref.median_ms:.2f}x the reference's (<= 1.0x)"]
    if ours.peak_mem_mb is not None and ref.peak_mem_mb:
        lines.append(f"peak memory growth {ours.peak_mem_mb:.0f} MB = {100 * ours.peak_mem_mb / ref.peak_mem_mb:.1f}% "
                     f"of the reference's {ref.peak_mem_mb:.0f} MB (<= 15%)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
