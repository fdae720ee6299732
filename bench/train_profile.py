"""Op shares of an AIMv2 training step under ``torch.profiler``: the profiling half of
``bench/train_throughput.py --profile``.

``python bench/train_throughput.py --profile`` runs ``--warmup`` (default 1) + ``--steps`` (default 3) eager
steps of one backend (the first of ``--backends``, default ``auto``) under ``torch.profiler``, writes a Chrome
trace (``OUT/trace-<preset>-<backend>-<device>.json``, or ``--profile-out``; a path ending in ``.gz`` is
gzipped) and reports the time per step spent in each of patch_mse_loss, prefix_attention and
linear_cross_entropy, as a share of the step (see :func:`attribute_ops` for exactly what is counted); ``--out
DIR`` also writes ``train_profile-<preset>-<backend>-<device>-<date>.{json,md}``. That script builds the
Trainer and the synthetic batch and holds the command line; this module profiles the steps it is given
(:func:`profile_steps`), attributes the profiler's events to the ops and writes the markdown table.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

RANGE_PREFIX = "train_throughput::"  # record_function names of the profiled steps and op calls

def _op_call_sites() -> dict[str, tuple[object, str]]:
    """Where the model looks up each op (the module globals that ``aimv2`` calls): op -> (module, name)."""
    import aimv2.layers
    import aimv2.model

    sites = {"patch_mse_loss": (aimv2.model, "patch_mse_loss"), "prefix_attention": (aimv2.layers, "prefix_attention"),
             "linear_cross_entropy": (aimv2.model, "linear_cross_entropy")}
    for op, (module, name) in sites.items():
        if not callable(getattr(module, name, None)):
            raise RuntimeError(f"{module.__name__}.{name} not found: the profile's op attribution must follow "
                               f"how aimv2 calls {op}")
    return sites


def _graph_nodes(outputs, inputs) -> set[int]:
    """Sequence numbers of the autograd nodes created by one op call: the nodes reachable from its outputs'
    ``grad_fn`` that are newer than every input's ``grad_fn`` (nodes are numbered in creation order on the
    forward thread, and the op can reach older nodes only through its inputs); gradient accumulators
    (leaves) excluded."""
    flat = [x for x in (outputs if isinstance(outputs, (tuple, list)) else (outputs,)) if isinstance(x, torch.Tensor)]
    floor = max((x.grad_fn._sequence_nr() for x in inputs if isinstance(x, torch.Tensor) and x.grad_fn is not None),
                default=-1)
    seen: set[int] = set()
    stack = [x.grad_fn for x in flat if x.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ == "AccumulateGrad":
            continue
        seq = node._sequence_nr()
        if seq <= floor or seq in seen:
            continue
        seen.add(seq)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


@contextlib.contextmanager
def op_ranges() -> Iterator[dict[str, set[int]]]:
    """Within the block, each call of the three ops as the model makes it runs inside
    ``record_function("train_throughput::<op>")``, and the sequence numbers of the autograd nodes it creates
    are collected in the yielded ``{op: set}`` (their backward shows as
    ``autograd::engine::evaluate_function: <node>`` events with the same sequence number)."""
    sites = _op_call_sites()
    nodes: dict[str, set[int]] = {op: set() for op in sites}
    originals = {op: getattr(module, name) for op, (module, name) in sites.items()}

    def wrap(op: str, fn):
        def call(*args, **kwargs):
            with torch.profiler.record_function(RANGE_PREFIX + op):
                out = fn(*args, **kwargs)
            nodes[op] |= _graph_nodes(out, list(args) + list(kwargs.values()))
            return out
        return call

    try:
        for op, (module, name) in sites.items():
            setattr(module, name, wrap(op, originals[op]))
        yield nodes
    finally:
        for op, (module, name) in sites.items():
            setattr(module, name, originals[op])


def _outermost(events: list) -> list:
    """The events not inside another of ``events`` on the same thread (so nested ones are not counted twice)."""
    kept, last_end = [], {}
    for e in sorted(events, key=lambda e: (e.thread, e.time_range.start, -e.time_range.end)):
        if e.time_range.end <= last_end.get(e.thread, -math.inf):
            continue
        kept.append(e)
        last_end[e.thread] = max(e.time_range.end, last_end.get(e.thread, -math.inf))
    return kept


def _op_of_kernel_name(name: str) -> str | None:
    """The op an ``aimv2::`` custom-op event belongs to in this model (cross-entropy rows: the linear one)."""
    for key, op in (("patch_mse", "patch_mse_loss"), ("prefix_attention", "prefix_attention"),
                    ("cross_entropy", "linear_cross_entropy")):
        if key in name:
            return op
    return None


def attribute_ops(events, nodes: dict[str, set[int]], steps: int, device: torch.device) -> dict:
    """Time per step of each op of ``nodes`` (as :func:`op_ranges` yields it) and its share of the step, from
    the profiler's events.

    Counted for an op, per step: ``forward``, the ``train_throughput::<op>`` range around each call (argument
    checks, reshapes, backend dispatch and the kernels; for the fp32 ``cpu`` linear cross-entropy also its
    gradients, computed in the forward); ``backward``, the ``autograd::engine::evaluate_function`` events of
    the autograd nodes that the calls created (matched by sequence number: for the reference every aten op's
    backward, for the kernel backends the custom op's backward and the small reduction nodes around it).
    Only the outermost of those events count, so nothing nested is counted twice. ``custom_ops`` is the time
    in the outermost ``aimv2::`` custom-op events (by name, as in ``key_averages()``): the kernels without the
    Python around them; none exist for the reference. On CPU the times are host wall times; on CUDA the GPU
    time of the kernels that the events launched. The step time is the host wall time of the
    ``train_throughput::step`` ranges (each ends with the Trainer's ``.item()`` reads, a device sync).
    """
    events = list(events)
    cuda = device.type == "cuda"

    def duration(e) -> float:  # microseconds
        return float(e.device_time_total) if cuda else float(e.time_range.elapsed_us())

    host_only = [e for e in events if getattr(e, "device_type", None) is None
                 or str(e.device_type).endswith("CPU")]
    steps_us = [e.time_range.elapsed_us() for e in host_only if e.name == RANGE_PREFIX + "step"]
    if len(steps_us) != steps:
        raise RuntimeError(f"expected {steps} profiled steps, found {len(steps_us)} step ranges")
    step_ms = sum(steps_us) / 1e3 / steps
    backward_events = [e for e in host_only if e.name.startswith("autograd::engine::evaluate_function:")]
    kernel_events = [e for e in host_only if e.name.startswith("aimv2::")]
    outer_kernels = []
    for e in kernel_events:
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aimv2::"):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            outer_kernels.append(e)
    rows = {}
    for op in nodes:
        fwd = _outermost([e for e in host_only if e.name == RANGE_PREFIX + op])
        bwd = _outermost([e for e in backward_events if e.sequence_nr in nodes.get(op, set())])
        kern = [e for e in outer_kernels if _op_of_kernel_name(e.name) == op]
        f_ms = sum(duration(e) for e in fwd) / 1e3 / steps
        b_ms = sum(duration(e) for e in bwd) / 1e3 / steps
        rows[op] = {"calls_per_step": len(fwd) / steps, "forward_ms": f_ms, "backward_ms": b_ms,
                    "total_ms": f_ms + b_ms, "share_pct": 100 * (f_ms + b_ms) / step_ms,
                    "custom_ops_ms": sum(duration(e) for e in kern) / 1e3 / steps if kern else None,
                    "backward_nodes_per_step": len(bwd) / steps}
    optimizer = [e for e in host_only if e.name.startswith("Optimizer.step#")]
    opt_ms = sum(duration(e) for e in _outermost(optimizer)) / 1e3 / steps if optimizer else None
    ops_ms = sum(r["total_ms"] for r in rows.values())
    return {"step_ms": step_ms, "ops": rows, "ops_total_ms": ops_ms, "ops_share_pct": 100 * ops_ms / step_ms,
            "optimizer_ms": opt_ms, "time_base": "GPU kernel time" if cuda else "host wall time"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int,
                  trace: str | Path) -> dict:
    """Run ``warmup`` + ``steps`` calls of ``step`` (a training step of the model, eager) with the ops' calls
    tracked (:func:`op_ranges`), the last ``steps`` under ``torch.profiler``; write the Chrome trace to
    ``trace`` (gzipped if it ends in ``.gz``) and return :func:`attribute_ops`'s shares with ``trace`` and
    ``trace_mb``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with op_ranges() as nodes:
        for _ in range(warmup):
            step()
        _sync(device)
        for op in nodes:
            nodes[op].clear()
        with profile(activities=activities) as prof:
            for i in range(steps):
                with record_function(RANGE_PREFIX + "step"):
                    step()
                    _sync(device)
                print(f"profile: step {i + 1}/{steps}", file=sys.stderr, flush=True)
    trace = Path(trace)
    write_trace(prof, trace)
    shares = attribute_ops(prof.events(), nodes, steps, device)
    shares.update(trace=str(trace), trace_mb=trace.stat().st_size / 2**20)
    return shares


def write_trace(prof, trace: Path) -> None:
    """The profiler's Chrome trace at ``trace``; gzipped when ``trace`` ends in ``.gz``."""
    trace.parent.mkdir(parents=True, exist_ok=True)
    if trace.suffix == ".gz":
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    else:
        prof.export_chrome_trace(str(trace))


def profile_markdown(result: dict, info: dict, notes: Sequence[str] = ()) -> str:
    """The op-share table of :func:`profile_steps`'s ``result`` (plus ``backend`` and ``resolved``), headed
    by ``info`` (preset, batch size, device, warm-up and steps, environment); ``notes`` become bullets."""
    env = info["environment"]
    lines = [f"# Op shares of a training step: {info['preset']}, batch {info['batch_size']}, "
             f"backend {result['backend']}, {info['device']}", "",
             f"{env.get('device_name')} · " + (f"{env['threads']} threads · " if env.get("threads") else "")
             + f"torch {env.get('torch')} · {env.get('date')} · resolved: "
             + ", ".join(f"{op}={b}" for op, b in result["resolved"].items()), "",
             f"{info['warmup']} warm-up step(s), then {info['steps']} eager step(s) under torch.profiler; "
             f"per step, {result['time_base']}. Step (profiled): {result['step_ms']:.1f} ms.", "",
             "| op | calls/step | forward ms | backward ms | total ms | share of step | in aimv2:: custom ops ms |",
             "|---|---|---|---|---|---|---|"]
    for op, r in result["ops"].items():
        lines.append(f"| {op} | {r['calls_per_step']:.0f} | {r['forward_ms']:.2f} | {r['backward_ms']:.2f} | "
                     f"{r['total_ms']:.2f} | {r['share_pct']:.1f}% | {_ms_or_dash(r['custom_ops_ms'])} |")
    lines.append(f"| **the three ops** | | | | {result['ops_total_ms']:.2f} | {result['ops_share_pct']:.1f}% | |")
    if result.get("optimizer_ms") is not None:
        lines.append(f"| AdamW step (for scale) | | | | {result['optimizer_ms']:.2f} | "
                     f"{100 * result['optimizer_ms'] / result['step_ms']:.1f}% | |")
    lines += ["", "What is counted: forward = the record_function range around each call of the op as the model "
              "makes it (argument checks, reshapes, dispatch, kernels); backward = the autograd-engine events of "
              "the autograd nodes that those calls created, matched by sequence number (for the reference, the "
              "backward of each of its aten ops). Only outermost events count, so nested events are not counted "
              "twice. The fp32 `cpu` linear_cross_entropy computes its gradients in its forward; its backward "
              "only scales them. \"in aimv2:: custom ops\" = the outermost `aimv2::` custom-op events, i.e. the "
              "kernels without the Python around them (none for the reference). Profiling adds overhead per "
              "event, more for the reference (many small aten ops) than for the fused kernels.",
              "", f"Trace: `{Path(result['trace']).name}` ({result['trace_mb']:.1f} MB)."]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _ms_or_dash(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
