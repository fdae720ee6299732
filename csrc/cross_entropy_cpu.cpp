// Fused softmax cross-entropy rows on the CPU: one task per row computes its logsumexp, its loss and the
// gradient of its loss with respect to its logits, in fp32, reading the row from memory once.
//
// For row r with logits x (V values), target t, smoothing eps and z-loss weight z:
//   lse[r]       = m + log s,    m = max_k x_k,  s = sum_k exp(x_k - m)
//   loss_rows[r] = log s + (1 - eps)(m - x_t) + eps (m - mean_k x_k) + z lse^2           0 when t == ignore_index
//   grad[r, k]   = scale_r (softmax_k (1 + 2 z lse) - (1 - eps) [k == t] - eps / V)     0 when t == ignore_index
// (= d loss_rows[r] / d x_k, times scale_r), rounded once to the logits' dtype. scale_r is 1, one scalar or a
// per-row value (grad_scale). `saved_lse` gives the backward form: the lse is read instead of computed and the
// gradient costs one exp per element (loss_rows then cannot be asked for).
// The lse travels in float64: exp(x - lse) with lse rounded to fp32 is off by |lse| * 2^-24 relatively, which
// tripled the gradient's error against float64 (5.8e-7 against the reference's 1.8e-7 at V=33, |x| ~ 3, 40
// seeds); with lse = hi + lo, exp(x - hi) * exp(-lo) keeps it at 2.2e-7. Likewise the loss is formed from m and
// log s rather than from lse - x_t: at |x| ~ 1e4, lse rounded to fp32 is off by up to 5e-4.
//
// Two schemas, one kernel: cross_entropy_rows_out writes the gradient to a separate buffer;
// cross_entropy_rows_inplace overwrites the logits with it (the linear cross-entropy's chunk buffer).
// Rows are split over threads (at::parallel_for). A bf16/fp16 row is converted once into an fp32 scratch row;
// fp32 rows are used where they are (the exps land in the gradient buffer, which is then scaled in place).
//
// NOTE: the row loops use GCC/Clang vector extensions with a polynomial exp (Cephes expf, max error 1.4 ulp
// measured over [-87, 88]), built for AVX2+FMA and picked at run time, with a portable 4-lane build as
// fallback (csrc/cpu_simd.h: the vectors, the exp, and the one switch between the builds that the attention
// kernel uses too). at::vec is not used: an extension is compiled without CPU_CAPABILITY_AVX2, so its
// Vectorized<float> is the DEFAULT one, whose exp() calls std::exp per lane. Max + sum-of-exp over a
// 32000-float row, this 2-core AMD EPYC (Milan) VM, g++ 12 -O3: 7.3 ns/element with at::vec, 0.70 with the AVX2
// build here, 2.4 with the 4-lane fallback.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_simd.h"
#include "cross_entropy_args.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace aimv2 {
namespace {

// ------------------------------------------------------------------------------------------ row primitives
// Each works on contiguous fp32 values; `out` may equal `x` (element k is read before it is written).
struct RowOps {
  // max_k x_k, and (if want_sum) sum_k x_k in double.
  void (*max_sum)(const float* x, int64_t n, bool want_sum, float* max, double* sum);
  // sum_k exp(x_k - shift) in double; out_k = exp(x_k - shift) when out is not null.
  double (*exp_sum)(const float* x, int64_t n, float shift, float* out);
  // out_k = exp(x_k - shift) * a - b
  void (*exp_affine)(const float* x, int64_t n, float shift, float a, float b, float* out);
  // out_k = x_k * a - b
  void (*affine)(const float* x, int64_t n, float a, float b, float* out);
};

// Partial sums are added into a double every kBlock elements, so no fp32 accumulator sums more than
// kBlock / lanes terms.
constexpr int64_t kBlock = 1024;

#if defined(__GNUC__)  // GCC and Clang: vector extensions (csrc/cpu_simd.h)

using simd::F4;
using simd::F8;
using simd::kLanes;
using simd::lane_sum;
using simd::load;
using simd::splat;
using simd::store;
using simd::vexp;
using simd::vmax;

template <class F> AIMV2_INLINE float exp1(float x) { return vexp(splat<F>(x))[0]; }  // the tails use the same exp

template <class F> AIMV2_INLINE void max_sum_impl(const float* x, int64_t n, bool want_sum, float* max,
                                                  double* sum) {
  constexpr int64_t W = kLanes<F>;
  F m0 = splat<F>(-std::numeric_limits<float>::infinity()), m1 = m0;
  double total = 0.0;
  int64_t k = 0;
  while (k + 2 * W <= n) {
    F s0 = splat<F>(0.f), s1 = s0;
    const int64_t stop = std::min(n, k + kBlock);
    for (; k + 2 * W <= stop; k += 2 * W) {
      const F a = load<F>(x + k), b = load<F>(x + k + W);
      m0 = vmax(m0, a);
      m1 = vmax(m1, b);
      s0 += a;
      s1 += b;
    }
    if (want_sum) total += lane_sum(s0 + s1);
  }
  const F m = vmax(m0, m1);
  float result = m[0];
  for (int64_t j = 1; j < W; ++j) result = std::max(result, m[j]);
  for (; k < n; ++k) {
    result = std::max(result, x[k]);
    total += x[k];
  }
  *max = result;
  *sum = total;
}

template <class F> AIMV2_INLINE double exp_sum_impl(const float* x, int64_t n, float shift, float* out) {
  constexpr int64_t W = kLanes<F>;
  double total = 0.0;
  int64_t k = 0;
  while (k + 2 * W <= n) {
    F s0 = splat<F>(0.f), s1 = s0;
    const int64_t stop = std::min(n, k + kBlock);
    for (; k + 2 * W <= stop; k += 2 * W) {
      const F a = vexp(load<F>(x + k) - shift), b = vexp(load<F>(x + k + W) - shift);
      if (out != nullptr) {
        store(out + k, a);
        store(out + k + W, b);
      }
      s0 += a;
      s1 += b;
    }
    total += lane_sum(s0 + s1);
  }
  for (; k < n; ++k) {
    const float e = exp1<F>(x[k] - shift);
    if (out != nullptr) out[k] = e;
    total += e;
  }
  return total;
}

template <class F> AIMV2_INLINE void exp_affine_impl(const float* x, int64_t n, float shift, float a, float b,
                                                     float* out) {
  constexpr int64_t W = kLanes<F>;
  int64_t k = 0;
  for (; k + W <= n; k += W) store(out + k, vexp(load<F>(x + k) - shift) * a - b);
  for (; k < n; ++k) out[k] = exp1<F>(x[k] - shift) * a - b;
}

template <class F> AIMV2_INLINE void affine_impl(const float* x, int64_t n, float a, float b, float* out) {
  constexpr int64_t W = kLanes<F>;
  int64_t k = 0;
  for (; k + W <= n; k += W) store(out + k, load<F>(x + k) * a - b);
  for (; k < n; ++k) out[k] = x[k] * a - b;
}

// One set of row functions per instruction set; the template bodies are inlined into each.
#define AIMV2_ROW_OPS(NAME, F, TARGET)                                                                        \
  TARGET void NAME##_max_sum(const float* x, int64_t n, bool w, float* m, double* s) {                      \
    max_sum_impl<F>(x, n, w, m, s);                                                                          \
  }                                                                                                          \
  TARGET double NAME##_exp_sum(const float* x, int64_t n, float c, float* o) { return exp_sum_impl<F>(x, n, c, o); } \
  TARGET void NAME##_exp_affine(const float* x, int64_t n, float c, float a, float b, float* o) {           \
    exp_affine_impl<F>(x, n, c, a, b, o);                                                                    \
  }                                                                                                          \
  TARGET void NAME##_affine(const float* x, int64_t n, float a, float b, float* o) { affine_impl<F>(x, n, a, b, o); } \
  constexpr RowOps NAME##_ops{NAME##_max_sum, NAME##_exp_sum, NAME##_exp_affine, NAME##_affine};

AIMV2_ROW_OPS(portable, F4, )
#if defined(__x86_64__) || defined(__i386__)
AIMV2_ROW_OPS(avx2, F8, AIMV2_TARGET_AVX2)
#endif

// The AVX2+FMA build where simd::avx2_enabled() says so (csrc/cpu_simd.h: AIMV2_CPU_SIMD=portable forces the
// portable one; the tests use it to run the fallback).
const RowOps& row_ops() {
#if defined(__x86_64__) || defined(__i386__)
  if (simd::avx2_enabled()) return avx2_ops;
#endif
  return portable_ops;
}

#else  // other compilers: plain loops

void scalar_max_sum(const float* x, int64_t n, bool, float* m, double* s) {
  float result = -std::numeric_limits<float>::infinity();
  double total = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    result = std::max(result, x[k]);
    total += x[k];
  }
  *m = result;
  *s = total;
}
double scalar_exp_sum(const float* x, int64_t n, float c, float* o) {
  double total = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    const float e = std::exp(x[k] - c);
    if (o != nullptr) o[k] = e;
    total += e;
  }
  return total;
}
void scalar_exp_affine(const float* x, int64_t n, float c, float a, float b, float* o) {
  for (int64_t k = 0; k < n; ++k) o[k] = std::exp(x[k] - c) * a - b;
}
void scalar_affine(const float* x, int64_t n, float a, float b, float* o) {
  for (int64_t k = 0; k < n; ++k) o[k] = x[k] * a - b;
}
const RowOps& row_ops() {
  static const RowOps ops{scalar_max_sum, scalar_exp_sum, scalar_exp_affine, scalar_affine};
  return ops;
}
#endif

// ------------------------------------------------------------------------------------------------ one row

struct Options {
  int64_t vocab, ignore_index;
  float smoothing, z_loss;
};

// Where one row's results go; null pointers are not asked for. `grad` may equal `x`.
template <typename T> struct Row {
  const T* x;
  T* grad;
  int64_t target;
  float scale;
  const double* saved_lse;
  float* loss;
  double* lse;
};

template <typename T> void to_float(const T* x, int64_t n, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(x[k]);
}

template <typename T> void from_float(const float* x, int64_t n, T* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(x[k]);
}

// `scratch` holds vocab floats; it is used for bf16/fp16 rows only.
template <typename T> void ce_row(const RowOps& ops, const Options& o, const Row<T>& row, float* scratch) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  const int64_t V = o.vocab;
  const bool counted = row.target != o.ignore_index;
  if (row.loss != nullptr) *row.loss = 0.f;
  if (!counted && row.lse == nullptr) {
    if (row.grad != nullptr) std::fill(row.grad, row.grad + V, static_cast<T>(0));
    return;
  }
  const float* x = nullptr;  // the row in fp32
  if constexpr (kFloat) {
    x = row.x;
  } else {
    to_float(row.x, V, scratch);
    x = scratch;
  }
  // Gradient coefficients, for a row of lse `lse` whose exps are divided by `norm`.
  const float scale = counted ? row.scale : 0.f;
  const float u_coef = o.smoothing / static_cast<float>(V) * scale, t_coef = (1.f - o.smoothing) * scale;
  auto p_coef = [&](float lse, float norm) { return (1.f + 2.f * o.z_loss * lse) * scale / norm; };
  float* w = nullptr;  // fp32 gradient row: the gradient buffer itself for fp32, else the scratch row
  if (row.grad != nullptr && counted) w = kFloat ? reinterpret_cast<float*>(row.grad) : scratch;

  if (row.saved_lse != nullptr) {  // backward: grad = exp(x - lse) * p - u - t [k == target]
    if (w != nullptr) {
      const double lse = *row.saved_lse;
      const float hi = static_cast<float>(lse), lo_factor = static_cast<float>(std::exp(hi - lse));
      ops.exp_affine(x, V, hi, p_coef(hi, 1.f) * lo_factor, u_coef, w);
      w[row.target] -= t_coef;
    }
  } else {
    float m = 0.f;
    double sum_x = 0.0;
    ops.max_sum(x, V, o.smoothing != 0.f, &m, &sum_x);
    const float x_t = counted ? x[row.target] : 0.f;  // read before the row is overwritten
    const double s = ops.exp_sum(x, V, m, w);         // w = exp(x - m)
    const float log_s = static_cast<float>(std::log(s)), lse = m + log_s;
    if (row.lse != nullptr) *row.lse = static_cast<double>(m) + std::log(s);
    if (row.loss != nullptr && counted) {
      const float mean_x = static_cast<float>(sum_x / static_cast<double>(V));
      *row.loss = log_s + (1.f - o.smoothing) * (m - x_t) + o.smoothing * (m - mean_x) + o.z_loss * lse * lse;
    }
    if (w != nullptr) {
      const float p = p_coef(lse, static_cast<float>(s));
      const float e_t = w[row.target];
      ops.affine(w, V, p, u_coef, w);
      w[row.target] = e_t * p - u_coef - t_coef;
    }
  }
  if (row.grad == nullptr) return;
  if (!counted) {
    std::fill(row.grad, row.grad + V, static_cast<T>(0));
  } else if constexpr (!kFloat) {
    from_float(w, V, row.grad);  // the one rounding to T
  }
}

// ------------------------------------------------------------------------------------------------ the op

using ce_args::Buffers;

template <typename T>
void ce_rows_kernel(const at::Tensor& logits, T* grad, int64_t grad_stride, const int64_t* targets,
                    const Options& o, const float* scale, bool per_row_scale, const double* saved_lse,
                    float* loss_rows, double* lse) {
  const RowOps& ops = row_ops();
  const T* x = logits.const_data_ptr<T>();
  const int64_t n = logits.size(0), V = o.vocab, stride = logits.stride(0);
  const int64_t grain = std::max<int64_t>(1, 32768 / V);  // at least about 128 KB of fp32 per task
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(std::is_same_v<T, float> ? 0 : V);
    for (int64_t r = begin; r < end; ++r) {
      const Row<T> row{x + r * stride,
                       grad == nullptr ? nullptr : grad + r * grad_stride,
                       targets[r],
                       scale == nullptr ? 1.f : scale[per_row_scale ? r : 0],
                       saved_lse == nullptr ? nullptr : saved_lse + r,
                       loss_rows == nullptr ? nullptr : loss_rows + r,
                       lse == nullptr ? nullptr : lse + r};
      ce_row<T>(ops, o, row, scratch.data());
    }
  });
}

#define CE_CHECK(cond, ...) TORCH_CHECK(cond, op_name, ": ", __VA_ARGS__)

// Shared entry of both schemas. `grad` is the gradient output: the logits themselves when `in_place`.
void ce_rows(const char* op_name, const at::Tensor& logits_in, const at::Tensor& targets, int64_t ignore_index,
             double label_smoothing, double z_loss, const Buffers& b, const std::optional<at::Tensor>& grad,
             bool in_place) {
  CE_CHECK(logits_in.device().is_cpu(), "logits must be a CPU tensor, got ", logits_in.device());
  const ce_args::Checked c =
      ce_args::check(op_name, logits_in, targets, label_smoothing, z_loss, b, grad, in_place);
  const int64_t n = c.n, V = c.V;
  const at::Tensor &saved_lse = c.saved_lse, &scale = c.scale;
  const at::Tensor long_targets = targets.to(at::kLong).contiguous();
  const int64_t* t = long_targets.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {  // bad targets raise here instead of reading outside a row
    CE_CHECK(t[r] == ignore_index || (0 <= t[r] && t[r] < V), "targets must lie in [0, ", V,
             ") or equal ignore_index=", ignore_index, ", found ", t[r], " at row ", r);
  }
  if (n == 0) return;
  // Rows need a unit column stride; any row stride is fine (chunk views of a buffer).
  const at::Tensor logits = logits_in.stride(1) == 1 || V == 1 ? logits_in : logits_in.contiguous();
  const Options o{V, ignore_index, static_cast<float>(label_smoothing), static_cast<float>(z_loss)};
  float* loss_ptr = b.loss_rows.has_value() ? b.loss_rows->mutable_data_ptr<float>() : nullptr;
  double* lse_ptr = b.lse.has_value() ? b.lse->mutable_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "cross_entropy_rows_cpu", [&] {
    ce_rows_kernel<scalar_t>(logits, grad.has_value() ? grad->mutable_data_ptr<scalar_t>() : nullptr,
                             grad.has_value() ? grad->stride(0) : 0, t, o,
                             scale.defined() ? scale.const_data_ptr<float>() : nullptr,
                             scale.defined() && scale.numel() > 1,  // else one scalar for every row
                             saved_lse.defined() ? saved_lse.const_data_ptr<double>() : nullptr,
                             loss_ptr, lse_ptr);
  });
}

void cross_entropy_rows_out_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                double label_smoothing, double z_loss, const std::optional<at::Tensor>& saved_lse,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& loss_rows, const std::optional<at::Tensor>& lse,
                                const std::optional<at::Tensor>& grad) {
  ce_rows("cross_entropy_rows_out", logits, targets, ignore_index, label_smoothing, z_loss,
          {saved_lse, grad_scale, loss_rows, lse}, grad, /*in_place=*/false);
}

void cross_entropy_rows_inplace_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                    double label_smoothing, double z_loss,
                                    const std::optional<at::Tensor>& saved_lse,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& loss_rows,
                                    const std::optional<at::Tensor>& lse) {
  ce_rows("cross_entropy_rows_inplace", logits, targets, ignore_index, label_smoothing, z_loss,
          {saved_lse, grad_scale, loss_rows, lse}, logits, /*in_place=*/true);
}

}  // namespace

// Schemas: csrc/ops.cpp.
TORCH_LIBRARY_IMPL(aimv2, CPU, m) {
  m.impl("cross_entropy_rows_out", &cross_entropy_rows_out_cpu);
  m.impl("cross_entropy_rows_inplace", &cross_entropy_rows_inplace_cpu);
}

}  // namespace aimv2
