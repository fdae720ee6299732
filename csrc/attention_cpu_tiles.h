// Building blocks of the prefix-causal attention CPU kernels (csrc/attention_cpu.cpp): the fp32 GEMM every product
// of the kernels runs, the fp32 views of (B, H, S, D) tiles, the problem and the mask tests. (The tile sizes and
// the tasks are in the .cpp.)
//
// The GEMM is built twice, for the baseline ISA (gemm_generic) and for AVX2+FMA (gemm_avx2), on the 8-lane
// vectors of csrc/cpu_simd.h; gemm<kAvx2> picks the build of the task it is inlined into. Everything else here
// is force-inlined into the tasks' entry points, so it takes their ISA.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_simd.h"

#if !defined(__GNUC__)
#error "attention_cpu.cpp uses GCC/Clang vector extensions"
#endif

namespace aimv2 {
namespace attention_cpu {

using simd::F8;
using simd::load;
using simd::splat;
using simd::store;

constexpr int64_t kNR = 16;  // micro-kernel columns (2 vectors); padded widths are multiples of it
constexpr int kMR = 6;       // micro-kernel rows

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------------------
// GEMM: C[m x n] (+)= op(A)[m x k] B[k x n], fp32. B and C row-major with n a multiple of kNR (padded
// buffers); op(A)(i, p) = A[i * lda + p], or A[p * lda + i] when kAT.
template <int MR, bool kAT>
AIMV2_INLINE void micro_kernel(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                               int64_t ldc, bool accumulate) {
  F8 acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = splat<F8>(0.f);
  for (int64_t p = 0; p < k; ++p) {
    const F8 b0 = load<F8>(b + p * ldb), b1 = load<F8>(b + p * ldb + 8);
    for (int i = 0; i < MR; ++i) {
      const float s = kAT ? a[p * lda + i] : a[i * lda + p];
      acc0[i] += s * b0;
      acc1[i] += s * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      acc0[i] += load<F8>(ci);
      acc1[i] += load<F8>(ci + 8);
    }
    store(ci, acc0[i]);
    store(ci + 8, acc1[i]);
  }
}

template <bool kAT>
AIMV2_INLINE void gemm_body(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                            int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += kNR) {
    for (int64_t i = 0; i < m; i += kMR) {
      const float* ai = kAT ? a + i : a + i * lda;
      float* cij = c + i * ldc + j;
      switch (std::min<int64_t>(kMR, m - i)) {
        case 6: micro_kernel<6, kAT>(k, ai, lda, b + j, ldb, cij, ldc, accumulate); break;
        case 5: micro_kernel<5, kAT>(k, ai, lda, b + j, ldb, cij, ldc, accumulate); break;
        case 4: micro_kernel<4, kAT>(k, ai, lda, b + j, ldb, cij, ldc, accumulate); break;
        case 3: micro_kernel<3, kAT>(k, ai, lda, b + j, ldb, cij, ldc, accumulate); break;
        case 2: micro_kernel<2, kAT>(k, ai, lda, b + j, ldb, cij, ldc, accumulate); break;
        default: micro_kernel<1, kAT>(k, ai, lda, b + j, ldb, cij, ldc, accumulate); break;
      }
    }
  }
}

template <bool kAT>
void gemm_generic(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                  float* c, int64_t ldc, bool accumulate) {
  gemm_body<kAT>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

template <bool kAT>
AIMV2_TARGET_AVX2 void gemm_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  gemm_body<kAT>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

template <bool kAvx2, bool kAT>
AIMV2_INLINE void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                       float* c, int64_t ldc, bool accumulate) {
  if constexpr (kAvx2) {
    gemm_avx2<kAT>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  } else {
    gemm_generic<kAT>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tiles of the (B, H, S, D) inputs

template <typename T>
AIMV2_INLINE float to_float(T x) {
  return static_cast<float>(x);
}
template <>
AIMV2_INLINE float to_float<c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// A strided (B, H, S, D) tensor with a contiguous last dimension.
template <typename T>
struct Rows {
  const T* data;
  int64_t sb, sh, ss;
  const T* at(int64_t b, int64_t h, int64_t s) const { return data + b * sb + h * sh + s * ss; }
};

struct View {
  const float* ptr;
  int64_t ld;
};

// `rows` rows of D values as fp32, row-major. fp32 rows are used in place when they can be: always as an A
// operand (`padded` false), and as a B operand when D is a multiple of kNR. Otherwise they are converted into
// `buf` with rows of Dp values, zero past D.
template <typename T>
AIMV2_INLINE View rows_view(const T* src, int64_t stride, int64_t rows, int64_t D, int64_t Dp, float* buf,
                            bool padded) {
  if constexpr (std::is_same_v<T, float>) {
    if (!padded || D == Dp) return {src, stride};
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    float* d = buf + r * Dp;
    for (int64_t x = 0; x < D; ++x) d[x] = to_float(s[x]);
    for (int64_t x = D; x < Dp; ++x) d[x] = 0.f;
  }
  return {buf, Dp};
}

// dst[x * ld + r] = mult * src[r, x] for r < rows, 0 for rows <= r < width (D rows of `width` values).
template <typename T>
AIMV2_INLINE void pack_transposed(const T* src, int64_t stride, int64_t rows, int64_t D, float mult, float* dst,
                                  int64_t ld, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    for (int64_t x = 0; x < D; ++x) dst[x * ld + r] = mult * to_float(s[x]);
  }
  for (int64_t x = 0; x < D; ++x) std::fill(dst + x * ld + rows, dst + x * ld + width, 0.f);
}

AIMV2_INLINE void fill(float* p, int64_t n, float value) { std::fill(p, p + n, value); }

// ---------------------------------------------------------------------------------------------------------
// The problem, shared by the three loops

template <typename T>
struct Problem {
  int64_t B, H, S, D, Dp;
  Rows<T> q, k, v;
  const int64_t* prefix;  // nullptr: 0
  bool causal;
  float scale;
  float scale2;  // scale * log2(e)
  // M_b: keys j < M_b are visible to every query (S when not causal).
  int64_t visible_prefix(int64_t b) const { return !causal ? S : prefix == nullptr ? 0 : prefix[b]; }
};

// Keys [n0, n0 + bn) are visible to every query of [m0, ...) with prefix M.
AIMV2_INLINE bool fully_visible(int64_t m0, int64_t n0, int64_t bn, int64_t M) {
  return n0 + bn <= std::max(M, m0 + 1);
}

// Number of masked queries at the start of row j' = n0 + jj of an S^T tile whose queries start at m0.
AIMV2_INLINE int64_t masked_queries(int64_t key, int64_t m0, int64_t bm, int64_t M) {
  return key >= M ? std::clamp<int64_t>(key - m0, 0, bm) : 0;
}

}  // namespace attention_cpu
}  // namespace aimv2
