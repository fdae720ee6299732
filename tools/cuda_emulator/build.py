"""Build libemu_attn.so: csrc/cuda/prefix_attention.cu compiled by g++ for the CPU emulator in emu_attn.h.

The kernel source is copied and only its PTX wrappers are rewritten (bodies of exp2_approx, mma16816, the
ldmatrix part of load_b_trans, cp_async16 / commit / wait), plus the mechanical CUDA -> C++ rewrites
(extern __shared__, <<<>>> launches, uint4 accesses get an alignment check). The kernel logic is untouched.

    python tools/cuda_emulator/build.py [--asan | --tsan | --fp32-mma] [--out PATH]   (from the repository root)
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


def emulate(src: str, cuda_dir: pathlib.Path) -> str:
    src = src.replace('#include "common.cuh"', f'#include "emu_attn.h"\n#include "{cuda_dir}/common.cuh"')
    src = src.replace('#include "prefix_attention.cuh"', f'#include "{cuda_dir}/prefix_attention.cuh"')
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


WRAP = r"""
// C entry points for ctypes (same arguments as the launchers).
extern "C" {
const char* emu_forward(int dtype, int B, int H, int S, int D, const void* q, int64_t q_sb, int64_t q_sh,
                        int64_t q_ss, const void* k, int64_t k_sb, int64_t k_sh, int64_t k_ss, const void* v,
                        int64_t v_sb, int64_t v_sh, int64_t v_ss, const int* prefix, int causal, float scale,
                        void* out, float* lse) {
  return aimv2::prefix_attention_forward_cuda(dtype, B, H, S, D, q, q_sb, q_sh, q_ss, k, k_sb, k_sh, k_ss, v, v_sb,
                                              v_sh, v_ss, prefix, causal != 0, scale, out, lse, nullptr);
}
const char* emu_backward(int dtype, int B, int H, int S, int D, const void* dout, int64_t do_sb, int64_t do_sh,
                         int64_t do_ss, const void* q, int64_t q_sb, int64_t q_sh, int64_t q_ss, const void* k,
                         int64_t k_sb, int64_t k_sh, int64_t k_ss, const void* v, int64_t v_sb, int64_t v_sh,
                         int64_t v_ss, const void* o, int64_t o_sb, int64_t o_sh, int64_t o_ss, const float* lse,
                         float* delta, const int* prefix, int causal, float scale, void* grad_q, void* grad_k,
                         void* grad_v) {
  return aimv2::prefix_attention_backward_cuda(dtype, B, H, S, D, dout, do_sb, do_sh, do_ss, q, q_sb, q_sh, q_ss, k,
                                               k_sb, k_sh, k_ss, v, v_sb, v_sh, v_ss, o, o_sb, o_sh, o_ss, lse,
                                               delta, prefix, causal != 0, scale, grad_q, grad_k, grad_v, nullptr);
}
long emu_launches() { return emu::launches; }
long emu_mmas() { return emu::mma_count; }
void emu_set_smem_limit(long bytes) { emu::smem_limit = static_cast<size_t>(bytes); }
}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=str(REPO))
    ap.add_argument("--asan", action="store_true", help="AddressSanitizer + UBSan (out-of-bounds global reads)")
    ap.add_argument("--tsan", action="store_true", help="ThreadSanitizer (shared-memory races between threads "
                    "not ordered by __syncthreads / warp collectives)")
    ap.add_argument("--opt", default="-O2")
    ap.add_argument("--fp32-mma", action="store_true", help="sum mma products in fp32 one at a time")
    ap.add_argument("--out", default=str(OUT_DIR / "libemu_attn.so"))
    args = ap.parse_args()
    cuda_dir = pathlib.Path(args.repo) / "csrc" / "cuda"
    src = emulate((cuda_dir / "prefix_attention.cu").read_text(), cuda_dir)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    gen = OUT_DIR / "prefix_attention_emu.cpp"
    gen.write_text(src + WRAP)
    cuda_inc = "/usr/local/cuda/include"
    for cand in ["/usr/local/cuda/include", "/usr/local/cuda-13.0/include", "/usr/local/cuda/targets/x86_64-linux/include"]:
        if pathlib.Path(cand, "cuda_runtime.h").exists():
            cuda_inc = cand
            break
    # -fno-strict-aliasing: the kernels type-pun through reinterpret_cast (uint4 -> T*, __nv_bfloat162 -> uint32_t),
    # which nvcc compiles as intended but g++ -O2 may break (it did: delta came out NaN/0).
    cmd = ["g++", "-std=c++20", args.opt, "-g", "-fPIC", "-shared", "-pthread", f"-I{HERE}", f"-I{cuda_inc}",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-Wno-attributes", str(gen), "-o", args.out]
    if args.asan:
        cmd[1:1] = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    if args.fp32_mma:
        cmd.insert(1, "-DEMU_MMA_FP32_SEQUENTIAL")
    if args.tsan:
        cmd[1:1] = ["-fsanitize=thread", "-fno-omit-frame-pointer"]
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
