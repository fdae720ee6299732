"""Run the emulated CUDA prefix-attention kernels (libemu_attn.so, see build.py) against the PyTorch reference.

    python tools/cuda_emulator/run_cases.py [--quick] [--only SUBSTRING] [--lib PATH]   (after build.py)

Every case: forward (out, lse) and backward (dq, dk, dv) of the kernels, outputs poisoned with NaN before the
launch, compared with aimv2_kernels.testing.assert_within_budget (k = 2 forward, 3 gradients) against the
float64 oracle / same-dtype reference (prefix_attention_reference). The backward is fed the kernel's own out
and lse, as in training.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import pathlib
import sys
import time

import torch

from aimv2_kernels.reference.attention import prefix_attention_reference, prefix_mask
from aimv2_kernels.testing import assert_within_budget, error_budget, max_abs_err, single_key_floor

HERE = pathlib.Path(__file__).resolve().parent
OUT_DIR = HERE.parents[1] / "build" / "cuda_emulator"
CODE = {torch.bfloat16: 1, torch.float16: 2}
lib: ctypes.CDLL


def load(path: str) -> None:
    global lib
    lib = ctypes.CDLL(path)
    lib.emu_forward.restype = ctypes.c_char_p
    lib.emu_backward.restype = ctypes.c_char_p
    lib.emu_launches.restype = ctypes.c_long
    lib.emu_mmas.restype = ctypes.c_long


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def i64(*xs):
    return [ctypes.c_int64(x) for x in xs]


def kernel_forward(q, k, v, prefix, causal, scale):
    B, H, S, D = q.shape
    out = torch.full((B, H, S, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, S), float("nan"), dtype=torch.float32)
    pre = prefix.to(torch.int32).contiguous() if (causal and prefix is not None) else None
    err = lib.emu_forward(CODE[q.dtype], B, H, S, D, ptr(q), *i64(*q.stride()[:3]), ptr(k), *i64(*k.stride()[:3]),
                          ptr(v), *i64(*v.stride()[:3]), ptr(pre), int(causal), ctypes.c_float(scale), ptr(out),
                          ptr(lse))
    assert err is None, err
    return out, lse


def kernel_backward(dout, q, k, v, o, lse, prefix, causal, scale):
    B, H, S, D = q.shape
    grads = [torch.full((B, H, S, D), float("nan"), dtype=q.dtype) for _ in range(3)]
    delta = torch.full((B, H, S), float("nan"), dtype=torch.float32)
    pre = prefix.to(torch.int32).contiguous() if (causal and prefix is not None) else None
    err = lib.emu_backward(CODE[q.dtype], B, H, S, D, ptr(dout), *i64(*dout.stride()[:3]), ptr(q),
                           *i64(*q.stride()[:3]), ptr(k), *i64(*k.stride()[:3]), ptr(v), *i64(*v.stride()[:3]),
                           ptr(o), *i64(*o.stride()[:3]), ptr(lse.contiguous()), ptr(delta), ptr(pre), int(causal),
                           ctypes.c_float(scale), *(ptr(g) for g in grads))
    assert err is None, err
    return grads


def lse2(q, k, prefix, causal, scale, dtype):
    """log2 sum_j 2^(scale log2(e) q.k_j) over visible keys, computed in `dtype` from the upcast inputs."""
    B, H, S, D = q.shape
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    s = s.masked_fill(~prefix_mask(prefix, B, S, causal=causal), float("-inf"))
    return torch.logsumexp(s, dim=-1) / math.log(2)


def make_qkv(B, H, S, D, dtype, layout, g):
    if layout == "strided":  # permuted views of a fused (B, S, 3, H, D) projection
        base = torch.randn(B, S, 3, H, D, generator=g).to(dtype)
        return [base[:, :, i].permute(0, 2, 1, 3) for i in range(3)]
    return [torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3)]


def run_case(name, B, H, S, D, dtype, prefix, causal, scale=None, layout="contig", seed=0, poison=None,
             check_rows=None):
    """poison = ("kv", r): NaN in K/V rows >= r (forward: only query rows < check_rows compared; dq likewise).
    poison = ("qdo", r): NaN in Q/dO rows < r (only dk/dv rows >= check_rows compared)."""
    g = torch.Generator().manual_seed(seed)
    scale = D ** -0.5 if scale is None else scale
    q, k, v = make_qkv(B, H, S, D, dtype, layout, g)
    dout = torch.randn(B, H, S, D, generator=g).to(dtype)
    t0 = time.time()
    # Reference and oracle (clean inputs).
    ref_in = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    ora_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    pre_ref = prefix if causal else None
    ref = prefix_attention_reference(*ref_in, pre_ref, causal=causal, scale=scale)
    ora = prefix_attention_reference(*ora_in, pre_ref, causal=causal, scale=scale)
    ref.backward(dout)
    ora.backward(dout.double())
    ref_lse = lse2(q, k, pre_ref, causal, scale, torch.float32)
    ora_lse = lse2(q, k, pre_ref, causal, scale, torch.float64)
    # Kernel inputs (maybe poisoned).
    kq, kk, kv, kdo = q, k, v, dout
    if poison is not None:
        kind, r = poison
        kq, kk, kv, kdo = (x.clone() for x in (q, k, v, dout))
        if kind == "kv":
            kk[:, :, r:] = float("nan")
            kv[:, :, r:] = float("nan")
        else:
            kq[:, :, :r] = float("nan")
            kdo[:, :, :r] = float("nan")
    out, lse = kernel_forward(kq, kk, kv, prefix, causal, scale)
    if poison is not None and poison[0] == "qdo":  # the backward needs clean statistics for the later rows
        out_b, lse_b = kernel_forward(q, k, v, prefix, causal, scale)
    else:
        out_b, lse_b = out, lse
    dq, dk, dv = kernel_backward(kdo, kq, kk, kv, out_b, lse_b, prefix, causal, scale)
    results = {}
    fails = []
    rows_q = slice(None) if (poison is None or poison[0] != "kv") else slice(0, check_rows)
    rows_k = slice(None) if (poison is None or poison[0] != "qdo") else slice(check_rows, None)
    floor_s1 = single_key_floor(q, k, v, dout) if S == 1 else None
    checks = [("out", out, ref, ora, 2.0, None, rows_q), ("lse", lse, ref_lse, ora_lse, 2.0, None, rows_q),
              ("dq", dq, ref_in[0].grad, ora_in[0].grad, 3.0, floor_s1, rows_q),
              ("dk", dk, ref_in[1].grad, ora_in[1].grad, 3.0, floor_s1, rows_k),
              ("dv", dv, ref_in[2].grad, ora_in[2].grad, 3.0, None, rows_k)]
    if poison is not None and poison[0] == "kv":
        checks = checks[:3]
    if poison is not None and poison[0] == "qdo":
        checks = checks[3:]
    for nm, a, r, o, kf, floor, rows in checks:
        a, r, o = a[:, :, rows], r[:, :, rows], o[:, :, rows]
        err = max_abs_err(a, o) if torch.isfinite(a).all() else float("nan")
        budget = error_budget(r, o, k=kf, floor=floor)
        results[nm] = (err, budget)
        try:
            assert_within_budget(a, r, o, k=kf, floor=floor, name=nm)
        except AssertionError as e:
            fails.append(str(e))
    dt = time.time() - t0
    status = "FAIL" if fails else "ok"
    desc = " ".join(f"{nm}={e:.2e}/{b:.2e}" for nm, (e, b) in results.items())
    print(f"[{status}] {name}: {desc} ({dt:.1f}s)", flush=True)
    for f in fails:
        print("    ", f, flush=True)
    return not fails


def cases(quick):
    out = []
    dtypes = [torch.bfloat16, torch.float16]
    for dtype in dtypes:
        dn = "bf16" if dtype == torch.bfloat16 else "fp16"
        for D in (64, 128):
            for S in ((1, 17, 65) if quick else (1, 17, 64, 65, 130)):
                B = 4
                edges = torch.tensor([0, 1, max(S - 1, 0), S])
                out.append((f"{dn} D={D} S={S} prefix=[0,1,S-1,S]", dict(B=B, H=1, S=S, D=D, dtype=dtype,
                            prefix=edges, causal=True)))
                if quick:
                    continue
                rnd = torch.randint(0, S + 1, (B,), generator=torch.Generator().manual_seed(S + D))
                out.append((f"{dn} D={D} S={S} prefix=random {rnd.tolist()}", dict(B=B, H=1, S=S, D=D,
                            dtype=dtype, prefix=rnd, causal=True, seed=1)))
            S = 65 if quick else 130
            out.append((f"{dn} D={D} S={S} non-causal", dict(B=2, H=2, S=S, D=D, dtype=dtype, prefix=None,
                        causal=False, seed=2)))
            out.append((f"{dn} D={D} S={S} causal, no prefix", dict(B=2, H=2, S=S, D=D, dtype=dtype,
                        prefix=None, causal=True, seed=3)))
            out.append((f"{dn} D={D} S={S} strided qkv, scale=0.3, prefix", dict(B=2, H=3, S=S, D=D,
                        dtype=dtype, prefix=torch.tensor([5, 100 if S > 100 else S // 2]), causal=True,
                        scale=0.3, layout="strided", seed=4)))
            # Query tile 1 ([64, 128)) fully visible for batch 0 (prefix 128 -> tile (64..127, keys 0..127)
            # unmasked); masked tiles / tiles never loaded for batch 1 (prefix 3).
            out.append((f"{dn} D={D} S=128 full-visible tiles + skipped tiles", dict(B=2, H=1, S=128, D=D,
                        dtype=dtype, prefix=torch.tensor([128, 3]), causal=True, seed=5)))
            # NaN in K/V rows >= 64, prefixes <= 64: query rows < 64 must stay finite and exact.
            out.append((f"{dn} D={D} S=130 NaN K/V rows>=64, prefix<=64", dict(B=3, H=1, S=130, D=D, dtype=dtype,
                        prefix=torch.tensor([0, 64, 20]), causal=True, seed=6, poison=("kv", 64),
                        check_rows=64)))
            # NaN in Q/dO rows < 64, prefixes <= 64: dk/dv of keys >= 64 must stay finite and exact.
            out.append((f"{dn} D={D} S=130 NaN Q/dO rows<64, prefix<=64", dict(B=3, H=1, S=130, D=D,
                        dtype=dtype, prefix=torch.tensor([0, 64, 20]), causal=True, seed=7, poison=("qdo", 64),
                        check_rows=64)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=str(OUT_DIR / "libemu_attn.so"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None)
    ap.add_argument("--smem-limit", type=int, default=None,
                    help="the device's opt-in shared memory per block in bytes (default 227 KB, sm_90; "
                         "101376 for sm_86/sm_89, 166912 for sm_80)")
    args = ap.parse_args()
    load(args.lib)
    if args.smem_limit is not None:
        lib.emu_set_smem_limit(ctypes.c_long(args.smem_limit))
    torch.set_num_threads(1)
    ok = True
    for name, kw in cases(args.quick):
        if args.only and args.only not in name:
            continue
        ok &= run_case(name, **kw)
    print(f"launches {lib.emu_launches()}, warp mmas {lib.emu_mmas()}")
    print("ALL OK" if ok else "FAILURES")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
