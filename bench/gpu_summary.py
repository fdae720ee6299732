"""The at-a-glance page of a ``bench/gpu_check.sh`` run: ``OUTDIR/summary.md``.

Usage (gpu_check.sh calls it)::

    python bench/gpu_summary.py --stages OUTDIR/stages.tsv --detail DETAIL --total SECONDS [--dry-run]

It reads what the stages left in DETAIL (their logs, the op benchmarks' summary, the training-step tables) and
prints markdown: the stages with exit code, seconds and cap; the time spent autotuning (the
``TRITON_PRINT_AUTOTUNING`` lines of every log); the op benchmarks at a glance; the training step and its op
shares; the failed tests. With ``--dry-run`` it also prints :func:`autotune_plan`, the estimate of what the real
run will spend autotuning.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

_TUNED = re.compile(r"finished after ([0-9.]+)s")

# Assumptions of the estimate, stated in its output, until a GPU run measures the real figure (its summary
# sums the TRITON_PRINT_AUTOTUNING lines). COMPILE_S: one Triton compile on one core; tools/triton_compile_check.py
# did 520 (all kernels, triton 3.6) in 134 s on 2 cores here, 0.5 s each, the attention kernels above that, so
# 1 s. BENCH_S: do_bench's default 25 ms warm-up + 100 ms of repetitions per configuration and tuning.
COMPILE_S = 1.0
BENCH_S = 0.15


def autotune_plan(max_configs: int | None) -> dict:
    """The autotune tunings that the real run's bench and train stages trigger, counted from their shapes.

    One tuning per (kernel, autotune key): attention keys on (S, D, causal, prefix, dtypes), the patch loss on
    (rows, P, gradient or not), the cross-entropy rows on (V, variant). ``TRITON_CACHE_AUTOTUNING=1`` shares
    tunings between processes, so the AIMv2-L step reuses the benchmark's (same shapes). Returns the count of
    tunings, of compiles (a compile per configuration and distinct specialization) and the estimated seconds.
    """
    import bench_cross_entropy
    import bench_linear_cross_entropy
    import bench_patch_mse_loss
    import bench_prefix_attention
    import torch

    cuda = torch.device("cuda")
    tunings: set[tuple] = set()
    for c in bench_prefix_attention.configs(cuda):
        for kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
            tunings.add((kernel, c.seq, c.head_dim, c.prefix != "causal", str(c.dtype)))
    for c in bench_patch_mse_loss.configs(cuda):
        for grad in (False, True):
            tunings.add(("patch_mse", c.batch * (c.num_patches - 1), 3 * c.patch ** 2, grad, str(c.dtype)))
    for module, kernel in ((bench_cross_entropy, "ce_rows"), (bench_linear_cross_entropy, "ce_rows_inplace")):
        for c in module.configs(cuda):
            # forward (lse + loss, and the gradient when it is needed), backward (gradient from the saved lse)
            for variant in ("forward", "forward+grad", "backward"):
                tunings.add((kernel, getattr(c, "vocab", None), variant, str(getattr(c, "dtype", ""))))
    # Specializations: the attention kernels recompile for S divisible by 16 or not; the rest by variant.
    specs = {(t[0], t[1] % 16 == 0, *t[2:]) if t[0].startswith("attn") else t for t in tunings}
    kept = max_configs or 6
    compiles = len(specs) * kept
    seconds = compiles * COMPILE_S + len(tunings) * kept * BENCH_S
    return {"tunings": len(tunings), "configs_each": kept, "compiles": compiles, "seconds": seconds}


def read_stages(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def stage_table(stages: list[dict]) -> list[str]:
    lines = ["| stage | exit | seconds | cap | result |", "|---|---|---|---|---|"]
    for s in stages:
        rc = int(s["exit"])
        result = "ok" if rc == 0 else ("CAP HIT" if rc in (124, 137) else "FAILED")
        lines.append(f"| {s['stage']} | {rc} | {s['seconds']} | {s['cap']} | {result} |")
    return lines


def autotune_seconds(detail: Path, stages: list[dict]) -> list[str]:
    lines = ["| stage | tunings | seconds |", "|---|---|---|"]
    total_n, total_s = 0, 0.0
    for s in stages:
        log = detail / f"{s['stage']}.log"
        found = [float(x) for x in _TUNED.findall(log.read_text(errors="replace"))] if log.exists() else []
        if found:
            lines.append(f"| {s['stage']} | {len(found)} | {sum(found):.1f} |")
            total_n, total_s = total_n + len(found), total_s + sum(found)
    lines.append(f"| all | {total_n} | {total_s:.1f} |")
    return lines


def failed_tests(detail: Path) -> list[str]:
    out = []
    for name in ("triton", "cuda"):
        log = detail / f"{name}.log"
        if log.exists():
            out += [line for line in log.read_text(errors="replace").splitlines()
                    if line.startswith(("FAILED", "ERROR"))][:20]
    return out


def tables_of(path: Path, limit: int = 40) -> list[str]:
    """The markdown table lines of a file (its header and notes left out)."""
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.startswith("|")][:limit]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/gpu_summary.py", description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=Path, required=True)
    ap.add_argument("--detail", type=Path, required=True)
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    stages = read_stages(args.stages)
    env = (args.detail / "env.txt").read_text() if (args.detail / "env.txt").exists() else ""
    kind = "dry run on the CPU (commands checked, no GPU figure)" if args.dry_run else "GPU run"
    out = [f"# gpu_check: {kind}", "", "```", env.strip(), "```", "",
           f"Wall time of the whole check: {args.total} s.", "", "## Stages", "", *stage_table(stages), ""]
    out += ["## Autotuning (measured: TRITON_PRINT_AUTOTUNING)", "", *autotune_seconds(args.detail, stages), ""]
    if args.dry_run:
        cap = os.environ.get("AIMV2_AUTOTUNE_MAX_CONFIGS")
        plan = autotune_plan(int(cap) if cap else None)
        out += ["## Autotuning estimate of the real run", "",
                f"The bench and train stages trigger {plan['tunings']} tunings of {plan['configs_each']} "
                f"configurations each (AIMV2_AUTOTUNE_MAX_CONFIGS={cap or 'unset'}), about {plan['compiles']} "
                f"compiles: about {plan['seconds']:.0f} s, assuming {COMPILE_S:.1f} s per compile and "
                f"{BENCH_S} s of timing per configuration and tuning (guesses until a GPU run measures them; "
                "the table above is the measurement). The test stages' tunings are not counted: each test "
                "shape is a tuning of its own, bounded by the stage's cap.", ""]
    failed = failed_tests(args.detail)
    if failed:
        out += ["## Failed tests", "", *[f"- `{line}`" for line in failed], ""]
    out += ["## Op benchmarks at a glance", ""]
    glance = tables_of(args.detail / "bench_summary.md", limit=80)
    out += glance or ["(no bench/run.py summary: see the bench stage's log)"]
    out += ["", "## Training step", ""]
    train = sorted((args.detail / "train").glob("train_throughput-*.md"))
    out += tables_of(train[-1]) if train else ["(no training-step table: see the train stage's log)"]
    profile = sorted((args.detail / "train").glob("train_profile-*.md"))
    if profile:
        out += ["", "## Op shares of the step", "", *tables_of(profile[-1], limit=20)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
