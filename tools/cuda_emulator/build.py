"""Build the CPU-emulated CUDA kernels: csrc/cuda/*.cu compiled by g++ against the emulator in emu.h.

One library per kernel, in build/cuda_emulator/:
  attention      prefix_attention_mma.cuh, prefix_attention_fwd.cu, prefix_attention_bwd.cu
                                     -> libemu_attn.so           (run_cases.py, mutants.py)
  patch_mse      patch_mse.cu        -> libemu_patch_mse.so      (run_patch_mse.py)
  cross_entropy  cross_entropy.cu    -> libemu_cross_entropy.so  (run_cross_entropy.py)

The kernel sources are copied (the attention's helper header and its two .cu files into one generated file) and
only rewritten where CUDA syntax has no C++ meaning: the bodies of the attention kernel's PTX wrappers
(exp2_approx, mma16816, the ldmatrix part of load_b_trans, cp_async16 / commit / wait), extern __shared__ arrays,
<<<>>> launches, and uint4 accesses (which get an alignment check), also in common.cuh (load16 / store16), of
which an emulator copy is generated. The kernel logic is untouched.

    python tools/cuda_emulator/build.py [--kernel attention|patch_mse|cross_entropy|all] [--asan | --tsan |
        --fp32-mma] [--out PATH (one kernel only)]   (from the repository root)
"""
import argparse
import pathlib
import re
import subprocess

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT_DIR = REPO / "build" / "cuda_emulator"  # generated source and libraries (git-ignored)


def function_span(src: str, signature_regex: str) -> tuple[int, int, int]:
    """(start of the signature, start of the body '{', end after the matching '}') of the one match."""
    matches = list(re.finditer(signature_regex, src))
    assert len(matches) == 1, (signature_regex, len(matches))
    start = matches[0].start()
    open_brace = src.index("{", matches[0].end())
    depth = 0
    for i in range(open_brace, len(src)):
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        if depth == 0:
            return start, open_brace, i + 1
    raise AssertionError("unbalanced braces")


def replace_body(src: str, signature_regex: str, new_body: str) -> str:
    _, body, end = function_span(src, signature_regex)
    return src[:body] + "{\n" + new_body + "\n}" + src[end:]


def emulate_common(src: str) -> str:
    """common.cuh with its 16-byte accesses (load16 / store16) alignment-checked."""
    src, n = re.subn(r"\*reinterpret_cast<(const uint4|uint4)\*>\(", r"*emu::check16<\1>(", src)
    assert n == 2, f"common.cuh: {n} uint4 accesses, expected 2"
    return src


def include_emulator(src: str) -> str:
    assert src.count('#include "common.cuh"') == 1
    return src.replace('#include "common.cuh"', '#include "emu.h"\n#include "common_emu.cuh"')


def emulate_rows(src: str, n_vec: int, n_launch: int) -> str:
    """patch_mse.cu / cross_entropy.cu: no inline asm, only the mechanical rewrites."""
    src = include_emulator(src)
    assert "asm" not in re.sub(r"//.*", "", src), "inline asm: needs an emulated wrapper"
    src = re.sub(r"extern __shared__ float (\w+)\[\];", r"float* \1 = emu::smem<float>();", src)
    assert "extern __shared__" not in src, "extern __shared__ of another form"
    src, n = re.subn(r"\*reinterpret_cast<(const uint4|uint4)\*>\(", r"*emu::check16<\1>(", src)
    assert n == n_vec, f"{n} uint4 accesses, expected {n_vec}"
    src, n = re.subn(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(([^;]*)\);", r"emu::launch(\1, \2, \3);", src)
    assert n == n_launch, f"{n} launches, expected {n_launch}"
    return src


def read_sources(cuda_dir: pathlib.Path, names: tuple[str, ...]) -> str:
    """The files `names` as one translation unit, in order: their #include of one another and #pragma once go."""
    parts = []
    for name in names:
        src = (cuda_dir / name).read_text()
        if name.endswith((".cuh", ".h")):
            assert src.count("#pragma once") == 1, name
            src = src.replace("#pragma once", "")
        for other in names:
            src = src.replace(f'#include "{other}"\n', "")
        parts.append(src)
    return "\n".join(parts)


def emulate(src: str, cuda_dir: pathlib.Path) -> str:
    src = include_emulator(src)
    for header in ("prefix_attention.cuh", "prefix_attention_params.h"):
        assert src.count(f'#include "{header}"') == 1, header
        src = src.replace(f'#include "{header}"', f'#include "{cuda_dir}/{header}"')
    # PTX wrappers -> emulated warp-collective / synchronous versions.
    src = replace_body(src, r"float exp2_approx\(float x\)", "  return emu::ex2_approx_ftz(x);")
    src = replace_body(src, r"void mma16816\(float \(&c\)\[4\]", "  emu::mma16816<T>(c, a, b0, b1);")
    _, body, end = function_span(src, r"void load_b_trans\(")
    fn, n = re.subn(r"const uint32_t addr = .*?;\s*asm volatile\(.*?\);", "emu::ldmatrix_x4_trans(b, p);",
                    src[body:end], flags=re.S)
    assert n == 1, "load_b_trans: ldmatrix not found"
    src = src[:body] + fn + src[end:]
    src = replace_body(src, r"void cp_async16\(void\* smem, const void\* gmem, bool valid\)",
                       "  emu::cp_async16(smem, gmem, valid);")
    src = replace_body(src, r"void cp_async_commit\(\)", "")
    src = replace_body(src, r"void cp_async_wait\(\)", "")
    assert "asm" not in re.sub(r"//.*", "", src), "inline asm left"
    # Mechanical rewrites.
    src, n = re.subn(r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];",
                     r"unsigned char* \1 = emu::smem<unsigned char>();", src)
    assert n == 3, n
    src, n = re.subn(r"\*reinterpret_cast<(const uint4|uint4)\*>\(", r"*emu::check16<\1>(", src)
    assert n == 4, n
    src, n = re.subn(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(([^;]*)\);", r"emu::launch(\1, \2, \3);", src)
    assert n == 2, n
    return src


WRAP_ATTN = r"""
// C entry points for ctypes: the launchers' arguments one by one, into the aimv2::attn::Params the launchers take
// (filled as csrc/cuda/prefix_attention_glue.cpp fills it).
static aimv2::attn::Params emu_params(int dtype, int B, int H, int S, int D, const void* q, int64_t q_sb,
                                      int64_t q_sh, int64_t q_ss, const void* k, int64_t k_sb, int64_t k_sh,
                                      int64_t k_ss, const void* v, int64_t v_sb, int64_t v_sh, int64_t v_ss,
                                      const int* prefix, int causal, float scale) {
  aimv2::attn::Params p{};
  p.dtype = dtype;
  p.B = B;
  p.H = H;
  p.S = S;
  p.D = D;
  p.q = q;
  p.q_sb = q_sb;
  p.q_sh = q_sh;
  p.q_ss = q_ss;
  p.k = k;
  p.k_sb = k_sb;
  p.k_sh = k_sh;
  p.k_ss = k_ss;
  p.v = v;
  p.v_sb = v_sb;
  p.v_sh = v_sh;
  p.v_ss = v_ss;
  p.prefix = prefix;
  p.causal = causal != 0;
  p.scale = scale;
  return p;
}
extern "C" {
const char* emu_forward(int dtype, int B, int H, int S, int D, const void* q, int64_t q_sb, int64_t q_sh,
                        int64_t q_ss, const void* k, int64_t k_sb, int64_t k_sh, int64_t k_ss, const void* v,
                        int64_t v_sb, int64_t v_sh, int64_t v_ss, const int* prefix, int causal, float scale,
                        void* out, float* lse) {
  aimv2::attn::Params p = emu_params(dtype, B, H, S, D, q, q_sb, q_sh, q_ss, k, k_sb, k_sh, k_ss, v, v_sb, v_sh,
                                     v_ss, prefix, causal, scale);
  p.out = out;
  p.lse = lse;
  return aimv2::prefix_attention_forward_cuda(p, nullptr);
}
const char* emu_backward(int dtype, int B, int H, int S, int D, const void* dout, int64_t do_sb, int64_t do_sh,
                         int64_t do_ss, const void* q, int64_t q_sb, int64_t q_sh, int64_t q_ss, const void* k,
                         int64_t k_sb, int64_t k_sh, int64_t k_ss, const void* v, int64_t v_sb, int64_t v_sh,
                         int64_t v_ss, const void* o, int64_t o_sb, int64_t o_sh, int64_t o_ss, const float* lse,
                         float* delta, const int* prefix, int causal, float scale, void* grad_q, void* grad_k,
                         void* grad_v) {
  aimv2::attn::Params p = emu_params(dtype, B, H, S, D, q, q_sb, q_sh, q_ss, k, k_sb, k_sh, k_ss, v, v_sb, v_sh,
                                     v_ss, prefix, causal, scale);
  p.dout = dout;
  p.do_sb = do_sb;
  p.do_sh = do_sh;
  p.do_ss = do_ss;
  p.o = o;
  p.o_sb = o_sb;
  p.o_sh = o_sh;
  p.o_ss = o_ss;
  p.lse = const_cast<float*>(lse);
  p.delta = delta;
  p.dq = grad_q;
  p.dk = grad_k;
  p.dv = grad_v;
  return aimv2::prefix_attention_backward_cuda(p, nullptr);
}
long emu_launches() { return emu::launches; }
long emu_mmas() { return emu::mma_count; }
void emu_set_smem_limit(long bytes) { emu::smem_limit = static_cast<size_t>(bytes); }
}
"""


WRAP_PATCH_MSE = r"""
// C entry points for ctypes (same arguments as the launcher).
extern "C" {
const char* emu_patch_mse(int dtype, const void* pred, const int64_t* psz, const int64_t* ps, const void* images,
                          const int64_t* isz, const int64_t* is, int64_t patch_size, int64_t target_offset,
                          const int64_t* prefix, float eps, const float* grad_rows, float* rows, void* grad) {
  return aimv2::patch_mse_rows_cuda(dtype, pred, psz, ps, images, isz, is, patch_size, target_offset, prefix, eps,
                                    grad_rows, rows, grad, nullptr);
}
// The launcher's plan (which load paths the kernel takes): out = {image_vec, pred_vec, G, nseg}.
void emu_patch_mse_plan(uintptr_t images, const int64_t* isz, const int64_t* is, uintptr_t pred, const int64_t* psz,
                        const int64_t* ps, uintptr_t grad, int64_t p, int64_t elem, int64_t* out) {
  const auto pl = aimv2::patch_mse::make_plan(images, isz, is, pred, psz, ps, grad, p, elem);
  out[0] = pl.image_vec;
  out[1] = pl.pred_vec;
  out[2] = pl.G;
  out[3] = pl.nseg;
}
long emu_launches() { return emu::launches; }
}
"""

WRAP_CROSS_ENTROPY = r"""
// C entry point for ctypes (same arguments as the launcher).
extern "C" {
const char* emu_cross_entropy(int dtype, const void* logits, int64_t n, int64_t V, int64_t x_stride, void* grad,
                              int64_t grad_stride, const int64_t* targets, int64_t ignore_index, float smoothing,
                              float z_loss, const float* scale, int per_row_scale, const double* saved_lse,
                              float* loss, double* lse) {
  return aimv2::cross_entropy_rows_cuda(dtype, logits, n, V, x_stride, grad, grad_stride, targets, ignore_index,
                                        smoothing, z_loss, scale, per_row_scale != 0, saved_lse, loss, lse, nullptr);
}
long emu_launches() { return emu::launches; }
}
"""

# kernel -> (source files, one translation unit in this order; library, generated source, emulate(src), entry points)
KERNELS = {
    "attention": (("prefix_attention_mma.cuh", "prefix_attention_fwd.cu", "prefix_attention_bwd.cu"),
                  "libemu_attn.so", "prefix_attention_emu.cpp", None, WRAP_ATTN),
    "patch_mse": (("patch_mse.cu",), "libemu_patch_mse.so", "patch_mse_emu.cpp",
                  lambda s: emulate_rows(s, n_vec=0, n_launch=4), WRAP_PATCH_MSE),
    "cross_entropy": (("cross_entropy.cu",), "libemu_cross_entropy.so", "cross_entropy_emu.cpp",
                      lambda s: emulate_rows(s, n_vec=2, n_launch=1), WRAP_CROSS_ENTROPY),
}


def cuda_include() -> str:
    for cand in ["/usr/local/cuda/include", "/usr/local/cuda-13.0/include",
                 "/usr/local/cuda/targets/x86_64-linux/include"]:
        if pathlib.Path(cand, "cuda_runtime.h").exists():
            return cand
    return "/usr/local/cuda/include"


def build(kernel: str, cuda_dir: pathlib.Path, out: str, args) -> None:
    src_names, _, gen_name, fn, wrap = KERNELS[kernel]
    src = read_sources(cuda_dir, src_names)
    src = emulate(src, cuda_dir) if fn is None else fn(src)
    gen = OUT_DIR / gen_name
    gen.write_text(src + wrap)
    # -fno-strict-aliasing: the kernels type-pun through reinterpret_cast (uint4 -> T*, __nv_bfloat162 -> uint32_t),
    # which nvcc compiles as intended but g++ -O2 may break (it did: delta came out NaN/0).
    cmd = ["g++", "-std=c++20", args.opt, "-g", "-fPIC", "-shared", "-pthread", f"-I{HERE}", f"-I{OUT_DIR}",
           f"-I{cuda_include()}", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-fno-strict-aliasing",
           "-Wno-unknown-pragmas", "-Wno-attributes", str(gen), "-o", out]
    if args.asan:
        cmd[1:1] = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    if args.fp32_mma:
        cmd.insert(1, "-DEMU_MMA_FP32_SEQUENTIAL")
    if args.tsan:
        cmd[1:1] = ["-fsanitize=thread", "-fno-omit-frame-pointer"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", choices=[*KERNELS, "all"], default="all")
    ap.add_argument("--repo", default=str(REPO))
    ap.add_argument("--asan", action="store_true", help="AddressSanitizer + UBSan (out-of-bounds global reads)")
    ap.add_argument("--tsan", action="store_true", help="ThreadSanitizer (shared-memory races between threads "
                    "not ordered by __syncthreads / warp collectives)")
    ap.add_argument("--opt", default="-O2")
    ap.add_argument("--fp32-mma", action="store_true", help="attention: sum mma products in fp32 one at a time")
    ap.add_argument("--out", help="output library (with one --kernel; default build/cuda_emulator/<library>)")
    args = ap.parse_args()
    kernels = list(KERNELS) if args.kernel == "all" else [args.kernel]
    if args.out and len(kernels) != 1:
        ap.error("--out needs one --kernel")
    cuda_dir = pathlib.Path(args.repo) / "csrc" / "cuda"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "common_emu.cuh").write_text(emulate_common((cuda_dir / "common.cuh").read_text()))
    for kernel in kernels:
        build(kernel, cuda_dir, args.out or str(OUT_DIR / KERNELS[kernel][1]), args)


if __name__ == "__main__":
    main()
