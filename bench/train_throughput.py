"""Training throughput of an AIMv2 preset: images/s, step time and MFU per backend, eager and under torch.compile.

Usage::

    python bench/train_throughput.py [--preset aimv2-demo] [--device cpu|cuda] [--batch-size N] [--steps N]
        [--warmup N] [--backends all|auto,reference,cpu,triton,cuda] [--modes eager,compile] [--interleave]
        [--profile [--profile-out PATH]] [--out DIR] [--note TEXT]

A training step is :meth:`aimv2.train.Trainer.train_step` itself (forward under bf16 autocast on CUDA,
``loss.backward()``, ``clip_grad_norm_(1.0)``, AdamW step, ``zero_grad``) on a Trainer whose batch iterator is
replaced by one synthetic batch (normalized-like ``randn`` images, random caption ids right-padded with
``pad_id``) drawn once: nothing is downloaded and no data loading is timed. Warm-up steps (which hold
``torch.compile``'s compilation) are not timed; each timed step is wall time (CUDA synchronized after it).
Reported: median step time and its 20th/80th percentiles, images/s = batch / median, the achieved model FLOP
rate (:func:`aimv2.flops.model_flops_per_step` / median), and on a GPU the MFU against the measured bf16 rate
of an 8192^3 matmul. ``--out DIR`` writes ``train_throughput-<device>-<date>.{json,md}``.

``--backends all`` (the default) is ``"reference"`` plus every backend that
:func:`aimv2_kernels.available_backends` lists for all three ops on the device, except ``"triton"`` on the CPU
(there it runs only through Triton's interpreter, a correctness tool: skipped, with a note) and ``"cuda"``
when ``AIMV2_BENCH_CUDA=0`` (``bench/gpu_check.sh`` sets it when the CUDA kernels failed their tests in the
same run; a faulting kernel would poison the process's CUDA context), as in ``bench/run.py``. A backend or
a compile that fails gives an error row; the run goes on.

``--profile`` instead runs ``--warmup`` (default 1) + ``--steps`` (default 3) eager steps of one backend (the
first of ``--backends``, default ``auto``) under ``torch.profiler``, writes a Chrome trace
(``OUT/trace-<preset>-<backend>-<device>.json``, or ``--profile-out``; a path ending in ``.gz`` is gzipped)
and reports the time per step spent in each of patch_mse_loss, prefix_attention and linear_cross_entropy, as
a share of the step; ``--out DIR`` also writes ``train_profile-<preset>-<backend>-<device>-<date>.{json,md}``.
The profiling itself (what is counted, the trace, the table) is ``bench/train_profile.py``; this script builds
the Trainer and the batch it profiles.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import train_profile

from aimv2.config import PRESETS, AIMv2Config
from aimv2.flops import model_flops_breakdown, model_flops_per_step  # the FLOP model lives in the package
from aimv2_kernels import BACKENDS, available_backends

OPS = ("patch_mse_loss", "prefix_attention", "linear_cross_entropy")
MODES = ("eager", "compile")
MATMUL_N = 8192  # the MFU denominator: the measured rate of one bf16 (N, N) @ (N, N) matmul
CPU_DEFAULTS = {"preset": "aimv2-demo", "batch_size": 8, "steps": 5, "warmup": 2}
CUDA_DEFAULTS = {"preset": "aimv2-large-patch14-224", "batch_size": 128, "steps": 20, "warmup": 5}
PROFILE_DEFAULTS = {"steps": 3, "warmup": 1}


# -- backends, inputs and the training step -----------------------------------------------------------------

def select_backends(spec: str, device: torch.device) -> tuple[list[str], list[str]]:
    """``(backends to run, notes on those left out)`` for ``--backends``.

    ``"all"``: ``"reference"`` plus the backends available for every op of the model on ``device``, without
    ``"triton"`` on the CPU (interpreter only) and without ``"cuda"`` when ``AIMV2_BENCH_CUDA=0``. A list
    names backends explicitly; ``"triton"`` on the CPU is still left out, with a note.
    """
    notes: list[str] = []
    if spec == "all":
        common = [b for b in BACKENDS[1:] if all(b in available_backends(op, device) for op in OPS)]
        chosen = ["reference"] + [b for b in common if b != "reference"]
        if device.type == "cpu" and "cpu" not in chosen:
            notes.append("cpu: skipped, the compiled extension aimv2_kernels._C is not built")
        if device.type == "cuda" and "cuda" in chosen and os.environ.get("AIMV2_BENCH_CUDA") == "0":
            chosen.remove("cuda")
            notes.append("cuda: skipped, AIMV2_BENCH_CUDA=0: its kernels did not pass their GPU tests in this run")
    else:
        chosen = list(dict.fromkeys(spec.split(",")))
    if device.type == "cpu" and "triton" in chosen:
        chosen.remove("triton")
        notes.append("triton: skipped on the CPU, where it runs only through Triton's interpreter "
                     "(TRITON_INTERPRET=1), a correctness tool and not a performance one")
    return chosen, notes


def resolved_backends(backend: str, device: torch.device) -> dict[str, str]:
    """The concrete backend of each op for ``backend`` on ``device`` (fp32 inputs); ``"?"`` if unavailable."""
    from aimv2_kernels._backend import resolve_backend

    out = {}
    for op in OPS:
        try:
            out[op] = resolve_backend(op, backend, device, torch.float32)
        except Exception:  # an unavailable explicit backend: the row records the error
            out[op] = "?"
    return out


def synthetic_batch(cfg: AIMv2Config, batch: int, device: torch.device, seed: int = 0):
    """One :class:`aimv2.data.Batch`: ``images`` fp32 ``(B, C, H, W)`` standard normal (as normalized images),
    ``tokens`` int64 ``(B, T)``, random ids in ``[0, V)`` other than ``pad_id`` with a random length in
    ``[T/2, T]``, right-padded with ``pad_id``; ``labels`` -1."""
    from aimv2.data import Batch

    enc, dec = cfg.encoder, cfg.decoder
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, enc.in_chans, enc.image_size, enc.image_size, generator=g)
    tokens = torch.randint(0, dec.vocab_size - 1, (batch, dec.context_length), generator=g)
    tokens = tokens + (tokens >= dec.pad_id).long()  # never pad_id
    lengths = torch.randint(dec.context_length // 2, dec.context_length + 1, (batch, 1), generator=g)
    tokens = tokens.masked_fill(torch.arange(dec.context_length)[None] >= lengths, dec.pad_id)
    return Batch(images=images.to(device), tokens=tokens.to(device), labels=torch.full((batch,), -1, device=device))


def make_trainer(preset: str, backend: str, device: torch.device, batch, steps: int, compile_model: bool):
    """An :class:`aimv2.train.Trainer` for ``preset`` on ``backend`` whose batches are all ``batch``.

    The Trainer builds the model (seed 0), AdamW with the recipe's parameter groups and the LR schedule;
    its data loader is never read. With ``compile_model`` the Trainer compiles the model as
    ``aimv2-train --compile`` does (every transformer block ``torch.compile``d in place).
    """
    from aimv2.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(preset=preset, out=os.devnull, steps=steps, batch_size=batch.images.shape[0],
                                  device=str(device), backend=backend, progress=False, compile=compile_model))
    trainer.batches = itertools.repeat(batch)
    return trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def matmul_tflops(device: torch.device) -> float | None:
    """Measured bf16 matmul rate (TFLOP/s) of an ``(8192, 8192) @ (8192, 8192)`` product; None off CUDA."""
    if device.type != "cuda":
        return None
    def matmul_ms() -> float:
        a = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16)
        return harness.time_fn(lambda: a @ a, device)[0]

    ms = matmul_ms()  # frees the operands on return
    torch.cuda.empty_cache()
    return 2 * MATMUL_N ** 3 / ms / 1e9


# -- throughput -----------------------------------------------------------------------------------------------

@dataclass
class Row:
    backend: str
    mode: str  # "eager" or "compile"
    resolved: dict = field(default_factory=dict)  # op -> concrete backend
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    images_per_s: float | None = None
    tflops: float | None = None  # achieved model TFLOP/s
    mfu: float | None = None  # fraction of the measured bf16 matmul rate (GPU only)
    peak_mem_mb: float | None = None  # GPU only
    warmup_s: float | None = None  # wall time of the warm-up steps (holds the compilation)
    loss: float | None = None  # the last timed step's loss (a sanity check: finite)
    step_ms: list = field(default_factory=list)
    error: str | None = None


@dataclass
class _Config:
    row: Row
    trainer: object = None


def _finish(row: Row, batch: int, flops: float, peak_tflops: float | None) -> None:
    times = row.step_ms
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    row.median_ms, row.p20_ms, row.p80_ms = statistics.median(times), q[1], q[7]
    row.images_per_s = batch / (row.median_ms / 1e3)
    row.tflops = flops / (row.median_ms / 1e3) / 1e12
    row.mfu = row.tflops / peak_tflops if peak_tflops else None


def run_throughput(args, device: torch.device, backends: list[str], flops: float,
                   peak_tflops: float | None) -> list[Row]:
    """Time ``args.steps`` training steps after ``args.warmup`` for each (backend, mode); see the module doc.

    Sequential (default): one configuration at a time, built, warmed up, timed and freed. ``--interleave``:
    all configurations are built and warmed up first, then timed in rounds of one step each, so that load
    from other jobs on a shared machine hits every configuration alike (all models are in memory at once).
    """
    from tqdm.auto import tqdm

    batch = synthetic_batch(AIMv2Config.from_name(args.preset), args.batch_size, device)
    configs = [_Config(Row(backend=b, mode=m, resolved=resolved_backends(b, device)))
               for b in backends for m in args.modes]
    total_steps = args.warmup + args.steps
    torch._dynamo.reset()

    def log(i: int, msg: str) -> None:
        print(f"[{i + 1}/{len(configs)}] {configs[i].row.backend} {configs[i].row.mode}: {msg}",
              file=sys.stderr, flush=True)

    def start(i: int) -> None:
        c = configs[i]
        try:
            if not args.interleave:
                torch._dynamo.reset()  # each compiled configuration on a fresh dynamo state
            c.trainer = make_trainer(args.preset, c.row.backend, device, batch, total_steps, c.row.mode == "compile")
            log(i, f"{args.warmup} warm-up step(s)" + (" (compiling)" if c.row.mode == "compile" else ""))
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                c.trainer.train_step()
            _sync(device)
            c.row.warmup_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        except Exception as exc:  # an unavailable backend, a failed compile, an OOM: an error row
            fail(i, exc)

    def step(i: int) -> None:
        c = configs[i]
        try:
            t0 = time.perf_counter()
            metrics = c.trainer.train_step()
            _sync(device)
            c.row.step_ms.append((time.perf_counter() - t0) * 1e3)
            c.row.loss = metrics["loss"]
        except Exception as exc:
            fail(i, exc)

    def fail(i: int, exc: BaseException) -> None:
        c = configs[i]
        c.row.error, c.trainer, c.row.step_ms = _error(exc), None, []
        log(i, f"error: {c.row.error}")
        release()

    def release() -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def done(i: int) -> None:
        c = configs[i]
        if c.trainer is None:
            return
        if device.type == "cuda" and not args.interleave:  # interleaved: every model shares the one peak
            c.row.peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
        _finish(c.row, args.batch_size, flops, peak_tflops)
        log(i, f"{c.row.median_ms:.1f} ms/step (p20 {c.row.p20_ms:.1f}, p80 {c.row.p80_ms:.1f}), "
               f"{c.row.images_per_s:.1f} images/s, loss {c.row.loss:.4f}")
        c.trainer = None
        release()

    if args.interleave:
        for i in range(len(configs)):
            start(i)
        live = [i for i, c in enumerate(configs) if c.trainer is not None]
        for _ in tqdm(range(args.steps), desc="rounds", disable=None, file=sys.stderr):
            for i in live:
                if configs[i].trainer is not None:
                    step(i)
        for i in live:
            done(i)
    else:
        for i in range(len(configs)):
            start(i)
            if configs[i].trainer is None:
                continue
            for _ in tqdm(range(args.steps), desc=f"{configs[i].row.backend} {configs[i].row.mode}",
                          disable=None, file=sys.stderr):
                step(i)
                if configs[i].trainer is None:
                    break
            done(i)
    return [c.row for c in configs]


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def throughput_markdown(rows: list[Row], info: dict) -> str:
    env = info["environment"]
    gpu = info["device"].startswith("cuda")
    rate = "TFLOP/s" if gpu else "GFLOP/s"
    scale = 1.0 if gpu else 1e3
    lines = [f"# Training throughput: {info['preset']}, batch {info['batch_size']}, {info['device']}", "",
             f"{env.get('device_name')} · " + (f"{env['threads']} threads · " if env.get("threads") else "")
             + f"torch {env.get('torch')} · triton {env.get('triton')} · {env.get('date')}", "",
             f"One step = `Trainer.train_step` (forward{' under bf16 autocast' if gpu else ''}, backward, "
             f"clip 1.0, AdamW, zero_grad) on one synthetic batch; {info['warmup']} warm-up step(s) not timed, "
             f"then {info['steps']} timed steps ({'interleaved rounds' if info['interleave'] else 'sequential'}); "
             f"median (p20, p80). Model FLOPs per step: {info['flops_per_step'] / 1e12:.4g} TFLOP "
             f"(matmuls, visible attention pairs, expected prefix)."
             + (f" MFU against the measured bf16 {MATMUL_N}^3 matmul rate, {info['matmul_tflops']:.0f} TFLOP/s."
                if info.get("matmul_tflops") else " MFU: GPU only."), "",
             f"| backend | mode | step ms | p20 | p80 | images/s | {rate} | MFU | peak MB | warm-up s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        resolved = ", ".join(f"{op}={b}" for op, b in r.resolved.items()) if r.backend == "auto" else ""
        error = r.error.replace("|", "\\|") if r.error else None
        lines.append("| " + " | ".join([
            r.backend, r.mode, _cell(r.median_ms, ".1f"), _cell(r.p20_ms, ".1f"), _cell(r.p80_ms, ".1f"),
            _cell(r.images_per_s, ".1f"), _cell(None if r.tflops is None else r.tflops * scale, ".3g"),
            _cell(None if r.mfu is None else 100 * r.mfu, ".1f") + ("%" if r.mfu is not None else ""),
            _cell(r.peak_mem_mb, ".0f"), _cell(r.warmup_s, ".1f"), error or resolved]) + " |")
    notes = _notes(info)
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


# -- profile (bench/train_profile.py) -------------------------------------------------------------------------

def run_profile(args, device: torch.device, backend: str) -> dict:
    """Profile ``args.warmup`` + ``args.steps`` eager steps of ``backend`` (:func:`train_profile.profile_steps`);
    write the trace; return the op shares with the backend and what it resolves to."""
    batch = synthetic_batch(AIMv2Config.from_name(args.preset), args.batch_size, device)
    trainer = make_trainer(args.preset, backend, device, batch, args.warmup + args.steps, compile_model=False)
    print(f"profile: {args.preset}, batch {args.batch_size}, backend {backend}, {args.warmup} warm-up + "
          f"{args.steps} profiled step(s)", file=sys.stderr, flush=True)
    trace = Path(args.profile_out) if args.profile_out else (
        Path(args.out or ".") / f"trace-{args.preset}-{backend}-{device.type}.json")
    shares = train_profile.profile_steps(trainer.train_step, device, args.warmup, args.steps, trace)
    shares.update(backend=backend, resolved=resolved_backends(backend, device))
    return shares


# -- command line ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train_throughput.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help=f"model preset (default: {CPU_DEFAULTS['preset']} on cpu, "
                   f"{CUDA_DEFAULTS['preset']} on cuda); one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per step (default: {CPU_DEFAULTS['batch_size']} on cpu, "
                        f"{CUDA_DEFAULTS['batch_size']} on cuda)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on cpu, 20 on cuda, 3 with "
                   "--profile)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, they hold the compilation "
                   "(default: 2 on cpu, 5 on cuda, 1 with --profile)")
    p.add_argument("--backends", default=None, help="comma-separated list of " + ", ".join(BACKENDS)
                   + ", or 'all' (default; reference + every backend available for all three ops; "
                   "--profile: the first in the list, default auto)")
    p.add_argument("--modes", default=None, help="comma-separated: eager, compile (default: both; --profile: eager)")
    p.add_argument("--interleave", action="store_true",
                   help="time all configurations in rounds of one step each (all models in memory at once)")
    p.add_argument("--profile", action="store_true",
                   help="profile one backend's eager steps: Chrome trace and the share of each op")
    p.add_argument("--profile-out", default=None,
                   help="trace path (default: OUT/trace-<preset>-<backend>-<device>.json; .gz compresses)")
    p.add_argument("--out", default=None, help="folder for train_throughput-<device>-<date>.{json,md} "
                   "(--profile: train_profile-<preset>-<backend>-<device>-<date>.{json,md} and the trace)")
    p.add_argument("--note", action="append", default=[], help="a line recorded in the outputs (repeatable)")
    return p


def parse_args(argv: Sequence[str] | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    defaults = dict(CPU_DEFAULTS if device.type == "cpu" else CUDA_DEFAULTS)
    if args.profile:
        defaults.update(PROFILE_DEFAULTS)
    for name in ("preset", "batch_size", "steps", "warmup"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    for name, low in (("batch_size", 1), ("steps", 1), ("warmup", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    spec = args.backends or ("auto" if args.profile else "all")
    names = [s.strip() for s in spec.split(",")]
    if spec != "all" and (not all(names) or any(n not in BACKENDS for n in names)):
        parser.error(f"--backends: expected 'all' or a comma-separated list of {', '.join(BACKENDS)}, got {spec!r}")
    args.backends = ",".join(names) if spec != "all" else "all"
    modes = [s.strip() for s in (args.modes or ("eager" if args.profile else ",".join(MODES))).split(",")]
    if not all(m in MODES for m in modes):
        parser.error(f"--modes: expected a comma-separated list of {', '.join(MODES)}, got {args.modes!r}")
    args.modes = list(dict.fromkeys(modes))
    return args, device


@contextlib.contextmanager
def _check_values_off() -> Iterator[None]:
    """``AIMV2_CHECK_VALUES=0`` (unless set) while running: no host syncs from the ops' value checks in timed
    steps. Restored afterwards, so that importing or calling this module leaves the process's checks alone."""
    before = os.environ.get("AIMV2_CHECK_VALUES")
    os.environ.setdefault("AIMV2_CHECK_VALUES", "0")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("AIMV2_CHECK_VALUES", None)


def main(argv: Sequence[str] | None = None) -> int:
    args, device = parse_args(argv)
    with _check_values_off():
        return _run(args, device)


def _run(args, device: torch.device) -> int:
    backends, notes = select_backends(args.backends, device)
    env = harness.environment(device)
    cfg = AIMv2Config.from_name(args.preset)
    info = {"preset": args.preset, "device": str(device), "batch_size": args.batch_size, "steps": args.steps,
            "warmup": args.warmup, "environment": env, "notes": notes + list(args.note),
            "load_average_start": _load_average()}
    out = Path(args.out) if args.out else None
    if args.profile:
        if not backends:
            print("train_throughput.py: error: no backend left to profile (" + "; ".join(notes) + ")",
                  file=sys.stderr)
            return 2
        if "compile" in args.modes:
            info["notes"].append("--modes compile ignored: --profile profiles eager steps only")
        result = run_profile(args, device, backends[0])
        info.update(profile=result, load_average_end=_load_average())
        text = train_profile.profile_markdown(result, info, _notes(info))
        print(text)
        if out is not None:
            stem = f"train_profile-{args.preset}-{backends[0]}-{device.type}-{env['date']}"
            _write(out, stem, info, text)
        return 0
    flops = model_flops_per_step(cfg, args.batch_size)
    peak = matmul_tflops(device)
    if args.warmup == 0 and "compile" in args.modes:
        info["notes"].append("--warmup 0: the compile rows' first timed step holds the compilation")
    info.update(modes=args.modes, interleave=args.interleave, flops_per_step=flops,
                flops_breakdown_forward=model_flops_breakdown(cfg, args.batch_size), matmul_tflops=peak,
                backends=backends)
    rows = run_throughput(args, device, backends, flops, peak)
    info.update(rows=[asdict(r) for r in rows], load_average_end=_load_average())
    text = throughput_markdown(rows, info)
    print(text)
    if out is not None:
        _write(out, f"train_throughput-{device.type}-{env['date']}", info, text)
    return 0


def _load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (other jobs on a shared machine show here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _notes(info: dict) -> list[str]:
    """The outputs' closing bullets: the run's notes, then the load averages at its start and end."""
    start, end = info.get("load_average_start"), info.get("load_average_end")
    load = f"Load average (1, 5, 15 min) at start {start}, at end {end}." if start or end else ""
    return [n for n in [*info.get("notes", []), load] if n]


def _write(out: Path, stem: str, info: dict, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
