// Prefix-causal flash attention on CUDA (sm_80+), forward, with mma.sync tensor cores. The backward is in
// prefix_attention_bwd.cu; the mma / ldmatrix / cp.async helpers both use are in prefix_attention_mma.cuh.
//
// Key j is visible to query i iff not causal, or j <= i, or j < M_b (M_b = prefix_lens[b], 0 when absent); see
// prefix_attention.cuh for the tile index math (loop bounds, fully-visible test), shared with a host check.
// Softmax in fp32, base 2: s2 = (q . k) * scale * log2(e), lse2 = log2 sum_j 2^s2_ij (fp32 (B, H, S)).
//
// Kernels (T = bf16 or fp16, D = 64 or 128, 4 warps per CTA, every warp owns 16 rows of the CTA's tile):
//   forward   grid (B*H, cdiv(S, 64)): one query tile of 64 rows; loops over key tiles of 64 in [0, key_end),
//             K/V tiles double-buffered with cp.async; online softmax in registers; P reused from the score
//             accumulators as the A operand of P V. Writes out (contiguous) and lse2.
// No atomics: every output element is written by exactly one CTA. Tiles that are fully visible (and inside
// [0, S)^2) run a loop body without any mask arithmetic (template flag kMasked = false).
#include "prefix_attention_mma.cuh"

namespace aimv2 {
namespace {

using namespace attn;

// ---------------------------------------------------------------------------------------------------------
// Forward

template <class T, int D, int BN, bool kMasked>
__device__ __forceinline__ void forward_tile(const T* sQw, const T* sK, const T* sV, float (&acc)[D / 8][4],
                                             float (&row_max)[2], float (&row_sum)[2], int n0, int i0, int S,
                                             int M, float scale_log2, int lane) {
  constexpr int LD = D + 8;
  float s[BN / 8][4];
  mma_rows_by_rows<T, LD, D, BN>(s, sQw, sK, lane);  // S = Q K^T
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
  mma_frags_by_rows<T, LD, BN, D>(acc, s, sV, lane);  // O += P V
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
// Launcher

constexpr int kFwdBM = 64, kFwdBN = 64;

template <class T, int D>
const char* forward_typed(const Params& p, int BH, cudaStream_t stream) {
  constexpr int LD = D + 8;
  const int smem = (kFwdBM + 4 * kFwdBN) * LD * static_cast<int>(sizeof(T));
  const dim3 grid(BH, attn::cdiv(p.S, kFwdBM));
  return launch(prefix_attention_fwd_kernel<T, D, kFwdBM, kFwdBN>, grid, smem, stream, p);
}

}  // namespace

const char* prefix_attention_forward_cuda(const attn::Params& args, void* stream) {
  if (args.B <= 0 || args.H <= 0 || args.S <= 0) return nullptr;
  attn::Params p = args;
  p.scale_log2 = p.scale * attn::kLog2e;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int BH = p.B * p.H;
  if (p.dtype == static_cast<int>(DType::kBFloat16)) {
    if (p.D == 64) return forward_typed<__nv_bfloat16, 64>(p, BH, s);
    if (p.D == 128) return forward_typed<__nv_bfloat16, 128>(p, BH, s);
  } else if (p.dtype == static_cast<int>(DType::kFloat16)) {
    if (p.D == 64) return forward_typed<__half, 64>(p, BH, s);
    if (p.D == 128) return forward_typed<__half, 128>(p, BH, s);
  }
  return "prefix_attention_forward_cuda: unsupported dtype or head dimension";
}

}  // namespace aimv2
