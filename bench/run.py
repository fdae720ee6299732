"""Benchmark every op against its reference and the installed peers, side by side in one run.

Usage::

    python bench/run.py [--op NAME ...] [--device cpu|cuda] [--quick] [--modes fwd,bwd,fwd+bwd]
                        [--providers NAME,...] [--out bench/results] [--no-memory] [--no-plots] [--summary PATH]

Writes ``OUT/<device>-<date>.json`` and ``.md`` (``<device>-<date>-quick.*`` with ``--quick``) and one PNG per op,
``OUT/<device>-<date>-<op>.png`` (time and memory per provider across the op's sweep, fwd+bwd). A run with
``--op`` updates that op's rows in an existing file of the same device and date and keeps the others.

Each op has its own script (``bench/bench_<op>.py``) with ``configs(device, quick)``, ``providers(device)``,
``setup(config, provider, mode, device) -> callable``, ``derived(config, mode, ms)``, ``work(config, mode)`` (the
bytes and FLOPs the shape needs) and ``goals(...)`` (its GPU goals); this file runs them.
On a GPU the copy bandwidth and the bf16 matmul rate are measured once at the start (``harness.ceilings``, kept
in the JSON's environment); each row's ``limit_ms`` is the best time its bytes and FLOPs allow on them and the
tables show ``% of limit``. ``--summary PATH`` also writes (and rewrites after every config) a short markdown
table: our fastest backend per (op, config, mode) with x ref, x best peer, % of limit and whether each GPU goal
was met (bench/README.md); the training step's MFU goal is read from ``OUT/train_throughput-<device>-<date>.json``
when that file exists.
Timing: on a GPU ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call), on a CPU wall time
after a warm-up call, at least 5 calls; median, 20th and 80th percentiles. Memory: on a GPU the peak allocated
during one call above what was allocated before; on a CPU the growth of the peak resident size over one call,
measured for each (op, provider) in a fresh subprocess. Argument value checks are off
(``AIMV2_CHECK_VALUES=0``): they would add host synchronisations to our ops only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_cross_entropy
import bench_linear_cross_entropy
import bench_patch_mse_loss
import bench_prefix_attention
import harness
import torch

OPS = {m.OP: m for m in (bench_patch_mse_loss, bench_prefix_attention, bench_linear_cross_entropy,
                         bench_cross_entropy)}
TITLE = "aimv2-kernels: ops against their references and peers"


def _csv(choices: tuple[str, ...] | None, flag: str):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{flag} is empty")
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(choices)})")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    ap.add_argument("--op", action="append", choices=list(OPS), help="repeatable; default: every op")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and short timing: a smoke test of the harness")
    ap.add_argument("--modes", type=_csv(harness.MODES, "--modes"), default=list(harness.MODES),
                    help="comma-separated subset of fwd,bwd,fwd+bwd (default: all three)")
    ap.add_argument("--providers", type=_csv(None, "--providers"), default=None,
                    help="comma-separated providers to run (default: every one that can run here)")
    ap.add_argument("--out", type=Path, default=BENCH / "results", help="output folder (default: bench/results)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--summary", type=Path, default=None, metavar="PATH",
                    help="also write an at-a-glance markdown table to PATH: our fastest backend per (op, config, "
                         "mode), x ref, x best peer, %% of limit, and each GPU goal met (yes/no/n.a.)")
    ap.add_argument("--memory-child", nargs=2, metavar=("OP", "PROVIDER"), help=argparse.SUPPRESS)
    return ap


def _device(ap: argparse.ArgumentParser, name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this machine (or this torch build) has no CUDA device")
    return torch.device(name)


def _timing(device: torch.device, quick: bool) -> dict:
    if quick:
        return {"warmup_ms": 1, "rep_ms": 5, "min_runs": 5}
    return {"warmup_ms": 25, "rep_ms": 100, "min_runs": 5}


def _memory_child(op: str, provider: str, device: torch.device, quick: bool, modes: list[str]) -> dict:
    """{"<config>|<mode>": peak MB or None}: the resident-memory growth of one call of each (config, mode)."""
    module, out = OPS[op], {}
    for config in module.configs(device, quick):
        for mode in modes:
            try:
                fn = module.setup(config, provider, mode, device)
                out[f"{config.name}|{mode}"] = harness.rss_peak_growth_mb(fn)
            except Exception:  # the error is recorded by the timing pass
                out[f"{config.name}|{mode}"] = None
            fn = None
    return out


def cpu_memory(op: str, provider: str, quick: bool, modes: list[str]) -> dict:
    """Runs :func:`_memory_child` for one (op, provider) in a fresh subprocess (see ``harness.CPU_MEMORY_ENV``)."""
    cmd = [sys.executable, __file__, "--memory-child", op, provider, "--device", "cpu", "--modes", ",".join(modes)]
    cmd += ["--quick"] if quick else []
    proc = subprocess.run(cmd, env={**os.environ, **harness.CPU_MEMORY_ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory of {op} / {provider} failed:\n{proc.stderr[-1500:]}", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_op(op: str, device: torch.device, quick: bool, modes: list[str], only: list[str] | None, memory: bool,
           on_config: Callable[[list[harness.Result], list[str]], object] | None = None,
           ceilings: dict | None = None) -> tuple[list[harness.Result], list[str]]:
    """Time (and measure the memory of) every runnable provider of ``op`` on every config and mode.

    ``only`` restricts the providers (names ``op`` does not have are ignored); ``on_config(results, notes)`` is
    called after each config, so that a caller can save partial results. Each row gets the bytes and FLOPs of
    its shape (``work``) and, with ``ceilings`` (:func:`harness.ceilings`), the limit they allow.
    """
    from tqdm import tqdm

    module = OPS[op]
    available = module.providers(device)
    notes = [f"not run: {p} ({why})" for p, why in available.items() if why is not None]
    runnable = [p for p, why in available.items() if why is None and (only is None or p in only)]
    results: list[harness.Result] = []
    timing = _timing(device, quick)
    with tqdm(total=len(module.configs(device, quick)) * len(runnable) * len(modes), desc=op, unit="case",
              file=sys.stderr, leave=False) as bar:
        for config in module.configs(device, quick):
            for provider in runnable:
                for mode in modes:
                    # measure() calls both closures before this iteration ends: binding the loop variables late
                    # is safe, and the defaults make that explicit.
                    result = harness.measure(
                        op, config.name, provider, mode,
                        lambda config=config, provider=provider, mode=mode: module.setup(config, provider, mode,
                                                                                         device),
                        device, lambda ms, config=config, mode=mode: module.derived(config, mode, ms), **timing)
                    result.size, result.series = config.size, config.series
                    work = module.work(config, mode)
                    result.bytes, result.flops = work["bytes"], work["flops"]
                    result.limit_ms = harness.limit_ms(work, ceilings)
                    _memory_derived(module, config, result)
                    results.append(result)
                    bar.update()
            if on_config is not None:
                on_config(results, notes)
    if memory and device.type == "cpu":
        by_name = {c.name: c for c in module.configs(device, quick)}
        for provider in tqdm(runnable, desc=f"{op} memory", unit="provider", file=sys.stderr, leave=False):
            peaks = cpu_memory(op, provider, quick, modes)
            for r in results:
                if r.provider == provider and r.error is None:
                    r.peak_mem_mb = peaks.get(f"{r.config}|{r.mode}")
                    _memory_derived(module, by_name[r.config], r)
        notes.append("peak MB: growth of the peak resident size over one call, in a fresh subprocess per provider")
    elif device.type == "cuda":
        notes.append("peak MB: peak allocated during one call above what was allocated before it")
    if any(r.limit_ms is not None for r in results):
        notes.append("% of limit: 100 x max(bytes / copy bandwidth, FLOPs / bf16 matmul rate) over the median; "
                     "bytes and FLOPs as bench/README.md counts them")
    elif ceilings and results:
        notes.append("% of limit: none, the FLOPs of these shapes are not bf16 and only the bf16 matmul rate is "
                     "measured")
    return results, notes


def _memory_derived(module, config, result: harness.Result) -> None:
    """Adds the module's memory-derived values (linear CE: the extra memory) once the peak is known."""
    fn = getattr(module, "memory_derived", None)
    if fn is not None and result.peak_mem_mb is not None and result.error is None:
        result.derived.update({k: float(f"{v:.4g}") for k, v in fn(config, result.mode, result.peak_mem_mb).items()})


def write_outputs(out: Path, stem: str, results: list[harness.Result], env: dict, notes: dict[str, list[str]],
                  plots: bool) -> list[Path]:
    """Merge with an existing ``stem`` file (rows of ops not run now are kept), write JSON, markdown and plots."""
    json_path = out / f"{stem}.json"
    ran = {r.op for r in results}
    if json_path.exists():
        old, old_env = harness.load(json_path)
        results = [r for r in old if r.op not in ran] + results
        notes = {**{k: v for k, v in old_env.get("notes", {}).items() if k not in ran}, **notes}
    order = list(OPS)
    results.sort(key=lambda r: order.index(r.op) if r.op in order else len(order))
    written = list(harness.write(results, {**env, "notes": notes}, out, stem, TITLE, notes))
    if plots:
        for op in dict.fromkeys(r.op for r in results):
            png = harness.plot(results, env, out / f"{stem}-{op}.png", op)
            if png is not None:
                written.append(png)
    return written


TRAIN_GOAL = ">= 45% MFU (AIMv2-L, batch 128)"
TRAIN_PRESET, TRAIN_BATCH, TRAIN_MFU = "aimv2-large-patch14-224", 128, 0.45


def train_goal(path: Path) -> harness.Goal:
    """The AIMv2-L step's MFU goal from a ``bench/train_throughput.py`` JSON (our best backend's MFU), n.a. when
    that file is missing or measured something else."""
    if not path.exists():
        return harness.Goal(TRAIN_GOAL, None, f"no {path.name} (bench/train_throughput.py writes it)")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return harness.Goal(TRAIN_GOAL, None, f"{path.name} unreadable ({type(exc).__name__})")
    if info.get("preset") != TRAIN_PRESET or info.get("batch_size") != TRAIN_BATCH:
        return harness.Goal(TRAIN_GOAL, None,
                            f"{path.name} measured {info.get('preset')}, batch {info.get('batch_size')}")
    rows = [r for r in info.get("rows", []) if r.get("backend") != "reference" and r.get("mfu") is not None]
    if not rows:
        return harness.Goal(TRAIN_GOAL, None, f"{path.name} has no MFU of our backends")
    best = max(rows, key=lambda r: r["mfu"])
    return harness.Goal(TRAIN_GOAL, best["mfu"] >= TRAIN_MFU,
                        f"{100 * best['mfu']:.1f}% ({best['backend']}, {best['mode']})")


def write_summary(path: Path, json_path: Path, device: torch.device, quick: bool, train_json: Path) -> Path:
    """The at-a-glance markdown (:func:`harness.at_a_glance`) of every row in ``json_path``."""
    results, env = harness.load(json_path)
    configs = {(op, c.name): (module, c) for op, module in OPS.items() for c in module.configs(device, quick)}

    def goals_for(op, config, mode, rows, ours):
        module, cfg = configs.get((op, config), (None, None))
        return [] if cfg is None else module.goals(cfg, mode, rows, ours, env.get("ceilings") or {})

    text = harness.at_a_glance(results, env, goals_for, [("training step", train_goal(train_json))])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    device = _device(ap, args.device)
    # Set here, not at import: tests import this module, and the value checks must stay on for them.
    os.environ.setdefault("AIMV2_CHECK_VALUES", "0")
    if args.memory_child:
        print(json.dumps(_memory_child(*args.memory_child, device, args.quick, args.modes)))
        return 0
    ops = args.op or list(OPS)
    if args.providers is not None:
        known = {p for op in ops for p in OPS[op].providers(device)}
        unknown = [p for p in args.providers if p not in known]
        if unknown:
            ap.error(f"--providers: no provider {', '.join(unknown)} for {', '.join(ops)} "
                     f"(known: {', '.join(sorted(known))})")
    env = harness.environment(device)
    if device.type == "cuda":
        env["ceilings"] = harness.ceilings(device)
    env["quick"] = args.quick
    stem = f"{device.type}-{env['date']}" + ("-quick" if args.quick else "")
    train_json = args.out / f"train_throughput-{device.type}-{env['date']}.json"
    written: list[Path] = []
    for op in ops:
        # Saved after every config (and with plots after every op), so that a run stopped by a time limit keeps
        # what it measured.
        def save(results, notes, plots=False, op=op):
            paths = write_outputs(args.out, stem, results, env, {op: notes}, plots)
            if args.summary is not None:  # kept current too, so a run stopped by a time limit has one
                write_summary(args.summary, paths[0], device, args.quick, train_json)
            return paths
        results, notes = run_op(op, device, args.quick, args.modes, args.providers, not args.no_memory, save,
                                env.get("ceilings"))
        written = save(results, notes, not args.no_plots)
        print(f"{op}: {sum(r.error is None for r in results)} measured, {sum(r.error is not None for r in results)} "
              f"failed ({datetime.datetime.now():%H:%M:%S})", file=sys.stderr)
    print(written[1].read_text())
    if args.summary is not None:
        written.append(args.summary)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
