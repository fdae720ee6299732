"""Compile every Triton kernel of aimv2_kernels for sm_90a and sm_80 without a GPU and check its resources.

For each kernel, each specialization the package launches (dtype, head dimension, masking mode, variant flags)
and each target, the configs that the kernel's production pruner keeps on that target
(:func:`aimv2_kernels.triton.tuning.kept_configs`, the function the autotuner calls at run time) are compiled
with the installed Triton: ``triton.compile`` on an ``ASTSource`` specialized like a real launch (16-byte
aligned pointers, strides of the AIMv2 models; Triton's own launch binder derives the signature), for
``GPUTarget("cuda", 90 | 80, 32)``. Triton's ptxas report gives registers, spill stores/loads and the stack
frame; the compiled metadata gives the dynamic shared memory; the PTX says how the products run (``mma``
column: wgmma, mma.sync or fma). Triton picks the PTX target itself: ``.target sm_90a`` for capability 90
(sm_90a is needed by wgmma), ``sm_80`` for 80.

Specializations: attention at head dim 64 and 128, bf16 and fp32 in the prefix-causal, causal and full
modes, fp16 in the prefix-causal mode (its registers equal bf16's, see ``_specs``); patch MSE at patch 14, RGB
(P = 588), bf16 and fp32, loss and gradient; cross-entropy rows at V = 32000 and 1000, bf16 and fp32, every
variant that cross_entropy.py and linear_cross_entropy.py launch. ``AIMV2_AUTOTUNE_MAX_CONFIGS``, when set,
applies here as at run time.

Exit status 1 when a kept config fails to compile, spills (spill stores, spill loads or a stack frame),
needs more shared memory than the target has (sm_90: 232448 bytes opt-in per block, sm_80: 166912), or when
a pruner leaves no config; 2 on a usage error; else 0. ``--all`` also compiles the configs the pruners drop
for spills or shared memory (to re-measure the spill tables; slow: tens of minutes); those are reported but
never fail the check.

Compiles run in ``--jobs`` processes (default: one per CPU) with ``TRITON_CACHE_DIR`` pointing at a fresh
temporary directory, removed at the end: nothing is cached between runs. ``TRITON_INTERPRET`` is ignored.

Usage:
    python tools/triton_compile_check.py [--archs 90a,80] [--jobs N] [--kernel NAME ...] [--json OUT.json]
                                         [--all] [--quiet | --verbose]
Kernel names: attn_fwd, attn_bwd_delta, attn_bwd_dkdv, attn_bwd_dq, patch_mse, ce_rows.
Without the package installed: ``PYTHONPATH=. python tools/triton_compile_check.py`` (the script also adds
the repository root to ``sys.path`` itself).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import typing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("attn_fwd", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq", "patch_mse", "ce_rows")

# ---------------------------------------------------------------------------------------------- ptxas report
# Triton 3.6 runs "ptxas", 3.9 "ptxas-blackwell" for every target; tools/cuda_compile_check.py's parser reads both.
@functools.lru_cache(maxsize=None)
def _cuda_compile_check():
    """tools/cuda_compile_check.py as a module: its ptxas report parser serves both checks."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("cuda_compile_check",
                                                  os.path.join(ROOT, "tools", "cuda_compile_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_ptxas(text: str) -> dict | None:
    """The resources of the (single) entry function in a ``ptxas -v`` report, or None if there is none.

    Returns ``{"kernel", "registers", "spill_stores", "spill_loads", "stack", "static_smem"}`` (bytes).
    """
    rows = _cuda_compile_check().parse_ptxas(text)
    if not rows:
        return None
    row = dict(rows[0])
    row["static_smem"] = row.pop("smem")
    return row


# --------------------------------------------------------------------------------------------- verdicts
SHARED_LIMIT = {"90a": 232448, "90": 232448, "80": 166912}  # opt-in bytes per block (tuning.SM90A / SM80)


def problems(row: dict) -> list[str]:
    """Why a compiled config fails the check (empty when it passes). Pruned configs (``--all``) never fail."""
    if not row.get("kept", True):
        return []
    if row.get("error"):
        return ["compile error"]
    out = []
    if row["spill_stores"] or row["spill_loads"] or row["stack"]:
        out.append(f"spills (stack {row['stack']} B, stores {row['spill_stores']} B, loads {row['spill_loads']} B)")
    limit = SHARED_LIMIT.get(row["arch"])
    if limit is not None and row["shared"] > limit:
        out.append(f"shared memory {row['shared']} B > {limit} B")
    return out


def exit_status(rows: list[dict], empty: list[str]) -> int:
    """1 if any kept config fails or a pruner kept nothing, else 0."""
    return 1 if empty or any(problems(r) for r in rows) else 0


# ------------------------------------------------------------------------------------------ specializations
class Spec(typing.NamedTuple):
    """One launch specialization: kernel name, label, positional args and constexprs, pruner arguments."""
    kernel: str
    label: str
    args: tuple
    constexprs: dict
    prune_args: dict
    per_arch: dict = {}  # arch -> constexprs that depend on the target (attention: TMA)


def _specs() -> list[Spec]:
    """Every specialization the package launches in AIMv2 (deterministic order: workers rebuild it)."""
    import torch

    from aimv2_kernels.triton.attention_forward import LOG2E, dot_args, tma_for

    def ptr(dtype):  # the binder reads only dtype and data_ptr() (torch's CPU allocations are 64-byte aligned)
        return torch.empty(8, dtype=dtype)

    specs = []
    # Attention: q, k, v are views of the fused (B, S, 3, H, D) qkv projection (aimv2/layers.py); out, dq, dk, dv
    # contiguous (B, H, S, D); dO from the projection's backward, (B, S, H, D) transposed. H = 8 (every AIMv2
    # preset has head dim 128), S = 256 (224 px / patch 14, squared). ALL_MASKED (a testing aid) is False.
    # fp16 is compiled in the prefix mode only. Its code is bf16's but for the MMA's input type, and it kept
    # bf16's registers and spill verdicts wherever compared: 283 of 283 compiles (Triton 3.6 and 3.9, both
    # targets, every mode and tile, before the kernels formed addresses in their loops), and spot checks since
    # (spill bytes may differ a little). Its other two modes would add a third to the check's time (over 3
    # minutes on 2 cores with Triton 3.9).
    # TMA: the variant a launch on each target runs (tensor descriptors for fp16/bf16 on sm_90a, else pointers).
    heads, seq = 8, 256
    for head_dim in (64, 128):
        dim = heads * head_dim
        qkv_strides = (seq * 3 * dim, head_dim, 3 * dim)
        out_strides = (heads * seq * head_dim, seq * head_dim, head_dim)
        do_strides = (seq * dim, head_dim, dim)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
            modes = (("prefix", True, True), ("causal", True, False), ("full", False, False))
            for mode, causal, has_prefix in modes[:1] if dtype == torch.float16 else modes:
                label = f"D={head_dim} {name} {mode}"
                per_arch = {arch: {"TMA": tma_for(int(arch.rstrip("a")), dtype)} for arch in SHARED_LIMIT}
                t, lse, prefix = ptr(dtype), ptr(torch.float32), ptr(torch.int32)
                prefix = prefix if has_prefix else t
                flags = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_PREFIX=has_prefix, ALL_MASKED=False,
                             **dot_args(dtype))
                prune = dict(Q=t, HEAD_DIM=head_dim)
                specs.append(Spec("attn_fwd", label, (t, t, t, t, lse, prefix, *qkv_strides, *qkv_strides,
                                                      *qkv_strides, *out_strides, heads, seq, 0.1 * LOG2E),
                                  flags, prune, per_arch))
                strides = (*qkv_strides, *qkv_strides, *qkv_strides, *do_strides)
                specs.append(Spec("attn_bwd_dkdv", label, (t, t, t, t, lse, ptr(torch.float32), t, t, prefix,
                                                           *strides, heads, seq, 0.1 * LOG2E, 0.1), flags, prune,
                                  per_arch))
                specs.append(Spec("attn_bwd_dq", label, (t, t, t, t, lse, ptr(torch.float32), t, prefix,
                                                         *strides, heads, seq, 0.1 * LOG2E, 0.1), flags, prune,
                                  per_arch))
            specs.append(Spec("attn_bwd_delta", f"D={head_dim} {name}",
                              (ptr(dtype), ptr(dtype), ptr(torch.float32), *out_strides, *do_strides, heads, seq),
                              dict(HEAD_DIM=head_dim, BLOCK_M=64), {}))

    # Patch MSE: AIMv2's patch 14 on 224 px RGB (P = 588, BLOCK_P = 1024), L = 255 rows per image (target
    # offset 1), int64 prefix lengths, contiguous NCHW images and (B, L) pred; grad_rows fp32 (B, L).
    batch, rows_per_image, patches_w = 64, 255, 16
    image_strides = (3 * 224 * 224, 224 * 224, 224, 1)
    for dtype in (torch.bfloat16, torch.float32):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        for grad in (False, True):
            out = ptr(dtype) if grad else ptr(torch.float32)
            grad_rows, strides_g = (ptr(torch.float32), (rows_per_image, 1)) if grad else (out, (0, 0))
            meta = dict(C=3, PATCH=14, P=588, BLOCK_P=1024, HAS_PREFIX=True, GRAD=grad)
            specs.append(Spec("patch_mse", f"{name} {'grad' if grad else 'loss'}",
                              (ptr(dtype), ptr(dtype), ptr(torch.int64), grad_rows, out, batch * rows_per_image,
                               rows_per_image, 1, patches_w, 1e-6, *image_strides, *strides_g),
                              meta, meta))

    # Cross-entropy rows: the launches of cross_entropy.py and linear_cross_entropy.py (ce_rows call sites):
    #   fwd        loss + lse, no gradient            (cross_entropy forward; linear CE without gradients)
    #   grad       lse given, gradient * scalar scale (cross_entropy backward, "mean"/"sum")
    #   grad/row   lse given, gradient * row scale    (cross_entropy backward "none"; linear CE backward, in place)
    #   fwd+grad   loss + lse + gradient in place, scalar scale ("mean") or none ("sum") (linear CE forward)
    # HAS_SMOOTHING only changes the lse pass and the loss, so variants without them are compiled once. The
    # linear CE forward gets AIMv2's ignore_index (the pad id, 1: Triton makes it a constexpr), the others -100.
    variants = [("fwd", 1, True, False, 0), ("grad", 2, False, True, 1), ("grad/row", 2, False, True, 2),
                ("fwd+grad mean", 1, True, True, 1), ("fwd+grad sum", 1, True, True, 0)]
    for vocab in (32000, 1000):
        for dtype in (torch.bfloat16, torch.float32):
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            for variant, lse_mode, store_loss, grad, scale_mode in variants:
                for smoothing in ((False, True) if lse_mode == 1 else (False,)):
                    logits, f32 = ptr(dtype), ptr(torch.float32)
                    scale_ptr, stride_scale = {0: (logits, 0), 1: (f32, 0), 2: (f32, 1)}[scale_mode]
                    ignore = 1 if variant.startswith("fwd+grad") else -100
                    args = (logits, logits, f32 if store_loss else logits, f32, ptr(torch.int64), scale_ptr,
                            vocab, vocab, vocab if grad else 0, stride_scale, ignore, 0.1 if smoothing else 0.0, 0.0)
                    flags = dict(LSE_MODE=lse_mode, STORE_LOSS=store_loss, COMPUTE_GRAD=grad,
                                 SCALE_MODE=scale_mode, HAS_SMOOTHING=smoothing)
                    label = f"V={vocab} {name} {variant}" + (" smooth" if smoothing else "")
                    specs.append(Spec("ce_rows", label, args, flags, dict(V=vocab, **flags)))
    return specs


def _jit_fn(kernel: str):
    """The kernel's ``triton.JITFunction`` (an autotuned kernel's ``.fn``, from the tuning registry)."""
    from aimv2_kernels.triton import attention_backward, tuning
    if kernel == "attn_bwd_delta":  # a plain launch, not autotuned
        return attention_backward._bwd_delta_kernel
    tuning.import_kernels()
    return tuning.REGISTRY[kernel].fn


def _all_configs(kernel: str) -> list:
    """The kernel's GPU configs (a plain launch: one config with Triton's default warps and stages)."""
    import triton

    from aimv2_kernels.triton import tuning
    if kernel == "attn_bwd_delta":
        return [triton.Config({}, num_warps=4, num_stages=3)]
    _jit_fn(kernel)
    return tuning.REGISTRY[kernel].configs


def _candidate_indices(spec: Spec) -> list[int]:
    """``--all``: every config of the kernel that suits the specialization's precision (attention: fp32 and
    fp16/bf16 inputs have separate tiles; the others are not compiled, they are not in the spill tables)."""
    from aimv2_kernels.triton import tuning
    configs = _all_configs(spec.kernel)
    rule = tuning.REGISTRY[spec.kernel].rule if spec.kernel in tuning.REGISTRY else None
    if rule is None or not hasattr(rule, "candidates"):
        return list(range(len(configs)))
    chosen = rule.candidates(configs, spec.prune_args)
    return [i for i, c in enumerate(configs) if any(c is k for k in chosen)]


def _kept_indices(spec: Spec, arch: str) -> list[int]:
    """Indices into :func:`_all_configs` of the configs the production pruner keeps for ``spec`` on ``arch``."""
    from aimv2_kernels.triton import tuning
    configs = _all_configs(spec.kernel)
    if spec.kernel == "attn_bwd_delta":
        return [0]
    kept = tuning.kept_configs(spec.kernel, tuning.TARGETS[arch], **spec.prune_args)
    return [next(i for i, c in enumerate(configs) if c is k) for k in kept]


def config_label(config) -> str:
    parts = [f"{k}={v}" for k, v in config.kwargs.items()]
    return " ".join(parts + [f"w{config.num_warps}", f"s{config.num_stages}"])


def mma_kind(ptx: str) -> str:
    """How the kernel's ``tl.dot`` products are computed, from its PTX: "wgmma" (Hopper warpgroup MMA),
    "mma" (``mma.sync``, the sm_80 tensor-core path), "wgmma+mma" (both), or "fma" (no tensor cores, e.g.
    fp32 with ``input_precision="ieee"``, or no dot at all)."""
    wgmma, mma = "wgmma.mma_async" in ptx, re.search(r"\bmma\.sync\b", ptx) is not None
    return "wgmma+mma" if wgmma and mma else "wgmma" if wgmma else "mma" if mma else "fma"


def load_kind(ptx: str) -> str:
    """How the kernel reads global memory, from its PTX: "tma" (tensor-memory copies through descriptors,
    ``cp.async.bulk.tensor``), "cp.async" (pointer loads pipelined into shared memory) or "ld" (plain loads)."""
    if "cp.async.bulk.tensor" in ptx:
        return "tma"
    return "cp.async" if re.search(r"\bcp\.async\.(ca|cg)\b", ptx) else "ld"


# ------------------------------------------------------------------------------------------ compilation
_SPECS: list[Spec] | None = None


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints the report of the ptxas run that made the cubin


def _ptxas_report(ptx: str, arch: str) -> str:
    """Fallback when Triton printed no report: run Triton's bundled ptxas on the PTX ourselves."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name=sm_{arch}", src, "-o", src + ".o"],
                              capture_output=True, text=True)
        return proc.stdout + proc.stderr


def _signature(fn, backend, args: tuple, constexprs: dict, options: dict):
    """``(signature, constexprs, attrs, options)`` for ``ASTSource``/``triton.compile``, exactly as a launch.

    Version-dependent part: Triton's launch binder (``create_function_from_signature`` + ``_pack_args``, the
    same in 3.6 and 3.9) specializes the arguments: pointer and integer types, ``tt.divisibility`` 16 for
    16-aligned pointers and integers divisible by 16, integers equal to 1 as constexprs; the constexprs are
    keyed by argument-index tuples and the signature lists them as "constexpr". (ASTSource also accepts
    constexprs keyed by name; the binder's form is used so that the specialization cannot drift.)
    """
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**constexprs, **options}
    bound, specialization, opts = binder(*args, **kwargs)
    opts, signature, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    return signature, consts, attrs, opts.__dict__


def _error_row(specs: list[Spec], spec_index: int, arch: str, config_index: int, kept: bool,
               error: str | None = None) -> dict:
    spec = specs[spec_index]
    return {"kernel": spec.kernel, "spec": spec.label, "arch": arch,
            "config": config_label(_all_configs(spec.kernel)[config_index]), "kept": kept, "error": error,
            "registers": None, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 0, "static_smem": 0,
            "wgmma": False, "mma": "-", "loads": "-", "ptx_target": None, "seconds": 0.0}


def compile_job(spec_index: int, arch: str, config_index: int, kept: bool) -> dict:
    """Compile one (specialization, target, config) and return its row (see :func:`problems`)."""
    global _SPECS
    if _SPECS is None:
        _SPECS = _specs()
    spec = _SPECS[spec_index]
    config = _all_configs(spec.kernel)[config_index]
    row = _error_row(_SPECS, spec_index, arch, config_index, kept)
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend

        target = GPUTarget("cuda", int(arch.rstrip("a")), 32)  # Triton itself picks sm_90a for capability 90
        fn = _jit_fn(spec.kernel)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        signature, consts, attrs, opts = _signature(fn, make_backend(target), spec.args,
                                                    {**spec.constexprs, **spec.per_arch.get(arch, {}),
                                                     **config.kwargs}, options)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, consts, attrs), target=target, options=opts)
        ptx = compiled.asm["ptx"]
        report = parse_ptxas(log.getvalue()) or parse_ptxas(_ptxas_report(ptx, arch))
        if report is None:
            raise RuntimeError("no ptxas report")
        target_line = re.search(r"^\.target\s+(\S+)", ptx, re.M)
        row.update({k: report[k] for k in ("registers", "spill_stores", "spill_loads", "stack", "static_smem")})
        row.update(shared=max(int(compiled.metadata.shared), report["static_smem"]), wgmma="wgmma" in ptx,
                   mma=mma_kind(ptx), loads=load_kind(ptx), ptx_target=target_line.group(1) if target_line else None)
        if spec.per_arch.get(arch, {}).get("TMA") and row["loads"] != "tma":
            raise RuntimeError(f"compiled with TMA=True but the PTX has no tensor-memory copy ({row['loads']})")
    except Exception as exc:  # noqa: BLE001  (reported as a compile error of this config)
        text = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: " + " | ".join(text[-6:])[:600]
    row["seconds"] = time.perf_counter() - t0
    return row


# ------------------------------------------------------------------------------------------------- output
def _spills(row: dict) -> bool:
    return bool(row["spill_stores"] or row["spill_loads"] or row["stack"])


def _verdict(rows: list[dict]) -> str:
    """One word for one or more compiles of a config: kept / pruned, and why it fails when it does."""
    bad = sorted({p.split(" (")[0] for r in rows for p in problems(r)})
    if bad:
        return "FAIL: " + ", ".join(bad)
    if all(r["kept"] for r in rows):
        return "kept"
    return "pruned" + (" (spills)" if any(_spills(r) for r in rows) else "") + \
        (" (error)" if any(r["error"] for r in rows) else "")


HEADER = (f"{'kernel':<14} {'arch':<7} {'specialization':<30} {'config':<28} {'regs':>7} {'spl.st':>6} "
          f"{'spl.ld':>6} {'stack':>5} {'smem':>7} {'mma':>9} {'loads':>8}  verdict")


def _line(kernel, arch, spec, config, rows: list[dict]) -> str:
    regs = [r["registers"] for r in rows if r["registers"] is not None]
    regs = "-" if not regs else f"{min(regs)}" if min(regs) == max(regs) else f"{min(regs)}-{max(regs)}"
    mma = "/".join(sorted({r["mma"] for r in rows if not r["error"]})) or "-"
    loads = "/".join(sorted({r.get("loads", "-") for r in rows if not r["error"]})) or "-"
    return (f"{kernel:<14} sm_{arch:<4} {spec:<30} {config:<28} {regs:>7} "
            f"{max(r['spill_stores'] for r in rows):>6} {max(r['spill_loads'] for r in rows):>6} "
            f"{max(r['stack'] for r in rows):>5} {max(r['shared'] for r in rows):>7} {mma:>9} {loads:>8}  "
            f"{_verdict(rows)}")


def spec_group(label: str) -> str:
    """The part of a specialization label that sets the tile shapes: head dim or V, and the dtype."""
    return " ".join(w for w in label.split() if w[:2] in ("D=", "V=") or w in ("bf16", "fp16", "fp32"))


def table(rows: list[dict], verbose: bool = False) -> list[str]:
    """Rows of the report: one per compile with ``verbose``, else one per (kernel, arch, config, head dim or V,
    dtype) over the masking modes / variants (registers as a range, spills and shared memory at their max)."""
    lines = [HEADER, "-" * len(HEADER)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["kernel"], r["arch"], r["spec"] if verbose else spec_group(r["spec"]), r["config"])
        groups.setdefault(key, []).append(r)
    order = {k: i for i, k in enumerate(KERNELS)}
    for key in sorted(groups, key=lambda k: (order[k[0]], k[1], k[2])):
        lines.append(_line(*key, groups[key]))
        for r in groups[key]:
            if r["error"]:
                lines.append(f"    {r['spec']}: {r['error']}")
    return lines


def summary(rows: list[dict]) -> list[str]:
    """One line per (kernel, arch): specializations, compiles, kept configs per specialization, failures."""
    lines = [f"{'kernel':<14} {'arch':<7} {'specs':>5} {'compiled':>8} {'kept':>5} {'kept/spec':>9} {'failing':>7} "
             f"{'pruned+spill':>12} {'regs (kept)':>11} {'max smem':>8}  mma, loads (kept)"]
    keys = sorted({(r["kernel"], r["arch"]) for r in rows}, key=lambda k: (KERNELS.index(k[0]), k[1]))
    for kernel, arch in keys:
        rs = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
        kept = [r for r in rs if r["kept"]]
        per_spec = [sum(r["kept"] for r in rs if r["spec"] == s) for s in {r["spec"] for r in rs}]
        regs = [r["registers"] for r in kept if r["registers"] is not None]
        mma = "/".join(sorted({r["mma"] for r in kept if not r["error"]})) or "-"
        loads = "/".join(sorted({r.get("loads", "-") for r in kept if not r["error"]})) or "-"
        lines.append(f"{kernel:<14} sm_{arch:<4} {len(per_spec):>5} {len(rs):>8} {len(kept):>5} "
                     f"{f'{min(per_spec)}-{max(per_spec)}':>9} {sum(bool(problems(r)) for r in rs):>7} "
                     f"{sum(not r['kept'] and _spills(r) for r in rs):>12} "
                     f"{(f'{min(regs)}-{max(regs)}' if regs else '-'):>11} "
                     f"{max((r['shared'] for r in kept), default=0):>8}  {mma}, {loads}")
    return lines


class _Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else a line every 10 %."""

    def __init__(self, total: int):
        self.total, self.done, self.bar, self.t0 = total, 0, None, time.perf_counter()
        try:
            if sys.stderr.isatty():
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="kernel", file=sys.stderr)
        except ImportError:
            pass

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(f"  compiled {self.done}/{self.total} ({time.perf_counter() - self.t0:.0f} s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="90a,80", help="comma-separated targets among 90a, 80 (default 90a,80)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    ap.add_argument("--kernel", nargs="+", choices=KERNELS, help="only these kernels")
    ap.add_argument("--json", metavar="OUT.json", help="write every row and the summary as JSON")
    ap.add_argument("--all", action="store_true", help="also compile the configs the pruners drop (report only)")
    ap.add_argument("--quiet", action="store_true", help="print only failing compiles and the summary")
    ap.add_argument("--verbose", action="store_true", help="one row per compile (default: the masking modes "
                    "and variants of a config on one row)")
    args = ap.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown or not archs:
        ap.error(f"unknown arch(s) {unknown}; choose among 90a, 80")

    t0 = time.perf_counter()
    os.environ.pop("TRITON_INTERPRET", None)  # must precede importing triton: the check compiles for GPUs
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences a warning)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch
    import triton

    from aimv2_kernels.triton.tuning import MAX_CONFIGS_ENV, max_configs

    specs = _specs()
    wanted = set(args.kernel or KERNELS)
    jobs, empty = [], []
    for i, spec in enumerate(specs):
        if spec.kernel not in wanted:
            continue
        for arch in archs:
            try:
                kept = _kept_indices(spec, arch)
            except RuntimeError as exc:  # a pruner left nothing (TunedKernel.kept raises)
                empty.append(f"{spec.kernel} {spec.label} sm_{arch}: {exc}")
                continue
            if not kept:
                empty.append(f"{spec.kernel} {spec.label} sm_{arch}: no config kept")
            for c in (_candidate_indices(spec) if args.all else kept):
                jobs.append((i, arch, c, c in kept))
    print(f"triton {triton.__version__}, torch {torch.__version__}; targets {', '.join('sm_' + a for a in archs)}; "
          f"{len(jobs)} compiles of {len({j[0] for j in jobs})} specializations in {args.jobs} processes")
    if max_configs() is not None:
        print(f"{MAX_CONFIGS_ENV}={max_configs()}: at most that many configs per specialization, as at run time")

    # Attention first: the longest compiles, so that the pool ends evenly.
    order = sorted(range(len(jobs)), key=lambda j: (not specs[jobs[j][0]].kernel.startswith("attn_bwd_d"),
                                                    not specs[jobs[j][0]].kernel.startswith("attn"), j))
    cache_dir = tempfile.mkdtemp(prefix="aimv2-triton-check-")
    rows: list[dict | None] = [None] * len(jobs)
    progress = _Progress(len(jobs))
    try:
        with concurrent.futures.ProcessPoolExecutor(
                max(1, args.jobs), mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(cache_dir,)) as pool:
            futures = {pool.submit(compile_job, *jobs[j]): j for j in order}
            for fut in concurrent.futures.as_completed(futures):
                try:
                    rows[futures[fut]] = fut.result()
                except Exception as exc:  # noqa: BLE001  (a worker died, e.g. a crash inside Triton)
                    rows[futures[fut]] = _error_row(specs, *jobs[futures[fut]], f"{type(exc).__name__}: {exc}")
                progress.update()
    finally:
        progress.close()
        shutil.rmtree(cache_dir, ignore_errors=True)
    wall = time.perf_counter() - t0

    print()
    if args.quiet:
        failing = [r for r in rows if problems(r)]
        print("\n".join(table(failing, verbose=True)) if failing else "no failing config")
    else:
        print("\n".join(table(rows, verbose=args.verbose)))
    print()
    targets = sorted({(r["arch"], r["ptx_target"]) for r in rows if r["ptx_target"]})
    print("PTX targets: " + ", ".join(f"sm_{a} -> .target {t}" for a, t in targets))
    print("\n".join(summary(rows)))
    for line in empty:
        print(f"EMPTY: {line}")
    failed = [r for r in rows if problems(r)]
    for r in failed:
        print(f"FAIL: {r['kernel']} {r['spec']} sm_{r['arch']} {r['config']}: {'; '.join(problems(r))}")
    status = exit_status(rows, empty)
    print(f"triton_compile_check: {'FAILED' if status else 'ok'}: {len(rows)} compiles, {len(failed)} failing, "
          f"wall time {wall:.1f} s (triton {triton.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "archs": archs,
                       "wall_seconds": wall, "status": status, "summary": summary(rows), "empty": empty,
                       "rows": rows}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
