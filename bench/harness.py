"""Shared benchmark harness: timing (median and 20th/80th percentiles), peak memory, environment record.

GPU timing uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); CPU timing is wall time
after a warm-up. Every result row records what was timed, on which device, with which versions, and when.
"""
from __future__ import annotations

import datetime
import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Result:
    op: str
    config: str
    provider: str
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mem_mb: float | None = None
    derived: dict = field(default_factory=dict)  # e.g. {"TFLOP/s": ..., "GB/s": ...}
    error: str | None = None  # why a provider could not run (missing peer, out of memory, ...)


def environment(device: torch.device) -> dict:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = platform.processor() or "cpu"
        info["threads"] = torch.get_num_threads()
    return info


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            min_runs: int = 5) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start) * 1e3 < rep_ms:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 200:
            break
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def time_interleaved(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """CPU timing of several callables side by side: one warm-up call each, then ``runs`` rounds of one call per
    callable, in milliseconds. On a machine shared with other jobs a burst of load then hits every provider
    rather than one."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summarize(op: str, config: str, provider: str, mode: str, samples: list[float]) -> Result:
    """A Result with the median and 20th/80th percentiles of ``samples`` (milliseconds)."""
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else [samples[0]] * 9
    return Result(op=op, config=config, provider=provider, mode=mode, median_ms=statistics.median(samples),
                  p20_ms=q[1], p80_ms=q[7])


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def rss_peak_growth_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory of one call of ``fn`` above what was resident before it (Linux, CPU).

    Meant for a fresh subprocess per provider (see ``CPU_MEMORY_ENV``): after a warm-up call (thread pools,
    compiled graphs, .grad buffers), ``VmHWM`` is reset to the current resident size through
    ``/proc/self/clear_refs`` and read back after the call.
    """
    fn()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


# glibc returns every block above 128 KiB to the system on free, so that the resident size follows live memory.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated memory during one call, above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure(op: str, config: str, provider: str, mode: str, fn_factory: Callable[[], Callable[[], object]],
            device: torch.device, derive: Callable[[float], dict] | None = None, **timing) -> Result:
    """Build the callable, time it and measure its memory; a failure is recorded, not raised."""
    result = Result(op=op, config=config, provider=provider, mode=mode)
    try:
        fn = fn_factory()
        result.median_ms, result.p20_ms, result.p80_ms = time_fn(fn, device, **timing)
        result.peak_mem_mb = peak_memory_mb(fn, device)
        if derive is not None:
            result.derived = {k: round(v, 2) for k, v in derive(result.median_ms).items()}
    except Exception as exc:  # a missing peer, an OOM, an unsupported shape: recorded in the table
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def to_markdown(results: list[Result], env: dict, title: str) -> str:
    lines = [f"# {title}", "", f"{env.get('device_name')} · torch {env.get('torch')} · triton {env.get('triton')} · "
             f"{env.get('date')}", ""]
    by_op: dict[str, list[Result]] = {}
    for r in results:
        by_op.setdefault(r.op, []).append(r)
    for op, rows in by_op.items():
        derived_keys = sorted({k for r in rows for k in r.derived})
        lines += [f"## {op}", "", "| config | mode | provider | median ms | p20 | p80 | peak MB | "
                  + " | ".join(derived_keys) + (" |" if derived_keys else "") + " note |",
                  "|" + "---|" * (8 + len(derived_keys))]
        for r in rows:
            cells = [r.config, r.mode, r.provider] + [
                "" if v is None else f"{v:.3f}" for v in (r.median_ms, r.p20_ms, r.p80_ms)] + [
                "" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}"] + [
                str(r.derived.get(k, "")) for k in derived_keys] + [r.error or ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write(results: list[Result], env: dict, out_dir: Path, stem: str, title: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=2))
    md_path.write_text(to_markdown(results, env, title))
    return json_path, md_path
