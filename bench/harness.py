"""Shared benchmark harness: timing (median and 20th/80th percentiles), peak memory, environment record, and the
limit each shape allows.

GPU timing uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); CPU timing is wall time
after a warm-up. Every result row records what was timed, on which device, with which versions, and when.

Limits: each bench module's ``work(config, mode)`` gives the bytes that must move and the FLOPs that must be
done (and the dtype of those FLOPs); :func:`limit_ms` turns them into the best time the measured
:func:`ceilings` allow, ``max(bytes / copy bandwidth, FLOPs / matmul rate)``. A table's ``% of limit`` is
``100 * limit / median``.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
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
    size: float | None = None  # the x value of the config in a sweep (S, tokens, pixels), for plots
    series: str = ""  # configs of one sweep share a series; "" = not part of a plotted sweep
    bytes: int | None = None  # bytes that must move (the module's work(config, mode))
    flops: int | None = None  # FLOPs that must be done (0: memory-bound, FLOPs not counted)
    limit_ms: float | None = None  # the best time those allow on the measured ceilings; None without ceilings


# Our concrete backends and the baselines; every other provider is a peer (an installed library doing the same op).
# "triton-pointers": the Triton attention kernels with pointer loads on a Hopper GPU (bench_prefix_attention.py).
OURS = ("cpu", "triton", "triton-pointers", "cuda")
BASELINES = ("reference", "reference-compiled")
# The ceilings key of the matmul rate that bounds FLOPs done in each input dtype. Only bf16 is measured: a
# kernel on fp32 inputs runs fp32 (or TF32) matmuls at another rate, so a shape with FLOPs in another dtype gets
# no limit rather than a wrong one.
MATMUL_RATE_KEYS = {"bfloat16": "bf16_matmul_TFLOPs"}


def is_peer(provider: str) -> bool:
    """A provider that is neither ours nor a reference (eager or compiled): FlexAttention, SDPA, liger, ..."""
    return provider not in OURS and provider not in BASELINES and provider != "auto"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def limit_ms(work: dict, ceilings: dict | None) -> float | None:
    """``max(bytes / copy bandwidth, FLOPs / matmul rate)`` in milliseconds.

    ``work``: ``{"bytes": int, "flops": int, "dtype": str}`` (a bench module's ``work(config, mode)``);
    ``ceilings``: :func:`ceilings`' dict (``copy_GBps``, ``bf16_matmul_TFLOPs``). None when there is no measured
    copy bandwidth (a CPU run), or when the shape does FLOPs in a dtype whose matmul rate was not measured.
    """
    ceilings = ceilings or {}
    copy = ceilings.get("copy_GBps")
    if not copy:
        return None
    t = work["bytes"] / (copy * 1e9) * 1e3
    if work.get("flops"):
        rate = ceilings.get(MATMUL_RATE_KEYS.get(work.get("dtype", ""), ""))
        if not rate:
            return None
        t = max(t, work["flops"] / (rate * 1e12) * 1e3)
    return t


def pct_of_limit(result: Result) -> float | None:
    """``100 * limit / median``: how close the row is to the best time its shape allows."""
    if result.limit_ms is None or not result.median_ms:
        return None
    return 100 * result.limit_ms / result.median_ms


def best_peer_ms(results: list[Result]) -> dict[tuple[str, str, str], tuple[str, float]]:
    """(op, config, mode) -> (provider, median) of the fastest peer (:func:`is_peer`) measured there."""
    best: dict[tuple[str, str, str], tuple[str, float]] = {}
    for r in results:
        if is_peer(r.provider) and r.median_ms:
            key = (r.op, r.config, r.mode)
            if key not in best or r.median_ms < best[key][1]:
                best[key] = (r.provider, r.median_ms)
    return best


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else ``platform.processor()``, else "cpu"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


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
        info["device_name"] = cpu_model()
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


MODES = ("fwd", "bwd", "fwd+bwd")


def make_step(loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """The callable timed for ``mode``.

    fwd: the loss (no graph kept beyond the call); fwd+bwd: the loss and its backward; bwd: the backward of one
    graph built here, replayed with ``retain_graph=True``. A graph compiled by ``torch.compile`` donates its
    buffers to the backward by default, which forbids a replay, so the bwd graph is compiled afresh with
    donation off.
    """
    if mode == "fwd":
        return loss_fn
    if mode == "fwd+bwd":
        def run():
            for t in leaves:
                t.grad = None
            loss_fn().backward()
        return run
    if mode != "bwd":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    import torch._functorch.config as functorch_config

    no_donation = functorch_config.patch(donated_buffer=False, enable_autograd_cache=False)

    def run_bwd():
        for t in leaves:
            t.grad = None
        with no_donation:  # read at every compiled backward call, not only when compiling
            out.backward(retain_graph=True)

    # The compile caches do not key on donation: a graph cached by a fwd+bwd run would come back with it. A
    # dynamic-shape graph compiles its backward at the first backward call, so that call is made here too.
    with no_donation:
        torch._dynamo.reset()  # also recompiles what a peer compiled on its own (cut-cross-entropy's torch_compile)
        out = loss_fn()
    run_bwd()
    return run_bwd


def our_backends(op: str, device: torch.device) -> dict[str, str | None]:
    """Our concrete backends for ``op`` on ``device``: backend -> None when it is timed, else why not.

    Triton on a CPU runs only through its interpreter, which is a test device, not a fast path. ``"cuda"`` is left
    out when ``AIMV2_BENCH_CUDA=0`` (``bench/gpu_check.sh`` sets it when the CUDA kernels failed their tests in
    the same run: a faulting kernel would poison the process's CUDA context and every later measurement).
    """
    from aimv2_kernels import available_backends
    from aimv2_kernels._backend import KERNELS, triton_available

    out: dict[str, str | None] = {}
    if device.type == "cpu" and (op, "triton") in KERNELS and triton_available():
        out["triton"] = "Triton runs on a CPU only through its interpreter"
    for backend in available_backends(op, device):
        if backend == "reference" or backend in out:
            continue
        if backend == "cuda" and os.environ.get("AIMV2_BENCH_CUDA") == "0":
            out[backend] = "AIMV2_BENCH_CUDA=0: the CUDA kernels did not pass their tests in this run"
        else:
            out[backend] = None
    return out


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` on a fresh dynamo state: each (config, mode) compiles its own static-shape graph."""
    torch._dynamo.reset()
    return torch.compile(fn)


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
    return max(0.0, (_status_kb("VmHWM") - before) / 1024)  # a page touched between reset and read


# glibc returns every block above 128 KiB to the system on free, so that the resident size follows live memory.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def ceilings(device: torch.device) -> dict:
    """Measured copy GB/s (bytes read + written, 1 GiB) and bf16 matmul TFLOP/s (8192^3) on a CUDA device."""
    if device.type != "cuda":
        return {}
    def copy_ms() -> float:
        src = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return time_fn(lambda: dst.copy_(src), device)[0]

    def matmul_ms() -> float:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        return time_fn(lambda: a @ a, device)[0]

    copy_ms, mm_ms = copy_ms(), matmul_ms()  # each frees its tensors on return
    torch.cuda.empty_cache()
    return {"copy_GBps": 2 * 2**30 / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


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
            result.derived = {k: float(f"{v:.4g}") for k, v in derive(result.median_ms).items()}
    except Exception as exc:  # a missing peer, an OOM, an unsupported shape: recorded in the table
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def ceilings_line(ceilings: dict | None) -> str:
    """One line naming the ceilings that the limits of a table were computed from ("" without any)."""
    if not ceilings or not ceilings.get("copy_GBps"):
        return ""
    rate = ceilings.get("bf16_matmul_TFLOPs")
    return (f"Limit of a shape = max(bytes / {ceilings['copy_GBps']:.0f} GB/s copy bandwidth (bytes read + written)"
            + (f", bf16 FLOPs / {rate:.0f} TFLOP/s bf16 matmul rate" if rate else "") + "), "
            + "both measured in this run.")


LEGEND = ("median ms, p20, p80: median and 20th/80th percentiles of the time of one call; peak MB: see the notes "
          "under each table; x ref: the eager reference's median over the row's (above 1: faster); x best peer: "
          "the fastest installed peer's median over the row's (peers: every provider other than ours (cpu, triton, "
          "triton-pointers, cuda) and the references; reference-compiled is a baseline, not a peer); % of limit: 100 x "
          "the best time the shape's bytes and FLOPs allow on the measured ceilings, over the row's median (GPU only).")


def to_markdown(results: list[Result], env: dict, title: str, notes: dict[str, list[str]] | None = None) -> str:
    """Markdown: a header with the machine and versions, then one table per op.

    Rows are grouped per config and mode; ``x ref`` is the eager reference's median over the row's median in the
    same config and mode (above 1: faster than the reference), ``x best peer`` the fastest peer's median over the
    row's, and ``% of limit`` (only in a table where some row has a limit, i.e. a GPU run with measured ceilings)
    ``100 * limit / median``. ``notes`` adds lines under an op's table.
    """
    lines = [f"# {title}", "", f"{env.get('device_name')} · {env.get('device')}"
             + (f" · {env['threads']} threads" if env.get("threads") else "")
             + f" · torch {env.get('torch')} · triton {env.get('triton')} · {env.get('date')}", ""]
    limits = ceilings_line(env.get("ceilings"))
    lines += ([limits, ""] if limits else []) + [LEGEND, ""]
    by_op: dict[str, list[Result]] = {}
    for r in results:
        by_op.setdefault(r.op, []).append(r)
    ref = {(r.op, r.config, r.mode): r.median_ms for r in results if r.provider == "reference" and r.median_ms}
    peer = best_peer_ms(results)
    for op, rows in by_op.items():
        derived_keys = sorted({k for r in rows for k in r.derived})
        with_limit = any(r.limit_ms is not None for r in rows)
        lines += [f"## {op}", "", "| config | mode | provider | median ms | p20 | p80 | peak MB | x ref | "
                  + "x best peer | " + ("% of limit | " if with_limit else "")
                  + "".join(f"{k} | " for k in derived_keys) + "note |",
                  "|" + "---|" * (10 + with_limit + len(derived_keys))]
        for r in rows:
            key = (r.op, r.config, r.mode)
            base = ref.get(key)
            speedup = base / r.median_ms if base and r.median_ms else None
            best = peer.get(key)
            vs_peer = best[1] / r.median_ms if best and r.median_ms else None
            pct = pct_of_limit(r)
            cells = [r.config, r.mode, r.provider, _fmt(r.median_ms, 4), _fmt(r.p20_ms, 4), _fmt(r.p80_ms, 4),
                     _fmt(r.peak_mem_mb), "" if speedup is None else f"{speedup:.2f}",
                     "" if vs_peer is None else f"{vs_peer:.2f}"] + (
                ["" if pct is None else f"{pct:.1f}"] if with_limit else []) + [
                _fmt(r.derived.get(k)) for k in derived_keys] + [(r.error or "").replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {line}" for line in (notes or {}).get(op, [])]
        lines.append("")
    return "\n".join(lines)


@dataclass
class Goal:
    """One GPU goal checked on one row: ``met`` is True, False or None (n.a.: not measurable in this run)."""
    name: str
    met: bool | None
    value: str = ""  # the measured figure, or why it is n.a.


def verdict(met: bool | None) -> str:
    return "n.a." if met is None else ("yes" if met else "no")


def speed_goal(name: str, ours: Result | None, other: Result | None, at_least: float) -> Goal:
    """``other``'s median over ours at least ``at_least``; n.a. when ``other`` was not measured."""
    if other is None or not other.median_ms:
        return Goal(name, None, "not measured")
    if ours is None or not ours.median_ms:
        return Goal(name, False, "ours not measured")
    x = other.median_ms / ours.median_ms
    return Goal(name, x >= at_least, f"{x:.2f}x")


def fraction_goal(name: str, value: float | None, at_least: float, what: str = "") -> Goal:
    """``value`` (a fraction, e.g. of the copy bandwidth) at least ``at_least``; n.a. when None."""
    if value is None:
        return Goal(name, None, what or "no ceiling measured")
    return Goal(name, value >= at_least, f"{100 * value:.0f}%")


def at_a_glance(results: list[Result], env: dict, goals_for: Callable | None = None,
                extra_goals: list[tuple[str, Goal]] = ()) -> str:
    """Markdown: one row per (op, config, mode) for our fastest backend there, then every goal's verdict.

    ``goals_for(op, config, mode, rows, ours)`` -> list of :class:`Goal` (``rows``: provider -> Result of that
    (op, config, mode); ``ours``: our fastest Result there, or None). The goals are GPU goals: off CUDA each is
    n.a.; on CUDA a row where none of our backends was measured meets none of its goals. ``extra_goals``:
    (op, Goal) pairs not tied to a row (the training step's MFU).
    """
    gpu = str(env.get("device", "")).startswith("cuda")
    groups: dict[tuple[str, str, str], dict[str, Result]] = {}
    for r in results:
        groups.setdefault((r.op, r.config, r.mode), {})[r.provider] = r
    peers = best_peer_ms(results)
    lines = ["# At a glance: our fastest backend per shape", "",
             f"{env.get('device_name')} · {env.get('device')} · torch {env.get('torch')} · {env.get('date')}", ""]
    limits = ceilings_line(env.get("ceilings"))
    lines += ([limits, ""] if limits else []) + [
        "x ref: eager reference / ours; x best peer: fastest installed peer / ours (references are baselines, not "
        "peers); % of limit: 100 x limit / median. Goals: yes, no, or n.a. (not measurable in this run"
        + ("" if gpu else "; every goal is a GPU goal") + ").", "",
        "| op | config | mode | ours | median ms | x ref | x best peer | % of limit | goals |",
        "|---|---|---|---|---|---|---|---|---|"]
    per_goal: dict[tuple[str, str], list[tuple[str, Goal]]] = {}
    for (op, config, mode), rows in groups.items():
        ours = [r for p, r in rows.items() if p in OURS and r.median_ms]
        best = min(ours, key=lambda r: r.median_ms) if ours else None
        goals = list(goals_for(op, config, mode, rows, best)) if goals_for else []
        if not gpu:
            goals = [Goal(g.name, None, "GPU goal") for g in goals]
        elif best is None:  # our backends failed (or did not run) here: no goal of this row is met
            goals = [Goal(g.name, False, "ours not measured") for g in goals]
        for g in goals:
            per_goal.setdefault((op, g.name), []).append((f"{config}, {mode}", g))
        ref = rows.get("reference")
        x_ref = ref.median_ms / best.median_ms if best and ref and ref.median_ms else None
        peer = peers.get((op, config, mode))
        x_peer = peer[1] / best.median_ms if best and peer else None
        pct = pct_of_limit(best) if best else None
        cells = [op, config, mode, best.provider if best else "— (none measured)",
                 _fmt(best.median_ms, 4) if best else "", "" if x_ref is None else f"{x_ref:.2f}",
                 "" if x_peer is None else f"{x_peer:.2f} ({peer[0]})", "" if pct is None else f"{pct:.1f}",
                 ("n.a. (GPU goals)" if goals and not gpu else
                  " · ".join(f"{g.name}: {verdict(g.met)}" + (f" ({g.value})" if g.value else "") for g in goals))]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    for op, g in extra_goals:
        per_goal.setdefault((op, g.name), []).append(("", g))
    lines += ["", "| op | goal | met | rows |", "|---|---|---|---|"]
    for (op, name), checks in per_goal.items():
        known = [g.met for _, g in checks if g.met is not None]
        met = None if not known else all(known)
        if len(checks) == 1:
            where, g = checks[0]
            detail = f"{where}: {g.value}" if where else g.value
        elif not known:
            detail = checks[0][1].value
        else:
            missed = [f"{where} ({g.value})" for where, g in checks if g.met is False]
            detail = f"{sum(known)} of {len(known)} rows met" + (
                "; not met: " + "; ".join(missed[:4]) + ("; ..." if len(missed) > 4 else "") if missed else "")
        lines.append(f"| {op} | {name} | {verdict(met)} | {detail} |".replace("\n", " "))
    return "\n".join(lines) + "\n"


def plot(results: list[Result], env: dict, path: Path, op: str, mode: str = "fwd+bwd") -> Path | None:
    """A PNG with time (left) and peak memory (right) per provider across the sizes of ``op``'s sweep.

    Only rows of one series (the first one that has sized rows) in ``mode`` are drawn; None when there is none.
    """
    rows = [r for r in results if r.op == op and r.mode == mode and r.series and r.size is not None]
    if not rows:
        return None
    series = rows[0].series
    rows = [r for r in rows if r.series == series]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider in dict.fromkeys(r.provider for r in rows):
        pts = sorted((r.size, r.median_ms, r.peak_mem_mb) for r in rows if r.provider == provider and r.median_ms)
        if not pts:
            continue
        style = dict(marker="o", linewidth=2.2 if provider in ("cpu", "cuda", "triton") else 1.2)
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=provider, **style)
        mem = [p for p in pts if p[2] is not None]
        if mem:
            ax_m.plot([p[0] for p in mem], [max(p[2], 1e-2) for p in mem], label=provider, **style)
    memory_kind = "peak allocated" if env.get("device", "").startswith("cuda") else "peak resident-memory growth"
    for ax, label in ((ax_t, "median time (ms)"), (ax_m, f"{memory_kind} (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(series)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"{op}, {mode} — {env.get('device_name')} ({env.get('device')}), {env.get('date')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: list[Result], env: dict, out_dir: Path, stem: str, title: str,
          notes: dict[str, list[str]] | None = None) -> tuple[Path, Path]:
    """``out_dir/<stem>.json`` (environment and rows) and ``out_dir/<stem>.md`` (:func:`to_markdown`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=2))
    md_path.write_text(to_markdown(results, env, title, notes))
    return json_path, md_path


def load(path: Path) -> tuple[list[Result], dict]:
    """The results and environment of a JSON file written by :func:`write`."""
    data = json.loads(Path(path).read_text())
    return [Result(**row) for row in data["results"]], data["environment"]
