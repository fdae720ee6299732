// Prefix-causal attention on the CPU: tiled forward with an online softmax, and a recomputing backward.
//
// Key j is visible to query i iff `not causal` or j <= i or j < M_b (M_b = prefix_lens[b], 0 when absent).
// With M = S when causal is False this is one rule: visible iff j <= i or j < M. Softmax runs in fp32 in base 2:
// scores are s2 = (q . k) * scale * log2(e), and the forward saves lse2 = log2 sum_j 2^s2_ij, fp32 (B, H, S),
// as the Triton kernels do. Inputs may have any strides on (B, H, S) as long as D is contiguous.
//
// Tiles (query tile [m0, m0 + bm), key tile [n0, n0 + bn), prefix M):
//   - keys at or past max(m0 + bm, M) are never visible to the query tile: never loaded;
//   - a key tile ending at or before max(M, m0 + 1) is fully visible: no mask arithmetic;
//   - otherwise the masked part of each score row is one contiguous run, filled in one go:
//       row i of S (query i):   keys  [max(i + 1, M), ...)  are masked   (a suffix)
//       row j of S^T (key j):   queries [m0, j)  when j >= M  are masked  (a prefix)
//
// Every product is one GEMM shape, C (+)= op(A) B with B row-major and op(A) = A or A^T, so no tile is
// transposed inside the loops (transposes happen once per task, on the tile that task keeps):
//   forward, task = query tile:   S^T = K Q^T (Q^T packed, pre-scaled)      O += P V      (A = P^T buffer)
//   backward dK/dV, task = key tile: S = Q K^T (K^T packed, pre-scaled), dP = dO V^T (V^T packed),
//                                    dV += P^T dO,  dK += dS^T Q            (A = P, dS buffers read transposed)
//   backward dQ, task = query tile:  S^T = K Q^T, dP^T = V dO^T (Q^T, dO^T packed),  dQ += dS K
// with dS = P (dP - delta), delta_i = sum_d dO_id O_id. That is the split backward: the two loops own disjoint
// outputs (no races, no atomic adds) but compute S and dP twice. The fused backward, used when there are at
// least 4 (b, h) per thread, runs one task per (b, h): the dK/dV loop over its key tiles, adding dQ += dS K into
// an fp32 (S, Dp) buffer of the thread's, so 5 products per pair of tiles instead of 7 (see use_fused_backward).
// Tasks run on torch's intra-op threads, handed out one at a time, head by head (see run_tasks). Extra memory
// is a few tiles per thread, plus delta, fp32 (B, H, S), plus for the fused backward S x Dp fp32 per thread.
//
// The hot loops use GCC/Clang vector extensions (8 x fp32, csrc/cpu_simd.h) and are compiled twice: for the
// build's baseline ISA and, on x86, for AVX2+FMA (chosen at run time by simd::avx2_enabled(): AIMV2_CPU_SIMD=portable
// forces the baseline), as setup.py compiles every file for the baseline ISA only. Everything a task runs is
// force-inlined into its two entry points (forward_task_avx2 / forward_task_generic, ...), so the vector code
// takes the entry's ISA; the GEMM (csrc/attention_cpu_tiles.h, with the tile helpers) has its own pair
// (gemm_avx2 / gemm_generic).
// NOTE: the GEMM micro-kernel keeps a 6 x 16 block of C in 12 ymm registers (one B row of 2 vectors, 6
// broadcasts of A per step). On the 2-core AMD EPYC (Zen 3) build machine, shared with other jobs, it reached
// 70-85 GFLOP/s on one core for 64 x 64 x 64 products in L1 (MKL: 69 GFLOP/s on a 1024^3 matmul), and the whole
// B=4, H=8, S=1024, D=64 fp32 forward+backward with random prefixes ran 1.3x faster than SDPA with a dense
// boolean mask with the split backward, with half its peak memory (bench/cpu_check.py times this shape). The fused
// backward took it from 572 to 451 ms (median of 7 interleaved rounds, 2 threads, load average about 2).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "attention_cpu_tiles.h"
#include "cpu_simd.h"

#if AT_PARALLEL_OPENMP && !defined(_OPENMP) && defined(__ELF__)
// libgomp's entry for `#pragma omp parallel` (see on_threads); weak, so a runtime without it leaves it null.
extern "C" void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags)
    __attribute__((weak));
#endif

namespace aimv2 {
namespace {

using namespace attention_cpu;
using simd::exp2v;
using simd::vmax;

constexpr int64_t kBlockM = 64;     // forward: queries per tile
constexpr int64_t kBlockN = 64;     // forward: keys per tile
constexpr int64_t kBwdBlockM = 64;  // backward: queries per tile
constexpr int64_t kBwdBlockN = 64;  // backward: keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------------
// Forward: one task is one query tile of one (b, h).

struct ForwardOut {
  void* out;     // (B, H, S, D) contiguous, q's dtype
  float* lse2;   // (B, H, S)
};

struct ForwardWork {
  std::vector<float> qT, s, kbuf, vbuf, acc, m, l, alpha, tmax;
  explicit ForwardWork(int64_t D, int64_t Dp)
      : qT(D * kBlockM), s(kBlockN * kBlockM), kbuf(kBlockN * Dp), vbuf(kBlockN * Dp), acc(kBlockM * Dp),
        m(kBlockM), l(kBlockM), alpha(kBlockM), tmax(kBlockM) {}
};

template <bool kAvx2, typename T>
AIMV2_INLINE void forward_task(const Problem<T>& p, const ForwardOut& o, int64_t bh, int64_t tile,
                               ForwardWork& w) {
  const int64_t S = p.S, D = p.D, Dp = p.Dp, b = bh / p.H, h = bh % p.H, m0 = tile * kBlockM;
  const int64_t bm = std::min(kBlockM, S - m0), bmp = round_up(bm, kNR), M = p.visible_prefix(b);
  constexpr int64_t lds = kBlockM;  // row stride of qT and s
  float *qT = w.qT.data(), *s = w.s.data(), *acc = w.acc.data(), *m = w.m.data(), *l = w.l.data();
  float *alpha = w.alpha.data(), *tmax = w.tmax.data();

  pack_transposed(p.q.at(b, h, m0), p.q.ss, bm, D, p.scale2, qT, lds, bmp);
  fill(m, bmp, kNegInf);
  fill(l, bmp, 0.f);
  fill(acc, bm * Dp, 0.f);
  const int64_t hi = std::min(S, std::max(m0 + bm, M));  // keys >= hi are invisible to the whole tile
  for (int64_t n0 = 0; n0 < hi; n0 += kBlockN) {
    const int64_t bn = std::min(kBlockN, hi - n0);
    const View kt = rows_view(p.k.at(b, h, n0), p.k.ss, bn, D, Dp, w.kbuf.data(), false);
    const View vt = rows_view(p.v.at(b, h, n0), p.v.ss, bn, D, Dp, w.vbuf.data(), true);
    gemm<kAvx2, false>(bn, bmp, D, kt.ptr, kt.ld, qT, lds, s, lds, false);  // S^T, log2 units
    if (!fully_visible(m0, n0, bn, M)) {
      for (int64_t jj = 0; jj < bn; ++jj) fill(s + jj * lds, masked_queries(n0 + jj, m0, bm, M), kNegInf);
    }
    // Online softmax, column i = query m0 + i. Key 0 is visible to every query, so m is finite after tile 0.
    for (int64_t i = 0; i < bmp; i += 8) store(tmax + i, splat<F8>(kNegInf));
    // vmax(a, b) keeps a where a < b fails (ties, NaN); the operand order is the one these loops always had.
    for (int64_t jj = 0; jj < bn; ++jj) {
      const float* row = s + jj * lds;
      for (int64_t i = 0; i < bmp; i += 8) store(tmax + i, vmax(load<F8>(row + i), load<F8>(tmax + i)));
    }
    for (int64_t i = 0; i < bmp; i += 8) {
      const F8 m_old = load<F8>(m + i), m_new = vmax(load<F8>(tmax + i), m_old);
      store(alpha + i, exp2v(m_old - m_new));
      store(m + i, m_new);
      store(tmax + i, splat<F8>(0.f));  // reused as this tile's column sums
    }
    for (int64_t jj = 0; jj < bn; ++jj) {
      float* row = s + jj * lds;
      for (int64_t i = 0; i < bmp; i += 8) {
        const F8 pr = exp2v(load<F8>(row + i) - load<F8>(m + i));
        store(row + i, pr);
        store(tmax + i, load<F8>(tmax + i) + pr);
      }
    }
    for (int64_t i = 0; i < bmp; i += 8) store(l + i, load<F8>(l + i) * load<F8>(alpha + i) + load<F8>(tmax + i));
    for (int64_t i = 0; i < bm; ++i) {
      if (alpha[i] == 1.f) continue;
      const F8 a = splat<F8>(alpha[i]);
      for (int64_t x = 0; x < Dp; x += 8) store(acc + i * Dp + x, load<F8>(acc + i * Dp + x) * a);
    }
    gemm<kAvx2, true>(bm, Dp, bn, s, lds, vt.ptr, vt.ld, acc, Dp, true);  // O += P V
  }
  T* out = static_cast<T*>(o.out) + (bh * S + m0) * D;
  float* lse2 = o.lse2 + bh * S + m0;
  for (int64_t i = 0; i < bm; ++i) {
    const float inv = 1.f / l[i];
    for (int64_t x = 0; x < D; ++x) out[i * D + x] = static_cast<T>(acc[i * Dp + x] * inv);
    lse2[i] = m[i] + std::log2(l[i]);
  }
}

template <typename T>
AIMV2_TARGET_AVX2 void forward_task_avx2(const Problem<T>& p, const ForwardOut& o, int64_t bh, int64_t tile,
                                         ForwardWork& w) {
  forward_task<true>(p, o, bh, tile, w);
}
template <typename T>
void forward_task_generic(const Problem<T>& p, const ForwardOut& o, int64_t bh, int64_t tile, ForwardWork& w) {
  forward_task<false>(p, o, bh, tile, w);
}

// ---------------------------------------------------------------------------------------------------------
// Backward

struct BackwardIn {
  const float* lse2;   // (B, H, S) contiguous
  const float* delta;  // (B, H, S) contiguous
  void* dq;            // (B, H, S, D) contiguous, q's dtype
  void* dk;
  void* dv;
};

// P = 2^(s - lse2) and dS = P (dP - delta) over `width` columns of one row; `lse2` and `delta` hold one value
// per column (kColumns, S^T tiles) or one for the row (S tiles). Writes P into s and dS into dp.
template <bool kColumns>
AIMV2_INLINE void probs_and_dscores(float* s, float* dp, int64_t width, const float* lse2, const float* delta) {
  for (int64_t x = 0; x < width; x += 8) {
    const F8 sub = kColumns ? load<F8>(lse2 + x) : splat<F8>(*lse2);
    const F8 del = kColumns ? load<F8>(delta + x) : splat<F8>(*delta);
    const F8 pr = exp2v(load<F8>(s + x) - sub);
    store(s + x, pr);
    store(dp + x, pr * (load<F8>(dp + x) - del));
  }
}

// dK and dV of one key tile [n0, n0 + bn): loops over the query tiles that can see it. With kFusedDq it also
// adds dS K into w.dq, the fp32 dQ of the whole (b, h) (S x Dp), which the caller zeroes and writes out.
struct KeyTileWork {
  std::vector<float> kT, vT, s, dp, qbuf, dobuf, dk, dv, kbuf, dq;  // kbuf, dq: fused backward only
  explicit KeyTileWork(int64_t D, int64_t Dp)
      : kT(D * kBwdBlockN), vT(D * kBwdBlockN), s(kBwdBlockM * kBwdBlockN), dp(kBwdBlockM * kBwdBlockN),
        qbuf(kBwdBlockM * Dp), dobuf(kBwdBlockM * Dp), dk(kBwdBlockN * Dp), dv(kBwdBlockN * Dp) {}
};

template <bool kAvx2, bool kFusedDq, typename T>
AIMV2_INLINE void dkdv_task(const Problem<T>& p, const Rows<T>& dout, const BackwardIn& in, int64_t bh,
                            int64_t tile, KeyTileWork& w) {
  const int64_t S = p.S, D = p.D, Dp = p.Dp, b = bh / p.H, h = bh % p.H, n0 = tile * kBwdBlockN;
  const int64_t bn = std::min(kBwdBlockN, S - n0), bnp = round_up(bn, kNR), M = p.visible_prefix(b);
  constexpr int64_t lds = kBwdBlockN;
  float *kT = w.kT.data(), *vT = w.vT.data(), *s = w.s.data(), *dp = w.dp.data();
  float *dk = w.dk.data(), *dv = w.dv.data();

  pack_transposed(p.k.at(b, h, n0), p.k.ss, bn, D, p.scale2, kT, lds, bnp);
  pack_transposed(p.v.at(b, h, n0), p.v.ss, bn, D, 1.f, vT, lds, bnp);
  fill(dk, bn * Dp, 0.f);
  fill(dv, bn * Dp, 0.f);
  const float* lse2 = in.lse2 + bh * S;
  const float* delta = in.delta + bh * S;
  View kt{nullptr, 0};  // K rows, unscaled, padded to Dp: the B operand of dQ += dS K
  if constexpr (kFusedDq) kt = rows_view(p.k.at(b, h, n0), p.k.ss, bn, D, Dp, w.kbuf.data(), true);
  // When n0 >= M, queries i < n0 never see this tile (i < n0 <= j and j >= M): start at n0.
  for (int64_t m0 = n0 < M ? 0 : n0; m0 < S; m0 += kBwdBlockM) {
    const int64_t bm = std::min(kBwdBlockM, S - m0);
    const View qt = rows_view(p.q.at(b, h, m0), p.q.ss, bm, D, Dp, w.qbuf.data(), true);
    const View dot = rows_view(dout.at(b, h, m0), dout.ss, bm, D, Dp, w.dobuf.data(), true);
    gemm<kAvx2, false>(bm, bnp, D, qt.ptr, qt.ld, kT, lds, s, lds, false);    // S, log2 units
    gemm<kAvx2, false>(bm, bnp, D, dot.ptr, dot.ld, vT, lds, dp, lds, false);  // dP = dO V^T
    const bool full = fully_visible(m0, n0, bn, M);
    for (int64_t r = 0; r < bm; ++r) {
      float *srow = s + r * lds, *dprow = dp + r * lds;
      probs_and_dscores<false>(srow, dprow, bnp, lse2 + m0 + r, delta + m0 + r);
      // Keys [max(i + 1, M), ...) of row i are masked, and so are the padding columns past bn.
      const int64_t visible = full ? bn : std::clamp<int64_t>(std::max(m0 + r + 1, M) - n0, 0, bn);
      fill(srow + visible, bnp - visible, 0.f);
      fill(dprow + visible, bnp - visible, 0.f);
    }
    gemm<kAvx2, true>(bn, Dp, bm, s, lds, dot.ptr, dot.ld, dv, Dp, true);   // dV += P^T dO
    gemm<kAvx2, true>(bn, Dp, bm, dp, lds, qt.ptr, qt.ld, dk, Dp, true);    // dK += dS^T Q
    if constexpr (kFusedDq) {
      gemm<kAvx2, false>(bm, Dp, bn, dp, lds, kt.ptr, kt.ld, w.dq.data() + m0 * Dp, Dp, true);  // dQ += dS K
    }
  }
  T* dk_out = static_cast<T*>(in.dk) + (bh * S + n0) * D;
  T* dv_out = static_cast<T*>(in.dv) + (bh * S + n0) * D;
  for (int64_t j = 0; j < bn; ++j) {
    for (int64_t x = 0; x < D; ++x) {
      dk_out[j * D + x] = static_cast<T>(dk[j * Dp + x] * p.scale);
      dv_out[j * D + x] = static_cast<T>(dv[j * Dp + x]);
    }
  }
}

// dQ of one query tile [m0, m0 + bm): the forward's key range.
struct QueryTileWork {
  std::vector<float> qT, doT, s, dp, kbuf, vbuf, dq, lse2, delta;
  explicit QueryTileWork(int64_t D, int64_t Dp)
      : qT(D * kBwdBlockM), doT(D * kBwdBlockM), s(kBwdBlockN * kBwdBlockM), dp(kBwdBlockN * kBwdBlockM),
        kbuf(kBwdBlockN * Dp), vbuf(kBwdBlockN * Dp), dq(kBwdBlockM * Dp), lse2(kBwdBlockM), delta(kBwdBlockM) {}
};

template <bool kAvx2, typename T>
AIMV2_INLINE void dq_task(const Problem<T>& p, const Rows<T>& dout, const BackwardIn& in, int64_t bh,
                          int64_t tile, QueryTileWork& w) {
  const int64_t S = p.S, D = p.D, Dp = p.Dp, b = bh / p.H, h = bh % p.H, m0 = tile * kBwdBlockM;
  const int64_t bm = std::min(kBwdBlockM, S - m0), bmp = round_up(bm, kNR), M = p.visible_prefix(b);
  constexpr int64_t lds = kBwdBlockM;
  float *qT = w.qT.data(), *doT = w.doT.data(), *s = w.s.data(), *dp = w.dp.data(), *dq = w.dq.data();
  float *lse2 = w.lse2.data(), *delta = w.delta.data();

  pack_transposed(p.q.at(b, h, m0), p.q.ss, bm, D, p.scale2, qT, lds, bmp);
  pack_transposed(dout.at(b, h, m0), dout.ss, bm, D, 1.f, doT, lds, bmp);
  std::copy(in.lse2 + bh * S + m0, in.lse2 + bh * S + m0 + bm, lse2);
  std::copy(in.delta + bh * S + m0, in.delta + bh * S + m0 + bm, delta);
  fill(lse2 + bm, bmp - bm, 0.f);
  fill(delta + bm, bmp - bm, 0.f);
  fill(dq, bm * Dp, 0.f);
  const int64_t hi = std::min(S, std::max(m0 + bm, M));
  for (int64_t n0 = 0; n0 < hi; n0 += kBwdBlockN) {
    const int64_t bn = std::min(kBwdBlockN, hi - n0);
    const View kt = rows_view(p.k.at(b, h, n0), p.k.ss, bn, D, Dp, w.kbuf.data(), true);
    const View vt = rows_view(p.v.at(b, h, n0), p.v.ss, bn, D, Dp, w.vbuf.data(), false);
    gemm<kAvx2, false>(bn, bmp, D, kt.ptr, kt.ld, qT, lds, s, lds, false);    // S^T, log2 units
    gemm<kAvx2, false>(bn, bmp, D, vt.ptr, vt.ld, doT, lds, dp, lds, false);  // dP^T = V dO^T
    const bool full = fully_visible(m0, n0, bn, M);
    for (int64_t jj = 0; jj < bn; ++jj) {
      float *srow = s + jj * lds, *dprow = dp + jj * lds;
      probs_and_dscores<true>(srow, dprow, bmp, lse2, delta);
      if (!full) fill(dprow, masked_queries(n0 + jj, m0, bm, M), 0.f);
    }
    gemm<kAvx2, true>(bm, Dp, bn, dp, lds, kt.ptr, kt.ld, dq, Dp, true);  // dQ += dS K
  }
  T* dq_out = static_cast<T*>(in.dq) + (bh * S + m0) * D;
  for (int64_t i = 0; i < bm; ++i) {
    for (int64_t x = 0; x < D; ++x) dq_out[i * D + x] = static_cast<T>(dq[i * Dp + x] * p.scale);
  }
}

// The fused backward: dK, dV and dQ of one (b, h) in one pass over its key tiles. Per pair of tiles it runs
// 5 products (S, dP, dV, dK, dQ) and one exp, against 7 and two for the split dK/dV + dQ passes, at the price of
// an fp32 (S, Dp) dQ buffer per thread and of (b, h) tasks only.
template <bool kAvx2, typename T>
AIMV2_INLINE void fused_task(const Problem<T>& p, const Rows<T>& dout, const BackwardIn& in, int64_t bh,
                             KeyTileWork& w) {
  const int64_t S = p.S, D = p.D, Dp = p.Dp;
  if (w.kbuf.size() < static_cast<size_t>(kBwdBlockN * Dp)) w.kbuf.resize(kBwdBlockN * Dp);
  if (w.dq.size() < static_cast<size_t>(S * Dp)) w.dq.resize(S * Dp);
  fill(w.dq.data(), S * Dp, 0.f);
  for (int64_t tile = 0; tile * kBwdBlockN < S; ++tile) dkdv_task<kAvx2, true>(p, dout, in, bh, tile, w);
  T* dq_out = static_cast<T*>(in.dq) + bh * S * D;
  const float* dq = w.dq.data();
  for (int64_t i = 0; i < S; ++i) {
    for (int64_t x = 0; x < D; ++x) dq_out[i * D + x] = static_cast<T>(dq[i * Dp + x] * p.scale);
  }
}

template <typename T>
AIMV2_TARGET_AVX2 void dkdv_task_avx2(const Problem<T>& p, const Rows<T>& dout, const BackwardIn& in,
                                      int64_t bh, int64_t tile, KeyTileWork& w) {
  dkdv_task<true, false>(p, dout, in, bh, tile, w);
}
template <typename T>
void dkdv_task_generic(const Problem<T>& p, const Rows<T>& dout, const BackwardIn& in, int64_t bh, int64_t tile,
                       KeyTileWork& w) {
  dkdv_task<false, false>(p, dout, in, bh, tile, w);
}
template <typename T>
AIMV2_TARGET_AVX2 void fused_task_avx2(const Problem<T>& p, const Rows<T>& dout, const BackwardIn& in,
                                       int64_t bh, KeyTileWork& w) {
  fused_task<true>(p, dout, in, bh, w);
}
template <typename T>
void fused_task_generic(const Problem<T>& p, const Rows<T>& dout, const BackwardIn& in, int64_t bh,
                        KeyTileWork& w) {
  fused_task<false>(p, dout, in, bh, w);
}
template <typename T>
AIMV2_TARGET_AVX2 void dq_task_avx2(const Problem<T>& p, const Rows<T>& dout, const BackwardIn& in, int64_t bh,
                                    int64_t tile, QueryTileWork& w) {
  dq_task<true>(p, dout, in, bh, tile, w);
}
template <typename T>
void dq_task_generic(const Problem<T>& p, const Rows<T>& dout, const BackwardIn& in, int64_t bh, int64_t tile,
                     QueryTileWork& w) {
  dq_task<false>(p, dout, in, bh, tile, w);
}

// Runs fn() once on each of `workers` threads of torch's intra-op pool (at::parallel_for's threads).
// at::parallel_for is a header template: in a torch built with OpenMP (AT_PARALLEL_OPENMP, the Linux wheels) it
// forks only if this file is compiled with -fopenmp, and runs everything on the calling thread otherwise. Without
// -fopenmp, this forks through the OpenMP runtime that torch has loaded, with the call `#pragma omp parallel`
// compiles to (GOMP_parallel, a weak symbol: absent, the work runs on the calling thread as before).
// NOTE: without this, setup.py's flags (no -fopenmp) ran the B=4, H=8, S=1024, D=64 fp32 forward in 136 ms on
// two threads, as on one; forking, 60 ms (2-core Zen 3).
template <typename Fn>
void on_threads(int64_t workers, const Fn& fn) {
#if AT_PARALLEL_OPENMP && !defined(_OPENMP) && defined(__ELF__)
  if (workers > 1 && GOMP_parallel != nullptr && !at::in_parallel_region()) {
    struct Context {
      const Fn* fn = nullptr;
      std::atomic_flag failed = ATOMIC_FLAG_INIT;
      std::exception_ptr error;
    } context;
    context.fn = &fn;
    auto run = [](void* data) {
      auto* c = static_cast<Context*>(data);
      try {
        (*c->fn)();
      } catch (...) {  // an exception must not leave an OpenMP region
        if (!c->failed.test_and_set()) c->error = std::current_exception();
      }
    };
    GOMP_parallel(run, &context, static_cast<unsigned>(workers), 0);
    if (context.error) std::rethrow_exception(context.error);
    return;
  }
#endif
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { fn(); });
}

// Runs body(task, work) for every task in [0, n) on the intra-op threads, one Work per thread, handing the
// tasks out one at a time in index order. Tile costs differ a lot (a causal query tile late in the sequence sees
// 16x the keys of the first one, and prefixes differ per sample) and a core may be taken by another process: a
// static split of the range would wait on the slower half. Callers number the tasks head by head, the heaviest
// tile of a head first: a head's K and V (512 KB at S=1024, D=64, fp32) stay in cache across its tiles.
// NOTE: numbering the tiles across heads instead (all heads' last tiles first) made the B=4, H=8, S=1024, D=64
// fp32 forward 128 ms instead of 104 ms and the backward 440 ms instead of 392 ms (one core, Zen 3).
template <typename Work, typename Body>
void run_tasks(int64_t n, int64_t D, int64_t Dp, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  on_threads(workers, [&] {
    Work work(D, Dp);
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      body(t, work);
    }
  });
}

struct NoWork {
  NoWork(int64_t, int64_t) {}
};

// The fused backward (one task per (b, h)) when there are enough (b, h) to keep every thread busy, else the
// split one (tasks per tile). AIMV2_CPU_ATTENTION_BACKWARD=fused or =split forces one (tests take both paths).
bool use_fused_backward(int64_t heads) {
  const char* force = std::getenv("AIMV2_CPU_ATTENTION_BACKWARD");
  if (force != nullptr && std::strcmp(force, "fused") == 0) return true;
  if (force != nullptr && std::strcmp(force, "split") == 0) return false;
  return heads >= 4 * at::get_num_threads();
}

// ---------------------------------------------------------------------------------------------------------
// Entry points: argument checks, layouts, dispatch

constexpr const char* kFwd = "prefix_attention_forward_out";
constexpr const char* kBwd = "prefix_attention_backward_out";

// fp32, fp16 and bf16 only (no float64 instantiation: the public op sends float64 to the reference).
#define AIMV2_DISPATCH_ATTENTION(TYPE, NAME, ...)                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)               \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)        \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// A (B, H, S, D) input with a contiguous last dimension (copied once otherwise).
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

void check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but q has dtype ", q.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q ", q.sizes(), ", got ",
              t.sizes());
}

void check_output(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Checks q, k, v, prefix_lens and scale; returns prefix_lens as contiguous int64 (undefined when unused).
at::Tensor check_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& prefix_lens, bool causal, double scale) {
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, S, D), got shape ", q.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": q must be float32, bfloat16 or float16, got ", dtype);
  check_input(op, "k", k, q);
  check_input(op, "v", v, q);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (!causal || !prefix_lens.has_value()) return at::Tensor();
  const at::Tensor& lens = *prefix_lens;
  TORCH_CHECK(lens.device().is_cpu(), op, ": prefix_lens must be a CPU tensor, got ", lens.device());
  TORCH_CHECK(at::isIntegralType(lens.scalar_type(), /*includeBool=*/false), op,
              ": prefix_lens must be an integer tensor, got ", lens.scalar_type());
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == q.size(0), op, ": prefix_lens must have shape (", q.size(0),
              ",), got ", lens.sizes());
  at::Tensor prefix = lens.to(at::kLong).contiguous();
  const int64_t* values = prefix.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < prefix.numel(); ++b) {
    TORCH_CHECK(0 <= values[b] && values[b] <= q.size(2), op, ": prefix_lens must lie in [0, ", q.size(2),
                "], got ", values[b], " at index ", b);
  }
  return prefix;
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix,
                        bool causal, double scale) {
  const int64_t D = q.size(3);
  return {q.size(0), q.size(1), q.size(2), D, round_up(D, kNR), rows_of<T>(q), rows_of<T>(k), rows_of<T>(v),
          prefix.defined() ? prefix.const_data_ptr<int64_t>() : nullptr, causal, static_cast<float>(scale),
          static_cast<float>(scale) * kLog2e};
}

void prefix_attention_forward_out_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                      const std::optional<at::Tensor>& prefix_lens, bool causal, double scale,
                                      const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor prefix = check_problem(kFwd, q_in, k_in, v_in, prefix_lens, causal, scale);
  const int64_t B = q_in.size(0), H = q_in.size(1), S = q_in.size(2);
  check_output(kFwd, "out", out, q_in.sizes(), q_in.scalar_type());
  check_output(kFwd, "lse", lse, {B, H, S}, at::kFloat);
  if (out.numel() == 0) return;
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t tiles = (S + kBlockM - 1) / kBlockM;
  AIMV2_DISPATCH_ATTENTION(q.scalar_type(), kFwd, [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(q, k, v, prefix, causal, scale);
    const ForwardOut o{out.mutable_data_ptr(), lse.mutable_data_ptr<float>()};
    const bool avx2 = simd::avx2_enabled();
    run_tasks<ForwardWork>(B * H * tiles, p.D, p.Dp, [&](int64_t t, ForwardWork& w) {
      const int64_t bh = t / tiles, tile = tiles - 1 - t % tiles;  // late (heavier) query tiles first
      avx2 ? forward_task_avx2(p, o, bh, tile, w) : forward_task_generic(p, o, bh, tile, w);
    });
  });
}

void prefix_attention_backward_out_cpu(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                       const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
                                       const at::Tensor& lse_in, const std::optional<at::Tensor>& prefix_lens,
                                       bool causal, double scale, const at::Tensor& grad_q,
                                       const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const at::Tensor prefix = check_problem(kBwd, q_in, k_in, v_in, prefix_lens, causal, scale);
  check_input(kBwd, "grad_out", grad_out_in, q_in);
  check_input(kBwd, "out", out_in, q_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), S = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(lse_in.device().is_cpu() && lse_in.scalar_type() == at::kFloat &&
                  lse_in.sizes() == at::IntArrayRef({B, H, S}),
              kBwd, ": lse must be a float32 CPU tensor of shape (", B, ", ", H, ", ", S, "), got ",
              lse_in.scalar_type(), " ", lse_in.sizes(), " on ", lse_in.device());
  check_output(kBwd, "grad_q", grad_q, q_in.sizes(), q_in.scalar_type());
  check_output(kBwd, "grad_k", grad_k, q_in.sizes(), q_in.scalar_type());
  check_output(kBwd, "grad_v", grad_v, q_in.sizes(), q_in.scalar_type());
  if (grad_q.numel() == 0) return;
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor grad_out = unit_last_stride(grad_out_in), out = unit_last_stride(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor delta = at::empty({B, H, S}, q.options().dtype(at::kFloat));
  AIMV2_DISPATCH_ATTENTION(q.scalar_type(), kBwd, [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(q, k, v, prefix, causal, scale);
    const Rows<scalar_t> dout = rows_of<scalar_t>(grad_out), o = rows_of<scalar_t>(out);
    float* delta_ptr = delta.mutable_data_ptr<float>();
    // delta_i = sum_d dO_id O_id (O as saved, in q's dtype), one (b, h) at a time.
    run_tasks<NoWork>(B * H, D, p.Dp, [&](int64_t bh, NoWork&) {
      for (int64_t i = 0; i < S; ++i) {
        const scalar_t *g = dout.at(bh / H, bh % H, i), *y = o.at(bh / H, bh % H, i);
        float sum = 0.f;
        for (int64_t x = 0; x < D; ++x) sum += to_float(g[x]) * to_float(y[x]);
        delta_ptr[bh * S + i] = sum;
      }
    });
    const BackwardIn in{lse.const_data_ptr<float>(), delta_ptr, grad_q.mutable_data_ptr(),
                        grad_k.mutable_data_ptr(), grad_v.mutable_data_ptr()};
    const bool avx2 = simd::avx2_enabled();
    if (use_fused_backward(B * H)) {
      // Heaviest (b, h) first: the cost grows with the prefix (S^2 + M^2 visible pairs, about).
      std::vector<int64_t> order(B * H);
      for (int64_t t = 0; t < B * H; ++t) order[t] = t;
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
        return p.visible_prefix(x / H) > p.visible_prefix(y / H);
      });
      run_tasks<KeyTileWork>(B * H, D, p.Dp, [&](int64_t t, KeyTileWork& w) {
        avx2 ? fused_task_avx2(p, dout, in, order[t], w) : fused_task_generic(p, dout, in, order[t], w);
      });
      return;
    }
    const int64_t key_tiles = (S + kBwdBlockN - 1) / kBwdBlockN, query_tiles = (S + kBwdBlockM - 1) / kBwdBlockM;
    run_tasks<KeyTileWork>(B * H * key_tiles, D, p.Dp, [&](int64_t t, KeyTileWork& w) {
      const int64_t bh = t / key_tiles, tile = t % key_tiles;  // early (heavier) key tiles first
      avx2 ? dkdv_task_avx2(p, dout, in, bh, tile, w) : dkdv_task_generic(p, dout, in, bh, tile, w);
    });
    run_tasks<QueryTileWork>(B * H * query_tiles, D, p.Dp, [&](int64_t t, QueryTileWork& w) {
      const int64_t bh = t / query_tiles, tile = query_tiles - 1 - t % query_tiles;  // late (heavier) first
      avx2 ? dq_task_avx2(p, dout, in, bh, tile, w) : dq_task_generic(p, dout, in, bh, tile, w);
    });
  });
}

}  // namespace

// The schemas are in ops.cpp.
TORCH_LIBRARY_IMPL(aimv2, CPU, m) {
  m.impl("prefix_attention_forward_out", &prefix_attention_forward_out_cpu);
  m.impl("prefix_attention_backward_out", &prefix_attention_backward_out_cpu);
}

}  // namespace aimv2
