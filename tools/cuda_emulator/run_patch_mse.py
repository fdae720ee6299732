"""Run the emulated CUDA patch-MSE kernel (libemu_patch_mse.so, see build.py) against the CPU op and the oracle.

    python tools/cuda_emulator/run_patch_mse.py [--quick] [--lib PATH]   (after build.py; exit code 1 on failure)

Every case launches the real launcher aimv2::patch_mse_rows_cuda three times (rows only; grad only with
per-row grad_rows; rows and grad), into outputs poisoned with NaN, and checks:
  * against the float64 oracle (patch_mse_loss_reference on float64 inputs, reduction="none"; its gradient by
    autograd): aimv2_kernels.testing.assert_within_budget, with the package's CPU op
    (torch.ops.aimv2.patch_mse_rows_out, same dtype) as the reference: k = 2 for rows, 3 for the gradient;
  * agreement with the CPU op, in ulps of the output dtype at max(|cpu|, 1% of the row's max) (the true spacing,
    subnormals included): bf16 / fp16 gradients must agree within 1 ulp (both round an fp32 value that is far more
    accurate than a 16-bit ulp, once); fp32 rows and gradients are only reported (the two sum P values in
    different orders, and pred - (x - mean) / std cancels, so their distance has no tight bound: the oracle
    budget above is their check).
Cases: several shapes incl. p = 14 and 16, C = 1..4, multi-segment patch rows, a patch too large for vectors;
channels-last / misaligned / padded / strided images; misaligned / transposed / padded pred; prefix_lens None,
0, inside, past the end; target_offset 0..5; fp32, bf16, fp16 (--quick: one dtype per case).
"""
from __future__ import annotations

import argparse
import ctypes
import pathlib
import sys
import time

import torch

import aimv2_kernels._C  # noqa: F401  (registers the CPU ops)
from aimv2_kernels.reference.patch_mse import patch_mse_loss_reference
from aimv2_kernels.testing import FORWARD_K, GRADIENT_K

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compare import budget, ptr, ulps  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
OUT_DIR = HERE.parents[1] / "build" / "cuda_emulator"
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
GRAD_ULPS = {torch.bfloat16: 1.0, torch.float16: 1.0}  # fp32: reported only
EPS = 1e-6
lib: ctypes.CDLL


def i64s(vals):
    return (ctypes.c_int64 * len(vals))(*vals)


def plan(pred, images, p, grad):
    out = (ctypes.c_int64 * 4)()
    lib.emu_patch_mse_plan(ctypes.c_size_t(images.data_ptr()), i64s(images.shape), i64s(images.stride()),
                           ctypes.c_size_t(pred.data_ptr()), i64s(pred.shape), i64s(pred.stride()),
                           ctypes.c_size_t(0 if grad is None else grad.data_ptr()), ctypes.c_int64(p),
                           ctypes.c_int64(images.element_size()), out)
    return dict(image_vec=out[0], pred_vec=out[1], G=out[2], nseg=out[3])


def kernel(pred, images, p, prefix, off, grad_rows, want_rows, want_grad):
    """The emulated kernel, called as csrc/cuda/patch_mse_glue.cpp does (int64 prefix, contiguous fp32 grad_rows)."""
    B, L, _ = pred.shape
    rows = torch.full((B, L), float("nan")) if want_rows else None
    grad = torch.full(pred.shape, float("nan"), dtype=pred.dtype) if want_grad else None
    pl = plan(pred, images, p, grad)
    pre = None if prefix is None else prefix.to(torch.int64).contiguous()
    gr = None if grad_rows is None else grad_rows.float().contiguous()
    err = lib.emu_patch_mse(CODE[pred.dtype], ptr(pred), i64s(pred.shape), i64s(pred.stride()), ptr(images),
                            i64s(images.shape), i64s(images.stride()), ctypes.c_int64(p), ctypes.c_int64(off),
                            ptr(pre), ctypes.c_float(EPS), ptr(gr), ptr(rows), ptr(grad))
    assert err is None, err
    return rows, grad, pl


def cpu_op(pred, images, p, prefix, off, grad_rows, want_rows, want_grad):
    B, L, _ = pred.shape
    rows = torch.full((B, L), float("nan")) if want_rows else None
    grad = torch.full(pred.shape, float("nan"), dtype=pred.dtype) if want_grad else None
    torch.ops.aimv2.patch_mse_rows_out(pred, images, p, prefix, off, EPS, grad_rows, rows, grad)
    return rows, grad


def oracle(pred, images, p, prefix, off, grad_rows):
    """float64 rows and d(sum(grad_rows * rows))/d(pred)."""
    x = pred.double().requires_grad_(True)
    rows = patch_mse_loss_reference(x, images.double(), p, prefix, target_offset=off, eps=EPS, reduction="none")
    w = torch.ones_like(rows) if grad_rows is None else grad_rows.double()
    (rows * w).sum().backward()
    return rows.detach(), x.grad


def make(B, C, H, W, p, off, dtype, image_layout, pred_layout, seed):
    g = torch.Generator().manual_seed(seed)
    N = (H // p) * (W // p)
    L, P = N - off, C * p * p
    img = torch.randn(B, C, H, W, generator=g) * 2 + 0.5
    if image_layout == "channels_last":
        img = img.to(memory_format=torch.channels_last)
    elif image_layout == "offset":  # storage offset of one element: misaligned for vectors
        buf = torch.empty(B * C * H * W + 1)
        buf[1:] = img.flatten()
        img = buf[1:].view(B, C, H, W)
    elif image_layout == "padded_w":  # row stride W + 8
        buf = torch.zeros(B, C, H, W + 8)
        buf[..., :W] = img
        img = buf[..., :W]
    elif image_layout == "strided_w":  # every other column
        buf = torch.zeros(B, C, H, 2 * W)
        buf[..., ::2] = img
        img = buf[..., ::2]
    pred = torch.randn(B, L, P, generator=g)
    if pred_layout == "offset":
        buf = torch.empty(B * L * P + 1)
        buf[1:] = pred.flatten()
        pred = buf[1:].view(B, L, P)
    elif pred_layout == "transposed":
        pred = pred.transpose(1, 2).contiguous().transpose(1, 2)
    elif pred_layout == "padded":
        buf = torch.zeros(B, L, P + 5)
        buf[..., :P] = pred
        pred = buf[..., :P]
    # .to(dtype) keeps the layout (preserve_format keeps strides of non-overlapping dense tensors; the views of
    # padded buffers become contiguous, which the 16-bit cases then cover through their own alignments).
    return pred.to(dtype), img.to(dtype)


CASES = [
    # B, C, H, W, p, off, image_layout, pred_layout, prefix
    (2, 3, 28, 28, 14, 0, "contig", "contig", None),
    (2, 3, 28, 42, 14, 1, "contig", "offset", [0, 5]),
    (2, 3, 32, 48, 16, 2, "channels_last", "transposed", [3, 1]),
    (1, 3, 28, 28, 14, 0, "offset", "padded", None),
    (2, 1, 8, 12, 4, 0, "padded_w", "contig", [7, 0]),
    (1, 2, 6, 9, 3, 1, "strided_w", "contig", [2]),
    (1, 3, 32, 320, 16, 0, "contig", "contig", [25]),   # P = 768: G = 16 < Wp = 20, two segments
    (1, 3, 14, 420, 14, 3, "contig", "offset", [26]),   # P = 588: G = 20, Wp = 30
    (1, 3, 63, 126, 63, 0, "contig", "contig", None),   # P = 11907: G = 1, vector unit too big -> scalar
    (2, 4, 4, 4, 2, 0, "contig", "contig", [1, 9]),
    (1, 3, 14, 448, 14, 0, "contig", "contig", [21]),   # bf16: image vectors with G = 20 (unit 4), two segments
    (2, 3, 28, 224, 14, 5, "contig", "contig", [0, 40]),  # second sample: nothing counted (40 > N = 32)
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def main() -> int:
    global lib
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", default=str(OUT_DIR / "libemu_patch_mse.so"))
    ap.add_argument("--quick", action="store_true", help="one dtype per case instead of three")
    args = ap.parse_args()
    lib = ctypes.CDLL(args.lib)
    lib.emu_patch_mse.restype = ctypes.c_char_p
    lib.emu_launches.restype = ctypes.c_long
    t0 = time.time()
    failures, checks, worst, paths = [], 0, {}, set()
    for i, case in enumerate(CASES):
        B, C, H, W, p, off, il, pl_, prefix = case
        dtypes = [DTYPES[i % 3]] if args.quick else DTYPES
        for dtype in dtypes:
            pred, img = make(B, C, H, W, p, off, dtype, il, pl_, seed=i)
            pre = None if prefix is None else torch.tensor(prefix, dtype=torch.int32)
            grad_rows = torch.rand(B, pred.shape[1], generator=torch.Generator().manual_seed(100 + i)) + 0.5
            name = f"{str(dtype)[6:]} #{i} B={B} C={C} H={H} W={W} p={p} off={off} {il}/{pl_} prefix={prefix}"
            for want_rows, want_grad, gr in ((True, False, None), (False, True, grad_rows), (True, True, None)):
                what = "+".join(n for n, w in (("rows", want_rows), ("grad", want_grad)) if w)
                try:
                    rows, grad, pl = kernel(pred, img, p, pre, off, gr, want_rows, want_grad)
                    paths.add((pl["image_vec"], pl["pred_vec"]))
                    crows, cgrad = cpu_op(pred, img, p, pre, off, gr, want_rows, want_grad)
                    orows, ograd = oracle(pred, img, p, pre, off, gr)
                    res = {}
                    if want_rows:
                        res["rows_budget"] = budget(rows, crows, orows, FORWARD_K, "rows")
                        res["rows_ulps"] = ulps(rows, crows, torch.float32)
                    if want_grad:
                        res["grad_budget"] = budget(grad, cgrad, ograd, GRADIENT_K, "grad")
                        res["grad_ulps"] = ulps(grad, cgrad, dtype)
                        assert res["grad_ulps"] <= GRAD_ULPS.get(dtype, float("inf")), \
                            f"grad: {res['grad_ulps']:.3g} ulps from the CPU op"
                    for k, v in res.items():
                        worst[(str(dtype)[6:], k)] = max(worst.get((str(dtype)[6:], k), 0.0), v)
                    print(f"[ok]   {name} {what} plan={pl} " + " ".join(f"{k}={v:.3g}" for k, v in res.items()),
                          flush=True)
                except AssertionError as e:
                    failures.append(f"{name} {what}")
                    print(f"[FAIL] {name} {what}: {e}", flush=True)
                checks += 1
    print("worst (budget: fraction of the oracle budget used; ulps: distance from the CPU op):",
          {f"{d} {k}": f"{v:.3g}" for (d, k), v in sorted(worst.items())})
    print("(image_vec, pred_vec) paths exercised:", sorted(paths))
    print(f"{checks - len(failures)}/{checks} passed, {lib.emu_launches()} launches, {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
