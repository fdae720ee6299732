// Prefix-causal flash attention on CUDA (sm_80+), backward, with mma.sync tensor cores. The forward is in
// prefix_attention_fwd.cu (its comment has the visibility rule and the softmax in base 2); the mma / ldmatrix /
// cp.async helpers both use are in prefix_attention_mma.cuh.
//
// Kernels (T = bf16 or fp16, D = 64 or 128, 4 warps per CTA, every warp owns 16 rows of the CTA's tile), launched
// in this order:
//   delta     grid (B*H, cdiv(S, 32)), 256 threads: delta_i = sum_d dO_id O_id in fp32, 8 threads per row.
//   dK/dV     grid (B*H, cdiv(S, 64)): one key tile of 64 rows (K, V in shared memory); loops over query tiles
//             (64 rows for D = 64, 32 for D = 128) from key_tile_query_begin to S, Q/dO/lse/delta tiles
//             double-buffered. Computes S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//             dK += dS^T Q; dK is scaled by `scale` at the end.
//   dQ        grid (B*H, cdiv(S, 64)): one query tile of 64 rows (Q, dO in shared memory); loops over key tiles
//             of 64 in [0, key_end) like the forward: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K.
// No atomics: every output element is written by exactly one CTA. Tiles that are fully visible (and inside
// [0, S)^2) run a loop body without any mask arithmetic (template flag kMasked = false).
#include "prefix_attention_mma.cuh"

namespace aimv2 {
namespace {

using namespace attn;

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
  float s[BM / 8][4];
  mma_rows_by_rows<T, LD, D, BM>(s, sKw, sQt, lane);  // S^T = K Q^T
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
  mma_frags_by_rows<T, LD, BM, D>(dv, s, sDOt, lane);  // dV += P^T dO
  float dp[BM / 8][4];
  mma_rows_by_rows<T, LD, D, BM>(dp, sVw, sDOt, lane);  // dP^T = V dO^T
  // dS^T = P^T (dP^T - delta[query]).
#pragma unroll
  for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] *= dp[nt][e] - sDelta[nt * 8 + 2 * t + (e & 1)];
  }
  mma_frags_by_rows<T, LD, BM, D>(dk, s, sQt, lane);  // dK += dS^T Q
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
  mma_rows_by_rows<T, LD, D, BN>(s, sQw, sK, lane);    // S = Q K^T
  mma_rows_by_rows<T, LD, D, BN>(dp, sDOw, sV, lane);  // dP = dO V^T
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
  mma_frags_by_rows<T, LD, BN, D>(dq, s, sK, lane);  // dQ += dS K
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
// Launcher

constexpr int kDqBM = 64;
constexpr int kDkdvBN = 64;
template <int D> constexpr int dkdv_bm() { return D == 64 ? 64 : 32; }
// D = 128 dQ with 64-key tiles would need 104,448 bytes of shared memory, over the 101,376-byte opt-in limit of
// sm_86/sm_89; 32-key tiles need 69,632. Every kernel then fits every sm_80+ GPU.
template <int D> constexpr int dq_bn() { return D == 64 ? 64 : 32; }

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

}  // namespace

const char* prefix_attention_backward_cuda(const attn::Params& args, void* stream) {
  if (args.B <= 0 || args.H <= 0 || args.S <= 0) return nullptr;
  attn::Params p = args;
  p.scale_log2 = p.scale * attn::kLog2e;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int BH = p.B * p.H;
  if (p.dtype == static_cast<int>(DType::kBFloat16)) {
    if (p.D == 64) return backward_typed<__nv_bfloat16, 64>(p, BH, p.o_sb, p.o_sh, p.o_ss, p.o, s);
    if (p.D == 128) return backward_typed<__nv_bfloat16, 128>(p, BH, p.o_sb, p.o_sh, p.o_ss, p.o, s);
  } else if (p.dtype == static_cast<int>(DType::kFloat16)) {
    if (p.D == 64) return backward_typed<__half, 64>(p, BH, p.o_sb, p.o_sh, p.o_ss, p.o, s);
    if (p.D == 128) return backward_typed<__half, 128>(p, BH, p.o_sb, p.o_sh, p.o_ss, p.o, s);
  }
  return "prefix_attention_backward_cuda: unsupported dtype or head dimension";
}

}  // namespace aimv2
