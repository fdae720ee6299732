"""The best time each CUDA benchmark shape allows, from its bytes and FLOPs and a GPU's figures; no GPU needed.

Usage::

    python bench/limits.py [--copy-GBps 4300] [--matmul-TFLOPs 790] [--markdown]

For every shape that ``bench/run.py --device cuda`` times (each bench module's ``configs(cuda, quick=False)``)
in the modes fwd and fwd+bwd: the bytes that must move and the FLOPs that must be done (the module's
``work(config, mode)``), the time each takes at the given copy bandwidth (bytes read + written) and bf16 matmul
rate, and the limit, the larger of the two (``harness.limit_ms``, the same function that gives a GPU run's
``% of limit``). Then the AIMv2-L training step at batch 128: its model FLOPs (``bench/train_throughput.py``'s
``model_flops_per_step``), the step time at the full matmul rate and at 45% MFU. The defaults are an H200's
figures (about 4.3 TB/s copy, about 790 TFLOP/s dense bf16).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import harness
import run
import torch

MODES = ("fwd", "fwd+bwd")
CUDA = torch.device("cuda")  # only names the device whose shapes are listed; nothing runs on it
TRAIN_PRESET, TRAIN_BATCH, TRAIN_MFU = run.TRAIN_PRESET, run.TRAIN_BATCH, run.TRAIN_MFU


def rows(ceilings: dict) -> list[dict]:
    """One dict per (op, CUDA config, mode): op, config, mode, bytes, flops, copy_ms, matmul_ms, limit_ms, bound."""
    out = []
    for op, module in run.OPS.items():
        for config in module.configs(CUDA, quick=False):
            for mode in MODES:
                work = module.work(config, mode)
                copy_ms = harness.limit_ms({**work, "flops": 0}, ceilings)
                limit = harness.limit_ms(work, ceilings)
                matmul_ms = harness.limit_ms({**work, "bytes": 0}, ceilings) if work["flops"] else None
                bound = "memory" if not work["flops"] or (matmul_ms is not None and copy_ms >= matmul_ms) else "matmul"
                out.append({"op": op, "config": config.name, "mode": mode, "bytes": work["bytes"],
                            "flops": work["flops"], "dtype": work["dtype"], "copy_ms": copy_ms,
                            "matmul_ms": matmul_ms, "limit_ms": limit, "bound": bound})
    return out


def prefix_lines() -> list[str]:
    """The prefix lengths behind the attention FLOPs: seeded, so the counts are reproducible."""
    import bench_prefix_attention as pa

    lines = []
    for c in pa.configs(CUDA, quick=False):
        if c.prefix == "random":
            lens = c.prefix_lens("cpu")
            lines.append(f"{c.name}: sum_b M_b^2 = {c.sum_prefix_squares()}, mean M = {lens.double().mean():.1f} "
                         f"(S = {c.seq}, {c.batch} samples)")
    return lines


def train_step(matmul_tflops: float) -> dict:
    """The AIMv2-L step at batch 128: model FLOPs (expected prefix), time at the full matmul rate and at 45% MFU."""
    import train_throughput as tt

    from aimv2.config import AIMv2Config

    cfg = AIMv2Config.from_name(TRAIN_PRESET)
    flops = tt.model_flops_per_step(cfg, TRAIN_BATCH)
    parts = tt.model_flops_breakdown(cfg, TRAIN_BATCH)
    attention = 3 * (parts["encoder_attention"] + parts["decoder_attention"])
    limit = flops / (matmul_tflops * 1e12) * 1e3
    return {"preset": TRAIN_PRESET, "batch": TRAIN_BATCH, "flops": flops, "attention_flops": attention,
            "limit_ms": limit, "target_ms": limit / TRAIN_MFU,
            "target_images_per_s": TRAIN_BATCH / (limit / TRAIN_MFU / 1e3)}


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}" if value < 1 else f"{value:.3f}"


def render(ceilings: dict, markdown: bool) -> str:
    table = rows(ceilings)
    step = train_step(ceilings["bf16_matmul_TFLOPs"])
    head = ["op", "config", "mode", "MB moved", "GFLOP", "copy ms", "matmul ms", "limit ms", "bound"]
    body = [[r["op"], r["config"], r["mode"], f"{r['bytes'] / 1e6:.1f}",
             f"{r['flops'] / 1e9:.1f}" if r["flops"] else "—", _ms(r["copy_ms"]), _ms(r["matmul_ms"]),
             _ms(r["limit_ms"]), r["bound"]] for r in table]
    figures = (f"copy {ceilings['copy_GBps']:g} GB/s (bytes read + written), bf16 matmul "
               f"{ceilings['bf16_matmul_TFLOPs']:g} TFLOP/s; MB = 10^6 bytes, GFLOP = 10^9 FLOPs")
    step_line = (f"{step['preset']}, batch {step['batch']}: {step['flops'] / 1e12:.1f} TFLOP per step "
                 f"(model FLOPs: 3x the forward matmuls, 2x the patch embedding, visible attention pairs at the "
                 f"expected prefix; attention {step['attention_flops'] / 1e12:.1f} TFLOP of it); at 100% of the "
                 f"matmul rate {step['limit_ms']:.1f} ms; at the 45% MFU goal {step['target_ms']:.1f} ms, "
                 f"{step['target_images_per_s']:.0f} images/s")
    if markdown:
        lines = [f"Figures: {figures}.", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines += ["", "Prefix lengths (seeded generator, uniform in [1, S-1]):", ""]
        lines += [f"- {line}" for line in prefix_lines()]
        lines += ["", f"Training step: {step_line}."]
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [f"figures: {figures}", "", fmt.format(*head)] + [fmt.format(*row) for row in body]
    lines += ["", "prefix lengths (seeded, uniform in [1, S-1]):"] + [f"  {line}" for line in prefix_lines()]
    lines += ["", f"training step: {step_line}"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/limits.py", description=__doc__.splitlines()[0])
    ap.add_argument("--copy-GBps", type=float, default=4300.0,
                    help="copy bandwidth, GB/s of bytes read + written (default: 4300, an H200)")
    ap.add_argument("--matmul-TFLOPs", type=float, default=790.0,
                    help="dense bf16 matmul rate, TFLOP/s (default: 790, an H200)")
    ap.add_argument("--markdown", action="store_true", help="a markdown table (default: aligned text)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.copy_GBps <= 0 or args.matmul_TFLOPs <= 0:
        ap.error("--copy-GBps and --matmul-TFLOPs must be positive")
    ceilings = {"copy_GBps": args.copy_GBps, "bf16_matmul_TFLOPs": args.matmul_TFLOPs}
    print(render(ceilings, args.markdown), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
