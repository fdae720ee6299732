// Device helpers of the prefix-causal attention kernels (csrc/cuda/prefix_attention_fwd.cu, _bwd.cu): the PTX
// wrappers (mma.sync, ldmatrix, cp.async, ex2.approx), the shared-memory fragment loads, the tile copies and the
// launch helper. The kernels' design is described at the top of each .cu file; the tile index math (loop bounds,
// fully-visible test) is in prefix_attention.cuh, shared with a host check; the launchers' arguments are in
// prefix_attention_params.h.
//
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: per thread, groupID g = lane >> 2, t = lane % 4:
//   A (16 x 16, row-major), 4 x .b32 = 8 halves: a0,a1 (g, 2t..2t+1)   a2,a3 (g+8, 2t..)
//                                                a4,a5 (g, 2t+8..)     a6,a7 (g+8, 2t+8..)
//   B (16 x 8, K x N),      2 x .b32 = 4 halves: b0,b1 (k = 2t..2t+1, n = g)   b2,b3 (k = 2t+8.., n = g)
//   C/D (16 x 8, fp32),     4 floats:            c0,c1 (g, 2t..2t+1)  c2,c3 (g+8, 2t..2t+1)
// In every .b32 the element with the lower index is in the low 16 bits.
// So the C fragments of two adjacent n-tiles (columns [16 kk, 16 kk + 16)) of a 16 x N fp32 accumulator,
// converted pairwise, are exactly the A fragment of the 16 x 16 block kk of the same matrix:
//   A reg0 = C[2kk](c0,c1), reg1 = C[2kk](c2,c3), reg2 = C[2kk+1](c0,c1), reg3 = C[2kk+1](c2,c3).
// Shared-memory operands (rows padded to LD = D + 8 halves, 16-byte aligned rows):
//   load_a:       A(r, c) = s[(r0 + r) * LD + c0 + c]        32-bit loads (pairs are contiguous)
//   load_b:       B(k, n) = s[(n0 + n) * LD + k0 + k]        32-bit loads (pairs are contiguous)
//   load_b_trans: B(k, n) = s[(k0 + k) * LD + n0 + n], two n-tiles at once with ldmatrix.x4.trans: lane l
//                 addresses row k0 + (l & 7) + 8 * ((l >> 3) & 1), column n0 + 8 * (l >> 4); matrix m (lanes
//                 8m..8m+7) lands in register m, thread lane gets, with .trans, stored (row 2t, col g) and
//                 (row 2t+1, col g) of matrix m: b0,b1 of n-tile n0 (m = 0), b2,b3 of n-tile n0 (m = 1),
//                 b0,b1 of n-tile n0 + 8 (m = 2), b2,b3 of n-tile n0 + 8 (m = 3).
#pragma once

#include "common.cuh"
#include "prefix_attention.cuh"
#include "prefix_attention_params.h"

namespace aimv2 {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
// Hopper review (2026-12-02, nvcc 13.0 for sm_90a, `make cuda-check`; no GPU run yet). These kernels stay on
// the sm_80 instruction set on Hopper: mma.sync (HMMA), ldmatrix and cp.async double buffering, 4 warps per CTA.
// - Registers per thread, sm_90a, no spills: forward 182 (D 128) / 138 (D 64); dK/dV 240 / 172; dQ 163 / 165.
//   At 128 threads per CTA that is 2 CTAs per SM for the forward and dQ at D 128 (65536 registers / (182 x
//   128) = 2.8) and 2 for dK/dV: occupancy is register-bound, so BM/BN stay at 64 (a 128-row tile in 4 warps
//   would need 32 rows per warp and spill at D 128).
// - wgmma (warpgroup MMA, sm_90a only) is not used: it needs the operands' B side in shared memory in a
//   swizzled layout, a warpgroup (4 warps) per 64-row slice and asynchronous accumulators, i.e. a rewrite of
//   the three main loops in the style of FlashAttention-3, not a change of instruction. The FlashAttention-3
//   paper puts FlashAttention-2 (mma.sync, the same design as these kernels) at about 35% of an H100's dense
//   bf16 rate, i.e. below our 400 TFLOP/s forward target (not measured here). That rewrite belongs with the
//   Hopper work on the Triton kernels (whose tl.dot emits wgmma on sm_90a); until a GPU run has measured
//   both, backend "auto" does not pick these kernels (aimv2_kernels._backend.CUDA_AUTO).
// - TMA (cp.async.bulk.tensor) would replace the per-thread 16-byte cp.async of the K/V and Q/dO tiles; with
//   mma.sync consumers reading through ldmatrix it saves issue slots, not bandwidth, so it waits for wgmma.
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <class T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

// 2^x; +0 for -inf.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <class T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo: the low 16 bits
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (IsBf16<T>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <class T> __device__ __forceinline__ uint32_t lds32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
template <class T> __device__ __forceinline__ void sts32(T* p, uint32_t x) { *reinterpret_cast<uint32_t*>(p) = x; }

// A fragment of the 16 x 16 block at (r0, c0) of a row-major shared matrix.
template <int LD, class T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int r0, int c0, int lane) {
  const T* p = s + (r0 + (lane >> 2)) * LD + c0 + 2 * (lane & 3);
  a[0] = lds32(p);
  a[1] = lds32(p + 8 * LD);
  a[2] = lds32(p + 8);
  a[3] = lds32(p + 8 * LD + 8);
}

// B fragment of B(k, n) = s[(n0 + n) * LD + k0 + k], k < 16, n < 8.
template <int LD, class T>
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const T* s, int n0, int k0, int lane) {
  const T* p = s + (n0 + (lane >> 2)) * LD + k0 + 2 * (lane & 3);
  b[0] = lds32(p);
  b[1] = lds32(p + 8);
}

// B fragments of B(k, n) = s[(k0 + k) * LD + n0 + n], k < 16, n < 16: {b[0], b[1]} for columns [n0, n0 + 8),
// {b[2], b[3]} for columns [n0 + 8, n0 + 16).
template <int LD, class T>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const T* s, int k0, int n0, int lane) {
  const T* p = s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n0 + (lane >> 4) * 8;
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(addr)
               : "memory");
}

// 16 bytes global -> shared; zero-fills when !valid (src must still be a mapped address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Rows [row0, row0 + ROWS) of a (S, D) slice with row stride `stride` (elements) into s[ROWS][D + 8]; rows at or
// past S are zero-filled. `g` points at row 0 of the slice.
template <int D, int ROWS, class T>
__device__ __forceinline__ void load_rows_async(T* s, const T* g, int64_t stride, int row0, int S, int tid) {
  constexpr int LD = D + 8, kChunks = D / 8;
  static_assert((ROWS * kChunks) % kThreads == 0, "whole rounds of 16-byte chunks");
#pragma unroll
  for (int rnd = 0; rnd < ROWS * kChunks / kThreads; ++rnd) {
    const int c = tid + rnd * kThreads;
    const int r = c / kChunks, col = (c % kChunks) * 8, row = row0 + r;
    const bool ok = row < S;
    cp_async16(s + r * LD + col, g + (ok ? static_cast<int64_t>(row) * stride + col : 0), ok);
  }
}

// 16 rows of D values from s[16][D + 8] (a warp's rows) to a contiguous (S, D) slice at rows [row0, row0 + 16).
template <int D, class T>
__device__ __forceinline__ void store_rows_warp(T* g, const T* s, int row0, int S, int lane) {
  constexpr int LD = D + 8, kChunks = D / 8;
  static_assert((16 * kChunks) % 32 == 0, "whole rounds of 16-byte chunks");
#pragma unroll
  for (int rnd = 0; rnd < 16 * kChunks / 32; ++rnd) {
    const int c = lane + rnd * 32;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    if (row0 + r < S) {
      *reinterpret_cast<uint4*>(g + static_cast<int64_t>(row0 + r) * D + col) =
          *reinterpret_cast<const uint4*>(s + r * LD + col);
    }
  }
}

// The fp32 16 x D accumulator frags (rows g, g + 8 of the warp) times `mult`, as T into s[16][D + 8].
template <int D, class T>
__device__ __forceinline__ void stage_acc(T* s, const float (&acc)[D / 8][4], float mult0, float mult1, int lane) {
  constexpr int LD = D + 8;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    sts32(s + g * LD + dt * 8 + 2 * t, pack2<T>(acc[dt][0] * mult0, acc[dt][1] * mult0));
    sts32(s + (g + 8) * LD + dt * 8 + 2 * t, pack2<T>(acc[dt][2] * mult1, acc[dt][3] * mult1));
  }
}

// A fragment of block kk (columns [16 kk, 16 kk + 16)) of a 16 x N fp32 accumulator, as T.
template <class T, int NT8>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&x)[NT8][4], int kk) {
  a[0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
  a[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
  a[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
  a[3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// The two warp products of every attention kernel, over the warp's 16 rows:
// c = A B^T with A(16 x K) the rows [0, 16) of the row-major shared matrix sA and B(k, n) = sB[n * LD + k],
// n < N (scores Q K^T, K Q^T, V dO^T, dO V^T); c is overwritten.
template <class T, int LD, int K, int N>
__device__ __forceinline__ void mma_rows_by_rows(float (&c)[N / 8][4], const T* sA, const T* sB, int lane) {
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    load_a<LD>(a, sA, 0, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      uint32_t b[2];
      load_b<LD>(b, sB, nt * 8, kk * 16, lane);
      mma16816<T>(c[nt], a, b[0], b[1]);
    }
  }
}

// acc += X B with X(16 x K) the warp's fp32 fragments x rounded to T (acc_to_a) and B(k, n) = sB[k * LD + n],
// n < D (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K).
template <class T, int LD, int K, int D>
__device__ __forceinline__ void mma_frags_by_rows(float (&acc)[D / 8][4], const float (&x)[K / 8][4], const T* sB,
                                                  int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, x, kk);
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      load_b_trans<LD>(b, sB, kk * 16, dd * 16, lane);
      mma16816<T>(acc[2 * dd], a, b[0], b[1]);
      mma16816<T>(acc[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

__device__ __forceinline__ int prefix_of(const Params& p, int b) {
  return attn::visible_prefix(p.causal, p.prefix != nullptr ? p.prefix[b] : 0, p.S);
}

template <class Kernel>
const char* launch(Kernel kernel, dim3 grid, int smem, cudaStream_t stream, const Params& p) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return launch_error();
}

}  // namespace attn
}  // namespace aimv2
