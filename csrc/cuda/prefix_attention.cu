// Prefix-causal flash attention on CUDA (sm_80+): forward and backward with mma.sync tensor cores.
//
// Key j is visible to query i iff not causal, or j <= i, or j < M_b (M_b = prefix_lens[b], 0 when absent); see
// prefix_attention.cuh for the tile index math (loop bounds, fully-visible test), shared with a host check.
// Softmax in fp32, base 2: s2 = (q . k) * scale * log2(e), lse2 = log2 sum_j 2^s2_ij (fp32 (B, H, S)).
//
// Kernels (T = bf16 or fp16, D = 64 or 128, 4 warps per CTA, every warp owns 16 rows of the CTA's tile):
//   forward   grid (B*H, cdiv(S, 64)): one query tile of 64 rows; loops over key tiles of 64 in [0, key_end),
//             K/V tiles double-buffered with cp.async; online softmax in registers; P reused from the score
//             accumulators as the A operand of P V. Writes out (contiguous) and lse2.
//   delta     grid (B*H, cdiv(S, 32)), 256 threads: delta_i = sum_d dO_id O_id in fp32, 8 threads per row.
//   dK/dV     grid (B*H, cdiv(S, 64)): one key tile of 64 rows (K, V in shared memory); loops over query tiles
//             (64 rows for D = 64, 32 for D = 128) from key_tile_query_begin to S, Q/dO/lse/delta tiles
//             double-buffered. Computes S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//             dK += dS^T Q; dK is scaled by `scale` at the end.
//   dQ        grid (B*H, cdiv(S, 64)): one query tile of 64 rows (Q, dO in shared memory); loops over key tiles
//             of 64 in [0, key_end) like the forward: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K.
// No atomics: every output element is written by exactly one CTA. Tiles that are fully visible (and inside
// [0, S)^2) run a loop body without any mask arithmetic (template flag kMasked = false).
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
#include "common.cuh"
#include "prefix_attention.cuh"

namespace aimv2 {
namespace {

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

struct Params {
  const void *q, *k, *v, *dout;  // (B, H, S, D) with unit stride on D, 16-byte aligned rows
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, do_sb, do_sh, do_ss;
  const int* prefix;  // (B,) int32 or nullptr
  void *out, *dq, *dk, *dv;  // contiguous (B, H, S, D)
  float *lse, *delta;        // contiguous (B, H, S)
  int H, S;
  bool causal;
  float scale, scale_log2;
};

__device__ __forceinline__ int prefix_of(const Params& p, int b) {
  return attn::visible_prefix(p.causal, p.prefix != nullptr ? p.prefix[b] : 0, p.S);
}

// ---------------------------------------------------------------------------------------------------------
// Forward

template <class T, int D, int BN, bool kMasked>
__device__ __forceinline__ void forward_tile(const T* sQw, const T* sK, const T* sV, float (&acc)[D / 8][4],
                                             float (&row_max)[2], float (&row_sum)[2], int n0, int i0, int S,
                                             int M, float scale_log2, int lane) {
  constexpr int LD = D + 8;
  float s[BN / 8][4];
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a<LD>(a, sQw, 0, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      uint32_t b[2];
      load_b<LD>(b, sK, nt * 8, kk * 16, lane);
      mma16816<T>(s[nt], a, b[0], b[1]);
    }
  }
  // s[nt][e]: query i0 + 8 (e >> 1), key n0 + 8 nt + 2 (lane % 4) + (e & 1).
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[nt][e] * scale_log2;
      if constexpr (kMasked) {
        const int j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1), i = i0 + 8 * (e >> 1);
        if (!(j < S && attn::visible(i, j, M))) x = -INFINITY;
      }
      s[nt][e] = x;
      mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
  }
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    // Finite from the first tile on: key 0 is visible to every query, and the first tile holds it.
    const float m_new = fmaxf(row_max[r], mx[r]);
    alpha[r] = exp2_approx(row_max[r] - m_new);  // 0 on the first tile (row_max = -inf)
    row_max[r] = m_new;
  }
  float sum[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = exp2_approx(s[nt][e] - row_max[e >> 1]);
      sum[e >> 1] += s[nt][e];
    }
  }
  row_sum[0] = row_sum[0] * alpha[0] + sum[0];
  row_sum[1] = row_sum[1] * alpha[1] + sum[1];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    acc[dt][0] *= alpha[0];
    acc[dt][1] *= alpha[0];
    acc[dt][2] *= alpha[1];
    acc[dt][3] *= alpha[1];
  }
  // O += P V: A = P (block kk of keys), B(k = key, n = d) = V[key][d].
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, s, kk);
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      load_b_trans<LD>(b, sV, kk * 16, dd * 16, lane);
      mma16816<T>(acc[2 * dd], a, b[0], b[1]);
      mma16816<T>(acc[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

template <class T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads) prefix_attention_fwd_kernel(const Params p) {
  static_assert(BM == 16 * kWarps, "one warp per 16 query rows");
  constexpr int LD = D + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [BM][LD]
  T* sK = sQ + BM * LD;                // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;            // [2][BN][LD]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H, S = p.S;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;  // late (longer) query tiles first
  const int M = prefix_of(p, b);
  const int n_tiles = attn::cdiv(attn::query_tile_key_end(m0, BM, M, S), BN);
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  load_rows_async<D, BM>(sQ, q, p.q_ss, m0, S, tid);
  load_rows_async<D, BN>(sK, k, p.k_ss, 0, S, tid);
  load_rows_async<D, BN>(sV, v, p.v_ss, 0, S, tid);
  cp_async_commit();

  float acc[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int i0 = m0 + warp * 16 + (lane >> 2);  // this thread's query rows: i0, i0 + 8
  const T* sQw = sQ + warp * 16 * LD;

  for (int it = 0; it < n_tiles; ++it) {
    if (it + 1 < n_tiles) {
      const int st = (it + 1) & 1;
      load_rows_async<D, BN>(sK + st * BN * LD, k, p.k_ss, (it + 1) * BN, S, tid);
      load_rows_async<D, BN>(sV + st * BN * LD, v, p.v_ss, (it + 1) * BN, S, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int n0 = it * BN;
    const T* sKt = sK + (it & 1) * BN * LD;
    const T* sVt = sV + (it & 1) * BN * LD;
    if (attn::tile_unmasked(m0, BM, n0, BN, M, S)) {
      forward_tile<T, D, BN, false>(sQw, sKt, sVt, acc, row_max, row_sum, n0, i0, S, M, p.scale_log2, lane);
    } else {
      forward_tile<T, D, BN, true>(sQw, sKt, sVt, acc, row_max, row_sum, n0, i0, S, M, p.scale_log2, lane);
    }
    __syncthreads();  // before the next prefetch overwrites this stage
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  // The warp's own Q rows (read by no other warp) stage its output rows.
  T* sOw = sQ + warp * 16 * LD;
  stage_acc<D, T>(sOw, acc, 1.f / row_sum[0], 1.f / row_sum[1], lane);
  __syncwarp();
  store_rows_warp<D>(static_cast<T*>(p.out) + static_cast<int64_t>(bh) * S * D, sOw, m0 + warp * 16, S, lane);
  if ((lane & 3) == 0) {
    float* lse = p.lse + static_cast<int64_t>(bh) * S;
    if (i0 < S) lse[i0] = row_max[0] + log2f(row_sum[0]);
    if (i0 + 8 < S) lse[i0 + 8] = row_max[1] + log2f(row_sum[1]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward: delta_i = sum_d dO_id O_id, fp32 (B, H, S); 8 threads per row, 32 rows per 256-thread block.

template <class T, int D>
__global__ void __launch_bounds__(256) prefix_attention_delta_kernel(const T* o, int64_t o_sb, int64_t o_sh,
                                                                     int64_t o_ss, const T* dout, int64_t do_sb,
                                                                     int64_t do_sh, int64_t do_ss, float* delta,
                                                                     int H, int S) {
  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int row = blockIdx.y * 32 + (threadIdx.x >> 3), sub = threadIdx.x & 7;
  float sum = 0.f;
  if (row < S) {
    const T* orow = o + b * o_sb + h * o_sh + static_cast<int64_t>(row) * o_ss;
    const T* drow = dout + b * do_sb + h * do_sh + static_cast<int64_t>(row) * do_ss;
#pragma unroll
    for (int c = sub * 8; c < D; c += 64) {
      const uint4 x = *reinterpret_cast<const uint4*>(orow + c);
      const uint4 y = *reinterpret_cast<const uint4*>(drow + c);
      const T* xs = reinterpret_cast<const T*>(&x);
      const T* ys = reinterpret_cast<const T*>(&y);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += to_float(xs[e]) * to_float(ys[e]);
    }
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 4);
  if (sub == 0 && row < S) delta[static_cast<int64_t>(bh) * S + row] = sum;
}

// ---------------------------------------------------------------------------------------------------------
// Backward dK, dV: one key tile per CTA; warp w owns keys n0 + 16 w + [0, 16).

template <class T, int D, int BM, bool kMasked>
__device__ __forceinline__ void dkdv_tile(const T* sKw, const T* sVw, const T* sQt, const T* sDOt,
                                          const float* sL, const float* sDelta, float (&dk)[D / 8][4],
                                          float (&dv)[D / 8][4], int m0, int j0, int S, int M, float scale_log2,
                                          int lane) {
  constexpr int LD = D + 8;
  const int t = lane & 3;
  // S^T = K Q^T: A = K rows of the warp, B(k = d, n = query) = Q[query][d].
  float s[BM / 8][4];
#pragma unroll
  for (int nt = 0; nt < BM / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a<LD>(a, sKw, 0, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
      uint32_t b[2];
      load_b<LD>(b, sQt, nt * 8, kk * 16, lane);
      mma16816<T>(s[nt], a, b[0], b[1]);
    }
  }
  // s[nt][e]: key j0 + 8 (e >> 1), query m0 + c with c = 8 nt + 2t + (e & 1). P^T = 2^(s2 - lse2[query]).
#pragma unroll
  for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = nt * 8 + 2 * t + (e & 1);
      float pr = exp2_approx(s[nt][e] * scale_log2 - sL[c]);
      if constexpr (kMasked) {
        const int i = m0 + c, j = j0 + 8 * (e >> 1);
        pr = (i < S && attn::visible(i, j, M)) ? pr : 0.f;
      }
      s[nt][e] = pr;
    }
  }
  // dV += P^T dO: A = P^T (block kk of queries), B(k = query, n = d) = dO[query][d].
#pragma unroll
  for (int kk = 0; kk < BM / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, s, kk);
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      load_b_trans<LD>(b, sDOt, kk * 16, dd * 16, lane);
      mma16816<T>(dv[2 * dd], a, b[0], b[1]);
      mma16816<T>(dv[2 * dd + 1], a, b[2], b[3]);
    }
  }
  // dP^T = V dO^T: A = V rows of the warp, B(k = d, n = query) = dO[query][d].
  float dp[BM / 8][4];
#pragma unroll
  for (int nt = 0; nt < BM / 8; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a<LD>(a, sVw, 0, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
      uint32_t b[2];
      load_b<LD>(b, sDOt, nt * 8, kk * 16, lane);
      mma16816<T>(dp[nt], a, b[0], b[1]);
    }
  }
  // dS^T = P^T (dP^T - delta[query]).
#pragma unroll
  for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] *= dp[nt][e] - sDelta[nt * 8 + 2 * t + (e & 1)];
  }
  // dK += dS^T Q: B(k = query, n = d) = Q[query][d].
#pragma unroll
  for (int kk = 0; kk < BM / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, s, kk);
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      load_b_trans<LD>(b, sQt, kk * 16, dd * 16, lane);
      mma16816<T>(dk[2 * dd], a, b[0], b[1]);
      mma16816<T>(dk[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

// lse2 / delta of queries [m0, m0 + BM) into shared memory (0 past S).
template <int BM>
__device__ __forceinline__ void load_row_stats(float* sL, float* sDelta, const float* lse, const float* delta,
                                               int m0, int S, int tid) {
  for (int c = tid; c < BM; c += kThreads) {
    const bool ok = m0 + c < S;
    sL[c] = ok ? lse[m0 + c] : 0.f;
    sDelta[c] = ok ? delta[m0 + c] : 0.f;
  }
}

template <class T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads) prefix_attention_dkdv_kernel(const Params p) {
  static_assert(BN == 16 * kWarps, "one warp per 16 key rows");
  static_assert(BM % 16 == 0, "query tiles of whole mma k-blocks");
  constexpr int LD = D + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);   // [BN][LD]
  T* sV = sK + BN * LD;                 // [BN][LD]
  T* sQ = sV + BN * LD;                 // [2][BM][LD]
  T* sDO = sQ + 2 * BM * LD;            // [2][BM][LD]
  float* sL = reinterpret_cast<float*>(sDO + 2 * BM * LD);  // [2][BM]
  float* sDelta = sL + 2 * BM;                               // [2][BM]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H, S = p.S;
  const int n0 = blockIdx.y * BN;  // early (longer) key tiles first
  const int M = prefix_of(p, b);
  const int q_begin = attn::key_tile_query_begin(n0, BM, M);
  const int n_tiles = attn::cdiv(S, BM) - q_begin / BM;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const float* lse = p.lse + static_cast<int64_t>(bh) * S;
  const float* delta = p.delta + static_cast<int64_t>(bh) * S;

  load_rows_async<D, BN>(sK, k, p.k_ss, n0, S, tid);
  load_rows_async<D, BN>(sV, v, p.v_ss, n0, S, tid);
  load_rows_async<D, BM>(sQ, q, p.q_ss, q_begin, S, tid);
  load_rows_async<D, BM>(sDO, dout, p.do_ss, q_begin, S, tid);
  cp_async_commit();
  load_row_stats<BM>(sL, sDelta, lse, delta, q_begin, S, tid);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.f;
    dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.f;
  }
  const int j0 = n0 + warp * 16 + (lane >> 2);  // this thread's key rows: j0, j0 + 8
  const T* sKw = sK + warp * 16 * LD;
  const T* sVw = sV + warp * 16 * LD;

  for (int it = 0; it < n_tiles; ++it) {
    const int m0 = q_begin + it * BM;
    if (it + 1 < n_tiles) {
      const int st = (it + 1) & 1;
      load_rows_async<D, BM>(sQ + st * BM * LD, q, p.q_ss, m0 + BM, S, tid);
      load_rows_async<D, BM>(sDO + st * BM * LD, dout, p.do_ss, m0 + BM, S, tid);
      cp_async_commit();
      load_row_stats<BM>(sL + st * BM, sDelta + st * BM, lse, delta, m0 + BM, S, tid);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int cur = it & 1;
    const T* sQt = sQ + cur * BM * LD;
    const T* sDOt = sDO + cur * BM * LD;
    if (attn::tile_unmasked(m0, BM, n0, BN, M, S)) {
      dkdv_tile<T, D, BM, false>(sKw, sVw, sQt, sDOt, sL + cur * BM, sDelta + cur * BM, dk, dv, m0, j0, S, M,
                                 p.scale_log2, lane);
    } else {
      dkdv_tile<T, D, BM, true>(sKw, sVw, sQt, sDOt, sL + cur * BM, sDelta + cur * BM, dk, dv, m0, j0, S, M,
                                p.scale_log2, lane);
    }
    __syncthreads();
  }

  // The warp's own K and V rows stage its dK and dV rows.
  T* sKo = sK + warp * 16 * LD;
  T* sVo = sV + warp * 16 * LD;
  stage_acc<D, T>(sKo, dk, p.scale, p.scale, lane);
  stage_acc<D, T>(sVo, dv, 1.f, 1.f, lane);
  __syncwarp();
  const int64_t base = static_cast<int64_t>(bh) * S * D;
  store_rows_warp<D>(static_cast<T*>(p.dk) + base, sKo, n0 + warp * 16, S, lane);
  store_rows_warp<D>(static_cast<T*>(p.dv) + base, sVo, n0 + warp * 16, S, lane);
}

// ---------------------------------------------------------------------------------------------------------
// Backward dQ: one query tile per CTA; warp w owns queries m0 + 16 w + [0, 16).

template <class T, int D, int BN, bool kMasked>
__device__ __forceinline__ void dq_tile(const T* sQw, const T* sDOw, const T* sK, const T* sV,
                                        float (&dq)[D / 8][4], const float (&lse)[2], const float (&delta)[2],
                                        int n0, int i0, int S, int M, float scale_log2, int lane) {
  constexpr int LD = D + 8;
  float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt) {
    s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
  }
  // S = Q K^T and dP = dO V^T: B(k = d, n = key) = K[key][d] / V[key][d].
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4], ad[4];
    load_a<LD>(a, sQw, 0, kk * 16, lane);
    load_a<LD>(ad, sDOw, 0, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      uint32_t b[2];
      load_b<LD>(b, sK, nt * 8, kk * 16, lane);
      mma16816<T>(s[nt], a, b[0], b[1]);
      load_b<LD>(b, sV, nt * 8, kk * 16, lane);
      mma16816<T>(dp[nt], ad, b[0], b[1]);
    }
  }
  // s[nt][e]: query i0 + 8 (e >> 1), key n0 + 8 nt + 2 (lane % 4) + (e & 1). dS = P (dP - delta).
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float pr = exp2_approx(s[nt][e] * scale_log2 - lse[e >> 1]);
      if constexpr (kMasked) {
        const int j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1), i = i0 + 8 * (e >> 1);
        pr = (j < S && attn::visible(i, j, M)) ? pr : 0.f;
      }
      s[nt][e] = pr * (dp[nt][e] - delta[e >> 1]);
    }
  }
  // dQ += dS K: A = dS (block kk of keys), B(k = key, n = d) = K[key][d].
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, s, kk);
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      load_b_trans<LD>(b, sK, kk * 16, dd * 16, lane);
      mma16816<T>(dq[2 * dd], a, b[0], b[1]);
      mma16816<T>(dq[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

template <class T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads) prefix_attention_dq_kernel(const Params p) {
  static_assert(BM == 16 * kWarps, "one warp per 16 query rows");
  constexpr int LD = D + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [BM][LD]
  T* sDO = sQ + BM * LD;               // [BM][LD]
  T* sK = sDO + BM * LD;               // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;            // [2][BN][LD]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H, S = p.S;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;  // late (longer) query tiles first
  const int M = prefix_of(p, b);
  const int n_tiles = attn::cdiv(attn::query_tile_key_end(m0, BM, M, S), BN);
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;

  load_rows_async<D, BM>(sQ, q, p.q_ss, m0, S, tid);
  load_rows_async<D, BM>(sDO, dout, p.do_ss, m0, S, tid);
  load_rows_async<D, BN>(sK, k, p.k_ss, 0, S, tid);
  load_rows_async<D, BN>(sV, v, p.v_ss, 0, S, tid);
  cp_async_commit();

  const int i0 = m0 + warp * 16 + (lane >> 2);  // this thread's query rows: i0, i0 + 8
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + 8 * r;
    const bool ok = i < S;
    lse[r] = ok ? p.lse[static_cast<int64_t>(bh) * S + i] : 0.f;
    delta[r] = ok ? p.delta[static_cast<int64_t>(bh) * S + i] : 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;
  const T* sQw = sQ + warp * 16 * LD;
  const T* sDOw = sDO + warp * 16 * LD;

  for (int it = 0; it < n_tiles; ++it) {
    if (it + 1 < n_tiles) {
      const int st = (it + 1) & 1;
      load_rows_async<D, BN>(sK + st * BN * LD, k, p.k_ss, (it + 1) * BN, S, tid);
      load_rows_async<D, BN>(sV + st * BN * LD, v, p.v_ss, (it + 1) * BN, S, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int n0 = it * BN;
    const T* sKt = sK + (it & 1) * BN * LD;
    const T* sVt = sV + (it & 1) * BN * LD;
    if (attn::tile_unmasked(m0, BM, n0, BN, M, S)) {
      dq_tile<T, D, BN, false>(sQw, sDOw, sKt, sVt, dq, lse, delta, n0, i0, S, M, p.scale_log2, lane);
    } else {
      dq_tile<T, D, BN, true>(sQw, sDOw, sKt, sVt, dq, lse, delta, n0, i0, S, M, p.scale_log2, lane);
    }
    __syncthreads();
  }

  T* sOw = sQ + warp * 16 * LD;  // the warp's own Q rows
  stage_acc<D, T>(sOw, dq, p.scale, p.scale, lane);
  __syncwarp();
  store_rows_warp<D>(static_cast<T*>(p.dq) + static_cast<int64_t>(bh) * S * D, sOw, m0 + warp * 16, S, lane);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers

constexpr int kFwdBM = 64, kFwdBN = 64;
constexpr int kDqBM = 64;
constexpr int kDkdvBN = 64;
template <int D> constexpr int dkdv_bm() { return D == 64 ? 64 : 32; }
// D = 128 dQ with 64-key tiles would need 104,448 bytes of shared memory, over the 101,376-byte opt-in limit of
// sm_86/sm_89; 32-key tiles need 69,632. Every kernel then fits every sm_80+ GPU.
template <int D> constexpr int dq_bn() { return D == 64 ? 64 : 32; }

template <class Kernel>
const char* launch(Kernel kernel, dim3 grid, int smem, cudaStream_t stream, const Params& p) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return launch_error();
}

template <class T, int D>
const char* forward_typed(const Params& p, int BH, cudaStream_t stream) {
  constexpr int LD = D + 8;
  const int smem = (kFwdBM + 4 * kFwdBN) * LD * static_cast<int>(sizeof(T));
  const dim3 grid(BH, attn::cdiv(p.S, kFwdBM));
  return launch(prefix_attention_fwd_kernel<T, D, kFwdBM, kFwdBN>, grid, smem, stream, p);
}

template <class T, int D>
const char* backward_typed(const Params& p, int BH, int64_t o_sb, int64_t o_sh, int64_t o_ss, const void* o,
                           cudaStream_t stream) {
  constexpr int LD = D + 8;
  prefix_attention_delta_kernel<T, D><<<dim3(BH, attn::cdiv(p.S, 32)), 256, 0, stream>>>(
      static_cast<const T*>(o), o_sb, o_sh, o_ss, static_cast<const T*>(p.dout), p.do_sb, p.do_sh, p.do_ss,
      p.delta, p.H, p.S);
  if (const char* err = launch_error()) return err;
  constexpr int BM = dkdv_bm<D>();
  const int smem_dkdv = (2 * kDkdvBN + 4 * BM) * LD * static_cast<int>(sizeof(T)) + 4 * BM * 4;
  const char* err = launch(prefix_attention_dkdv_kernel<T, D, BM, kDkdvBN>, dim3(BH, attn::cdiv(p.S, kDkdvBN)),
                           smem_dkdv, stream, p);
  if (err != nullptr) return err;
  constexpr int DqBN = dq_bn<D>();
  const int smem_dq = (2 * kDqBM + 4 * DqBN) * LD * static_cast<int>(sizeof(T));
  return launch(prefix_attention_dq_kernel<T, D, kDqBM, DqBN>, dim3(BH, attn::cdiv(p.S, kDqBM)), smem_dq, stream,
                p);
}

Params make_params(int H, int S, const void* q, int64_t q_sb, int64_t q_sh, int64_t q_ss, const void* k,
                   int64_t k_sb, int64_t k_sh, int64_t k_ss, const void* v, int64_t v_sb, int64_t v_sh,
                   int64_t v_ss, const int* prefix, bool causal, float scale) {
  Params p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.q_sb = q_sb;
  p.q_sh = q_sh;
  p.q_ss = q_ss;
  p.k_sb = k_sb;
  p.k_sh = k_sh;
  p.k_ss = k_ss;
  p.v_sb = v_sb;
  p.v_sh = v_sh;
  p.v_ss = v_ss;
  p.prefix = prefix;
  p.H = H;
  p.S = S;
  p.causal = causal;
  p.scale = scale;
  p.scale_log2 = scale * kLog2e;
  return p;
}

}  // namespace

// q, k, v: (B, H, S, D) of `dtype` (1 bf16, 2 fp16), D in {64, 128}, unit stride on D, 16-byte aligned base
// pointers and (B, H, S) strides that are multiples of 8 elements. prefix: int32 (B,) or nullptr (used only
// when causal). out: contiguous (B, H, S, D), 16-byte aligned; lse: contiguous fp32 (B, H, S), base 2.
// B * H < 2^31, cdiv(S, 64) <= 65535.
const char* prefix_attention_forward_cuda(int dtype, int B, int H, int S, int D, const void* q, int64_t q_sb,
                                          int64_t q_sh, int64_t q_ss, const void* k, int64_t k_sb, int64_t k_sh,
                                          int64_t k_ss, const void* v, int64_t v_sb, int64_t v_sh, int64_t v_ss,
                                          const int* prefix, bool causal, float scale, void* out, float* lse,
                                          void* stream) {
  if (B <= 0 || H <= 0 || S <= 0) return nullptr;
  Params p = make_params(H, S, q, q_sb, q_sh, q_ss, k, k_sb, k_sh, k_ss, v, v_sb, v_sh, v_ss, prefix, causal, scale);
  p.out = out;
  p.lse = lse;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int BH = B * H;
  if (dtype == static_cast<int>(DType::kBFloat16)) {
    if (D == 64) return forward_typed<__nv_bfloat16, 64>(p, BH, s);
    if (D == 128) return forward_typed<__nv_bfloat16, 128>(p, BH, s);
  } else if (dtype == static_cast<int>(DType::kFloat16)) {
    if (D == 64) return forward_typed<__half, 64>(p, BH, s);
    if (D == 128) return forward_typed<__half, 128>(p, BH, s);
  }
  return "prefix_attention_forward_cuda: unsupported dtype or head dimension";
}

// As the forward, plus dout and o (same layout rules as q), lse (contiguous fp32 (B, H, S), the forward's),
// delta (fp32 (B, H, S) contiguous scratch), grad_q/k/v (contiguous (B, H, S, D), 16-byte aligned).
const char* prefix_attention_backward_cuda(int dtype, int B, int H, int S, int D, const void* dout, int64_t do_sb,
                                           int64_t do_sh, int64_t do_ss, const void* q, int64_t q_sb, int64_t q_sh,
                                           int64_t q_ss, const void* k, int64_t k_sb, int64_t k_sh, int64_t k_ss,
                                           const void* v, int64_t v_sb, int64_t v_sh, int64_t v_ss, const void* o,
                                           int64_t o_sb, int64_t o_sh, int64_t o_ss, const float* lse, float* delta,
                                           const int* prefix, bool causal, float scale, void* grad_q,
                                           void* grad_k, void* grad_v, void* stream) {
  if (B <= 0 || H <= 0 || S <= 0) return nullptr;
  Params p = make_params(H, S, q, q_sb, q_sh, q_ss, k, k_sb, k_sh, k_ss, v, v_sb, v_sh, v_ss, prefix, causal, scale);
  p.dout = dout;
  p.do_sb = do_sb;
  p.do_sh = do_sh;
  p.do_ss = do_ss;
  p.lse = const_cast<float*>(lse);
  p.delta = delta;
  p.dq = grad_q;
  p.dk = grad_k;
  p.dv = grad_v;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int BH = B * H;
  if (dtype == static_cast<int>(DType::kBFloat16)) {
    if (D == 64) return backward_typed<__nv_bfloat16, 64>(p, BH, o_sb, o_sh, o_ss, o, s);
    if (D == 128) return backward_typed<__nv_bfloat16, 128>(p, BH, o_sb, o_sh, o_ss, o, s);
  } else if (dtype == static_cast<int>(DType::kFloat16)) {
    if (D == 64) return backward_typed<__half, 64>(p, BH, o_sb, o_sh, o_ss, o, s);
    if (D == 128) return backward_typed<__half, 128>(p, BH, o_sb, o_sh, o_ss, o, s);
  }
  return "prefix_attention_backward_cuda: unsupported dtype or head dimension";
}

}  // namespace aimv2
