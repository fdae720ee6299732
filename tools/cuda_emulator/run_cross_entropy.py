"""Run the emulated CUDA cross-entropy kernel (libemu_cross_entropy.so, see build.py) against the CPU op and oracle.

    python tools/cuda_emulator/run_cross_entropy.py [--quick] [--lib PATH]   (after build.py; exit code 1 on failure)

Every case launches the real launcher aimv2::cross_entropy_rows_cuda, called as csrc/cuda/cross_entropy_glue.cpp
does, four times: forward (loss, lse, grad) into a separate grad and in place (grad = logits), and the backward
form (grad from the saved lse) separate and in place. Outputs are poisoned with NaN. Checks:
  * against the float64 oracle (cross_entropy_reference on float64 logits, reduction="none"; lse = logsumexp;
    the gradient of sum(scale_r * loss_r) by autograd): aimv2_kernels.testing.assert_within_budget with the
    package's CPU op (torch.ops.aimv2.cross_entropy_rows_out, same dtype) as the reference, k = 2 for loss and
    lse, 3 for gradients;
  * agreement with the CPU op, in ulps of the output dtype at max(|cpu|, 1% of the row's max) (true spacing,
    subnormals included): bf16 / fp16 gradients within 1 ulp (one rounding of an fp32 value that is far more
    accurate than a 16-bit ulp); fp32 loss, lse and gradients are only reported (different summation orders; the
    oracle budget is their check).
Cases: V = 1, 33, 257, 1000, 5000, 20001, 40000 (128 / 256 / 512 threads), row layouts contiguous, padded
(every row alignment), storage offset 1, column stride 2 (copied by the glue); grad rows at another alignment
than the logits (scalar stores); smoothing / z-loss off, 0.1 / 1e-4, 0.3 / 1e-3; grad_scale none, scalar,
per row; row 0 ignored; |x| up to 1e4 (6e3 for fp16); fp32, bf16, fp16 (--quick: one dtype per V). Then
out-of-range targets: NaN loss and gradient rows, no read outside the row.
"""
from __future__ import annotations

import argparse
import ctypes
import pathlib
import sys
import time

import torch

import aimv2_kernels._C  # noqa: F401  (registers the CPU ops)
from aimv2_kernels.reference.cross_entropy import cross_entropy_reference
from aimv2_kernels.testing import FORWARD_K, GRADIENT_K

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compare import budget, ptr, ulps  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
OUT_DIR = HERE.parents[1] / "build" / "cuda_emulator"
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
GRAD_ULPS = {torch.bfloat16: 1.0, torch.float16: 1.0}  # fp32: reported only
IGNORE = -100
lib: ctypes.CDLL


def kernel(logits, targets, ls, z, saved_lse, grad_scale, loss, lse, grad, in_place):
    """The emulated kernel, called as the glue does. in_place: the gradient overwrites `logits`."""
    n, V = logits.shape
    tg = targets.long().contiguous()
    sc = None if grad_scale is None else grad_scale.float().contiguous()
    sl = None if saved_lse is None else saved_lse.double().contiguous()
    x = logits if logits.stride(1) == 1 or V == 1 else logits.contiguous()
    if in_place:
        assert x is logits
        grad = logits
    err = lib.emu_cross_entropy(CODE[logits.dtype], ptr(x), ctypes.c_int64(n), ctypes.c_int64(V),
                                ctypes.c_int64(x.stride(0)), ptr(grad),
                                ctypes.c_int64(0 if grad is None else grad.stride(0)), ptr(tg),
                                ctypes.c_int64(IGNORE), ctypes.c_float(ls), ctypes.c_float(z), ptr(sc),
                                ctypes.c_int(1 if sc is not None and sc.numel() > 1 else 0), ptr(sl), ptr(loss),
                                ptr(lse))
    assert err is None, err


def make_logits(n, V, dtype, layout, scale, g):
    x = (torch.randn(n, V, generator=g) * scale).to(dtype)
    return relayout(x, layout)


def relayout(x, layout):
    """A copy of x with the given memory layout."""
    n, V = x.shape
    if layout == "padded":  # row stride V + 3: rows at every alignment
        buf = torch.zeros(n, V + 3, dtype=x.dtype)
        buf[:, :V] = x
        return buf[:, :V]
    if layout == "offset":
        buf = torch.zeros(n * V + 1, dtype=x.dtype)
        buf[1:] = x.flatten()
        return buf[1:].view(n, V)
    if layout == "colstride":
        buf = torch.zeros(n, 2 * V, dtype=x.dtype)
        buf[:, ::2] = x
        return buf[:, ::2]
    return x.clone()


def oracle(x, t, ls, z, gs):
    """float64 loss rows, lse, and d(sum(scale_r * loss_r))/dx."""
    xd = x.double().requires_grad_(True)
    loss = cross_entropy_reference(xd, t.long(), ignore_index=IGNORE, label_smoothing=ls, z_loss=z, reduction="none")
    w = torch.ones_like(loss) if gs is None else gs.double().expand_as(loss)
    (loss * w).sum().backward()
    return loss.detach(), torch.logsumexp(x.double(), dim=-1), xd.grad


def check_grad(res, key, got, ref, orc, dtype):
    res[key + "_budget"] = budget(got, ref, orc, GRADIENT_K, key)
    res[key + "_ulps"] = ulps(got, ref, dtype)
    assert res[key + "_ulps"] <= GRAD_ULPS.get(dtype, float("inf")), \
        f"{key}: {res[key + '_ulps']:.3g} ulps from the CPU op"


def run_case(x, t, ls, z, gs, layout, dtype):
    n, V = x.shape
    oloss, olse, ograd = oracle(x, t, ls, z, gs)
    res = {}
    # Forward: loss, lse, grad.
    rl, rlse = torch.full((n,), float("nan")), torch.full((n,), float("nan"), dtype=torch.float64)
    rgrad = torch.full((n, V), float("nan"), dtype=dtype)
    torch.ops.aimv2.cross_entropy_rows_out(x, t, IGNORE, ls, z, None, gs, rl, rlse, rgrad)
    for in_place in (False, True):
        if in_place and layout == "colstride":
            continue  # the glue copies such logits: no in-place variant
        loss, lse = torch.full((n,), float("nan")), torch.full((n,), float("nan"), dtype=torch.float64)
        if in_place:
            gg = relayout(x, layout)
            kernel(gg, t, ls, z, None, gs, loss, lse, None, True)
        else:
            gbuf = torch.full((n, V + 1), float("nan"), dtype=dtype)  # grad rows at another alignment
            gg = gbuf[:, 1:] if V > 1 else gbuf[:, :1]
            kernel(x, t, ls, z, None, gs, loss, lse, gg, False)
        res["loss_budget"] = budget(loss, rl, oloss, FORWARD_K, "loss")
        res["lse_budget"] = budget(lse, rlse, olse, FORWARD_K, "lse")
        res["loss_ulps"] = ulps(loss[None], rl[None], torch.float32)
        res["lse_ulps"] = ulps(lse[None], rlse[None], torch.float32)
        check_grad(res, "inplace_grad" if in_place else "grad", gg, rgrad, ograd, dtype)
    # Backward form: grad from the saved lse (the CPU op's).
    rgrad = torch.full((n, V), float("nan"), dtype=dtype)
    torch.ops.aimv2.cross_entropy_rows_out(x, t, IGNORE, ls, z, rlse, gs, None, None, rgrad)
    for in_place in (False, True):
        if in_place and layout == "colstride":
            continue
        if in_place:
            gg = relayout(x, layout)
            kernel(gg, t, ls, z, rlse, gs, None, None, None, True)
        else:
            gg = torch.full((n, V), float("nan"), dtype=dtype)
            kernel(x, t, ls, z, rlse, gs, None, None, gg, False)
        check_grad(res, "bwd_inplace_grad" if in_place else "bwd_grad", gg, rgrad, ograd, dtype)
    return res


def bad_targets() -> list[str]:
    """Targets outside [0, V) (not ignore_index): NaN loss and grad rows; the ignored row: lse, zero grad."""
    errors = []
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([50, -1, IGNORE])
    loss = torch.full((3,), float("nan"))
    lse = torch.full((3,), float("nan"), dtype=torch.float64)
    grad = torch.full((3, 50), float("nan"))
    kernel(x, t, 0.0, 0.0, None, None, loss, lse, grad, False)
    if not (loss[:2].isnan().all() and loss[2] == 0):
        errors.append(f"loss {loss.tolist()}")
    if not (grad[:2].isnan().all() and (grad[2] == 0).all()):
        errors.append("forward grad rows not NaN, NaN, 0")
    lse_err = (lse - torch.logsumexp(x.double(), 1)).abs().max().item()
    if not lse_err <= 1e-5:
        errors.append(f"lse error {lse_err:.3g}")
    grad = torch.full((3, 50), float("nan"))
    kernel(x, t, 0.0, 0.0, lse, None, None, None, grad, False)
    if not (grad[:2].isnan().all() and (grad[2] == 0).all()):
        errors.append("backward grad rows not NaN, NaN, 0")
    return errors


CASES = [  # V, rows, layout, logit scale (fp16: at most 6e3)
    (1, 3, "contig", 1.0), (33, 5, "padded", 3.0), (1000, 4, "offset", 3.0), (5000, 3, "padded", 5.0),
    (20001, 2, "contig", 2.0), (40000, 2, "padded", 1e4), (257, 4, "colstride", 3.0),
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SETTINGS = ((0.0, 0.0, None), (0.1, 1e-4, "scalar"), (0.3, 1e-3, "rows"))  # smoothing, z-loss, grad_scale


def main() -> int:
    global lib
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", default=str(OUT_DIR / "libemu_cross_entropy.so"))
    ap.add_argument("--quick", action="store_true", help="one dtype per V instead of three")
    args = ap.parse_args()
    lib = ctypes.CDLL(args.lib)
    lib.emu_cross_entropy.restype = ctypes.c_char_p
    lib.emu_launches.restype = ctypes.c_long
    t0 = time.time()
    failures, checks, worst, seed = [], 0, {}, 0
    for ci, (V, n, layout, xs) in enumerate(CASES):
        for dtype in ([DTYPES[ci % 3]] if args.quick else DTYPES):
            for ls, z, scale_kind in SETTINGS:
                seed += 1
                g = torch.Generator().manual_seed(seed)
                x = make_logits(n, V, dtype, layout, min(xs, 6e3) if dtype == torch.float16 else xs, g)
                t = torch.randint(0, V, (n,), generator=g)
                t[0] = IGNORE
                gs = None if scale_kind is None else (
                    torch.tensor([0.7]) if scale_kind == "scalar" else torch.rand(n, generator=g) + 0.2)
                name = f"{str(dtype)[6:]} V={V} n={n} {layout} |x|~{xs:g} smoothing={ls} z={z} scale={scale_kind}"
                try:
                    res = run_case(x, t, ls, z, gs, layout, dtype)
                    for k, v in res.items():
                        key = (str(dtype)[6:], k)
                        worst[key] = max(worst.get(key, 0.0), v)
                    print(f"[ok]   {name} " + " ".join(f"{k}={v:.3g}" for k, v in res.items()), flush=True)
                except AssertionError as e:
                    failures.append(name)
                    print(f"[FAIL] {name}: {e}", flush=True)
                checks += 1
    errors = bad_targets()
    checks += 1
    if errors:
        failures.append("bad targets")
        print("[FAIL] bad targets:", "; ".join(errors))
    else:
        print("[ok]   bad targets: NaN loss / grad rows, ignored row: lse and zero grad")
    print("worst (budget: fraction of the oracle budget used; ulps: distance from the CPU op):")
    for (d, k), v in sorted(worst.items()):
        print(f"  {d:9s} {k:24s} {v:.3g}")
    print(f"{checks - len(failures)}/{checks} passed, {lib.emu_launches()} launches, {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
