"""Time every op against its eager reference, the reference under torch.compile and the installed peers.

Usage: ``python bench/gpu_check.py --out DIR [--device cuda|cpu] [--quick]``. Writes ``DIR/ops.json`` and
``DIR/ops.md``. On a GPU it also measures the two ceilings the targets are stated against: device copy
bandwidth and the bf16 matmul rate. ``--quick --device cpu`` is a smoke test of the harness on tiny shapes.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("AIMV2_CHECK_VALUES", "0")  # no host syncs from argument checks inside timed regions

import harness  # noqa: E402
import ops  # noqa: E402
from aimv2_kernels import available_backends  # noqa: E402

MODES = ("fwd", "fwd+bwd")


def ceilings(device) -> dict:
    """Measured copy GB/s (bytes read + written) and bf16 matmul TFLOP/s on this device."""
    if device.type != "cuda":
        return {}
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms, _, _ = harness.time_fn(lambda: dst.copy_(src), device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms, _, _ = harness.time_fn(lambda: a @ a, device)
    return {"copy_GBps": 2 * 2**30 / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def providers(op: str, device, peers: tuple[str, ...]) -> list[str]:
    # The CUDA kernels are timed only once their tests passed in this run (gpu_check.sh sets AIMV2_BENCH_CUDA):
    # a faulting kernel would poison this process's CUDA context and every later measurement.
    skip = () if os.environ.get("AIMV2_BENCH_CUDA") == "1" else ("cuda",)
    ours = [b for b in available_backends(op, device) if b not in ("reference", *skip)]
    return ours + ["reference", "reference-compiled"] + list(peers)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run(device: torch.device, quick: bool) -> tuple[list[harness.Result], dict]:
    results, ceil = [], ceilings(device)
    timing = {"warmup_ms": 5, "rep_ms": 20} if quick else {}
    # -- patch loss: B=256 at 224 px (the target), 448 px
    patch_cfgs = [ops.PatchConfig(2, 56, dtype=torch.float32)] if quick else [
        ops.PatchConfig(256, 224), ops.PatchConfig(64, 448)]
    for cfg in patch_cfgs:
        for provider in providers("patch_mse_loss", device, ()):
            for mode in MODES:
                derive = (lambda ms, cfg=cfg: {"GB/s": cfg.min_bytes() / ms / 1e6}) if mode == "fwd+bwd" else None
                results.append(harness.measure("patch_mse_loss", cfg.name, provider, mode,
                                               lambda c=cfg, p=provider, m=mode: ops.patch_setup(c, p, m, device),
                                               device, derive, **timing))
    # -- attention: random per-sample prefixes, D=128, about 32k tokens per call
    attn_cfgs = [ops.AttentionConfig(2, 2, 33, 64, dtype=torch.float32)] if quick else [
        ops.AttentionConfig(128, 8, 256), ops.AttentionConfig(32, 8, 1024), ops.AttentionConfig(8, 8, 4096),
        ops.AttentionConfig(96, 8, 334, prefix="causal")]
    attn_peers = ("sdpa-dense-mask", "flex-attention") if device.type == "cuda" else ("sdpa-dense-mask",)
    for cfg in attn_cfgs:
        lens = cfg.prefix_lens(device)
        for provider in providers("prefix_attention", device, attn_peers):
            for mode in MODES:
                factor = 1.0 if mode == "fwd" else 3.5  # backward = 2.5x forward
                flops = factor * cfg.fwd_flops(lens)
                results.append(harness.measure(
                    "prefix_attention", cfg.name, provider, mode,
                    lambda c=cfg, p=provider, m=mode: ops.attention_setup(c, p, m, device), device,
                    lambda ms, f=flops: {"TFLOP/s": f / ms / 1e9}, **timing))
    # -- linear cross-entropy: the target shape and the decoder's (B x 77 tokens, V=32000)
    ce_cfgs = [ops.LinearCEConfig(37, 32, 301, dtype=torch.float32)] if quick else [
        ops.LinearCEConfig(32768, 1024, 32000), ops.LinearCEConfig(128 * 77, 1024, 32000)]
    ce_peers = tuple(p for p, m in (("liger", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy"))
                     if _installed(m) and device.type == "cuda")
    for cfg in ce_cfgs:
        for provider in providers("linear_cross_entropy", device, ce_peers):
            for mode in MODES:
                results.append(harness.measure(
                    "linear_cross_entropy", cfg.name, provider, mode,
                    lambda c=cfg, p=provider, m=mode: ops.linear_ce_setup(c, p, m, device), device,
                    lambda ms, c=cfg, m=mode: {"TFLOP/s": c.flops(m) / ms / 1e9, "logits MB": c.logits_mb()},
                    **timing))
    return results, ceil


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the harness")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results, ceil = run(device, args.quick)
    env = harness.environment(device) | {"ceilings": ceil}
    json_path, md_path = harness.write(results, env, args.out, "ops", "aimv2-kernels: ops against references and peers")
    if ceil:
        md_path.write_text(md_path.read_text() + "\nMeasured ceilings: " +
                           ", ".join(f"{k} {v:.0f}" for k, v in ceil.items()) + "\n")
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
