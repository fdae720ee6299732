"""Peak memory of a training step with and without activation checkpointing (``--activation-checkpointing``).

Usage::

    python bench/activation_memory.py [--preset aimv2-large-patch14-224] [--batch-size 2] [--backend cpu]
        [--device cpu|cuda] [--modes none,full,selective] [--out DIR]

Each mode runs in a fresh process (so one mode's freed memory cannot hide another's peak): it builds the preset
(seed 0), allocates every gradient up front, then runs one forward and backward of the AIMv2 loss on a random
batch (``randn`` images, random caption ids, prefix lengths uniform in [1, N-1], all drawn from seed 0) and
measures

- on a CPU, the process's peak resident memory (``ru_maxrss``) during the step minus its resident memory just
  before it: what the activations and the step's temporaries add on top of the parameters and gradients
  (after a one-sample warm-up step, with glibc's ``MALLOC_MMAP_THRESHOLD_`` at 64 KiB so that freed tensors leave
  the resident set);
- on a GPU, ``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before it;

and the step's wall time (the recomputation's cost). The loss and the gradient norm are printed for every mode:
they must agree (activation checkpointing changes what is kept, not what is computed). ``--out DIR`` writes
``activation_memory-<device>-<date>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "full", "selective")


def _rss_gib() -> float:
    """The current resident memory of this process (Linux /proc), GiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(args: argparse.Namespace) -> dict:
    """One mode, in this process: the measurement of one forward + backward."""
    import torch

    sys.path.insert(0, str(ROOT))
    from aimv2.config import AIMv2Config
    from aimv2.layers import set_activation_checkpointing
    from aimv2.model import AIMv2, count_parameters

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = AIMv2Config.from_name(args.preset, backend=args.backend)
    model = AIMv2(cfg).to(device).train()
    set_activation_checkpointing(model, args.child)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    enc = cfg.encoder
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, enc.image_size, enc.image_size, generator=g).to(device)
    tokens = torch.randint(2, cfg.decoder.vocab_size, (args.batch_size, cfg.decoder.context_length),
                           generator=g).to(device)
    prefix = torch.randint(1, enc.num_patches, (args.batch_size,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:  # warm-up on one sample: libraries and kernels loaded before the measurement
        model(images[:1], tokens[:1], prefix[:1]).loss.backward()
    for p in model.parameters():
        p.grad.zero_()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**30
    else:
        before = _rss_gib()
    start = time.perf_counter()
    with autocast:
        out = model(images, tokens, prefix)
    out.loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    seconds = time.perf_counter() - start
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    return {"mode": args.child, "before_gib": before, "peak_gib": peak, "step_gib": peak - before,
            "seconds": seconds, "loss": out.loss.item(), "grad_norm": grad_norm,
            "parameters": count_parameters(model)}


def _markdown(info: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r["mode"] == "none"), None)
    what = "peak RSS" if info["device"] == "cpu" else "peak allocated"
    lines = [f"# Activation checkpointing: {info['preset']}, batch {info['batch_size']}, {info['device_name']}",
             "", f"{info['date']}; backend {info['backend']}; torch {info['torch']}; {info['parameters']:,} "
             f"parameters. Memory added by one forward + backward on top of parameters and gradients ({what}).",
             "", "| mode | step memory GiB | vs none | step s | vs none | loss | grad norm |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['step_gib'] / base['step_gib']:.2f}x" if base else ""
        sec = f"{r['seconds'] / base['seconds']:.2f}x" if base else ""
        lines.append(f"| {r['mode']} | {r['step_gib']:.2f} | {mem} | {r['seconds']:.1f} | {sec} | "
                     f"{r['loss']:.6f} | {r['grad_norm']:.6f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="aimv2-large-patch14-224")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or args.batch_size < 1:
        p.error(f"--modes must be among {MODES} and --batch-size >= 1, got {args.modes!r}, {args.batch_size}")
    import torch

    rows = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", mode, "--preset", args.preset, "--batch-size",
               str(args.batch_size), "--backend", args.backend, "--device", args.device]
        # Every allocation of 64 KiB or more is its own mapping, returned to the OS when freed, so that resident
        # memory follows the live tensors instead of glibc's heap (whose freed space stays resident).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode:>9}: +{row['step_gib']:.2f} GiB, {row['seconds']:.1f} s, loss {row['loss']:.6f}, "
              f"grad norm {row['grad_norm']:.6f}", flush=True)
        rows.append(row)
    device_name = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    info = {"preset": args.preset, "batch_size": args.batch_size, "backend": args.backend,
            "device": "cpu" if args.device == "cpu" else "cuda", "device_name": device_name,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "parameters": rows[0]["parameters"] if rows else 0}
    md = _markdown(info, rows)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"activation_memory-{info['device']}-{info['date']}"
        stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        stem.with_suffix(".md").write_text(md)
        print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
