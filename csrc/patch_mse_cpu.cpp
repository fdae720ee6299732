// Fused per-patch-normalized MSE on the CPU: one pass per prediction row, patches gathered straight from NCHW.
//
// For row (b, l), with patch n = l + target_offset of image b:
//   x      = the patch, ordered (row in patch, column in patch, channel), channel fastest   (P = C*p*p values)
//   target = (x - mean(x)) / sqrt(var_unbiased(x) + eps)
//   rows[b, l]    = mean_P (pred[b, l] - target)^2                              0 when n < prefix_lens[b]
//   grad[b, l, :] = grad_rows[b, l] * 2 (pred[b, l] - target) / P  (pred's dtype) 0 when n < prefix_lens[b]
// rows and grad are each optional (the forward asks for rows, the backward for grad), and grad_rows is 1
// when absent. All math is fp32 and grad is rounded to pred's dtype once, as autograd through the reference
// does. A call reads `pred` and `images` once and writes `grad` once.
//
// Work is split by strips: one task is one row of patches of one image (W/p patches). It copies the strip's
// C*p full image rows, each contiguous, into a float buffer of W/p patch vectors, then finishes each patch
// with contiguous, L1-resident loops.
// NOTE: gathering patch by patch instead (p-wide pieces of C*p image rows per patch) spent 74% of its time
// waiting on the image loads: 17 ms per call at B=32, 224 px, fp32, on this 2-core build machine.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace aimv2 {
namespace {

using Vec = at::vec::Vectorized<float>;

float sum_lanes(const Vec& acc) {
  float lanes[Vec::size()];
  acc.store(lanes);
  float total = 0.f;
  for (int64_t i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

// sum_k x[k]; Vec::size() independent accumulators keep the fp32 rounding error small.
float sum(const float* x, int64_t n) {
  Vec acc(0.f);
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) acc += Vec::loadu(x + k);
  float total = sum_lanes(acc);
  for (; k < n; ++k) total += x[k];
  return total;
}

// sum_k (x[k] - shift)^2
float sum_sq_dev(const float* x, int64_t n, float shift) {
  const Vec vshift(shift);
  Vec acc(0.f);
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) {
    const Vec d = Vec::loadu(x + k) - vshift;
    acc += d * d;
  }
  float total = sum_lanes(acc);
  for (; k < n; ++k) total += (x[k] - shift) * (x[k] - shift);
  return total;
}

struct Geometry {
  int64_t channels, height, width, patch, patches_per_row, patch_numel, rows_per_sample, target_offset;
};

// strip[q*P + (i*p + j)*C + c] = image[c, top + i, (first + q)*p + j] for the patches q = 0.. of one strip
// of one (C, H, W) image, starting at patch column `first`. The reads walk whole contiguous image rows.
template <typename scalar_t>
void gather_strip(const scalar_t* image, const Geometry& g, int64_t top, int64_t first, float* strip) {
  const int64_t p = g.patch, C = g.channels, P = g.patch_numel;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < p; ++i) {
      const scalar_t* src = image + (c * g.height + top + i) * g.width;
      for (int64_t q = first; q < g.patches_per_row; ++q) {
        float* dst = strip + (q - first) * P + i * p * C + c;
        const scalar_t* piece = src + q * p;
        for (int64_t j = 0; j < p; ++j) dst[j * C] = static_cast<float>(piece[j]);
      }
    }
  }
}

// One counted row: normalizes `patch`, returns mean_P (pred - target)^2 and, if asked, writes
// grad = grad_row * 2 (pred - target) / P.
template <typename scalar_t>
float row_loss(const scalar_t* pred, const float* patch, int64_t P, float eps, float* diff, float grad_row,
               scalar_t* grad) {
  const float mean = sum(patch, P) / static_cast<float>(P);
  const float var = sum_sq_dev(patch, P, mean) / static_cast<float>(P - 1);
  const float std = std::sqrt(var + eps);
  for (int64_t k = 0; k < P; ++k) diff[k] = static_cast<float>(pred[k]) - (patch[k] - mean) / std;
  if (grad != nullptr) {
    const float scale = 2.f * grad_row / static_cast<float>(P);
    for (int64_t k = 0; k < P; ++k) grad[k] = static_cast<scalar_t>(diff[k] * scale);
  }
  return sum_sq_dev(diff, P, 0.f) / static_cast<float>(P);
}

template <typename scalar_t>
void patch_mse_rows_kernel(const at::Tensor& pred, const at::Tensor& images, const Geometry& g,
                           const int64_t* prefix, float eps, const float* grad_rows, float* rows,
                           scalar_t* grad) {
  const scalar_t* pred_ptr = pred.const_data_ptr<scalar_t>();
  const scalar_t* image_ptr = images.const_data_ptr<scalar_t>();
  const int64_t P = g.patch_numel, L = g.rows_per_sample, per_row = g.patches_per_row;
  const int64_t strips = g.height / g.patch, image_numel = g.channels * g.height * g.width;
  const int64_t grain = std::max<int64_t>(1, 32768 / (per_row * P));  // about 128 KB of fp32 pred per task
  at::parallel_for(0, pred.size(0) * strips, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> strip(per_row * P), diff(P);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / strips, n0 = (t % strips) * per_row;  // first patch of the strip
      // Patches before `first_counted` have no row (n < target_offset) or do not count (n < prefix_lens[b]).
      const int64_t first_counted = std::max({n0, g.target_offset, prefix == nullptr ? int64_t{0} : prefix[b]});
      if (first_counted < n0 + per_row) {
        gather_strip(image_ptr + b * image_numel, g, (t % strips) * g.patch, first_counted - n0, strip.data());
      }
      for (int64_t n = std::max(n0, g.target_offset); n < n0 + per_row; ++n) {
        const int64_t r = b * L + n - g.target_offset;
        scalar_t* grad_row = grad == nullptr ? nullptr : grad + r * P;
        if (n < first_counted) {
          if (rows != nullptr) rows[r] = 0.f;
          if (grad_row != nullptr) std::fill(grad_row, grad_row + P, static_cast<scalar_t>(0));
          continue;
        }
        const float scale = grad_rows == nullptr ? 1.f : grad_rows[r];
        const float* patch = strip.data() + (n - first_counted) * P;
        const float loss = row_loss(pred_ptr + r * P, patch, P, eps, diff.data(), scale, grad_row);
        if (rows != nullptr) rows[r] = loss;
      }
    }
  });
}

void check_output(const char* name, const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(out.device().is_cpu(), "patch_mse_rows_out: ", name, " must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.scalar_type() == dtype, "patch_mse_rows_out: ", name, " must have dtype ", dtype, ", got ",
              out.scalar_type());
  TORCH_CHECK(out.sizes() == shape, "patch_mse_rows_out: ", name, " must have shape ", shape, ", got ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), "patch_mse_rows_out: ", name, " must be contiguous");
}

void patch_mse_rows_out_cpu(const at::Tensor& pred, const at::Tensor& images, int64_t patch_size,
                            const std::optional<at::Tensor>& prefix_lens, int64_t target_offset, double eps,
                            const std::optional<at::Tensor>& grad_rows, const std::optional<at::Tensor>& rows,
                            const std::optional<at::Tensor>& grad) {
  TORCH_CHECK(pred.device().is_cpu() && images.device().is_cpu(),
              "patch_mse_rows_out: pred and images must be CPU tensors, got ", pred.device(), " and ",
              images.device());
  TORCH_CHECK(pred.dim() == 3, "patch_mse_rows_out: pred must be (B, L, P), got shape ", pred.sizes());
  TORCH_CHECK(images.dim() == 4, "patch_mse_rows_out: images must be (B, C, H, W), got shape ", images.sizes());
  const auto dtype = pred.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "patch_mse_rows_out: pred must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(images.scalar_type() == dtype, "patch_mse_rows_out: images has dtype ", images.scalar_type(),
              " but pred has dtype ", dtype);
  TORCH_CHECK(patch_size > 0, "patch_mse_rows_out: patch_size must be positive, got ", patch_size);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK(H % patch_size == 0 && W % patch_size == 0, "patch_mse_rows_out: images height and width (", H,
              ", ", W, ") must be multiples of patch_size=", patch_size);
  const int64_t N = (H / patch_size) * (W / patch_size), P = C * patch_size * patch_size;
  TORCH_CHECK(P >= 2, "patch_mse_rows_out: a patch must hold at least 2 values (C*p*p), got ", P);
  TORCH_CHECK(0 <= target_offset && target_offset <= N, "patch_mse_rows_out: target_offset must lie in [0, ", N,
              "], got ", target_offset);
  const int64_t L = N - target_offset;
  TORCH_CHECK(pred.size(0) == B && pred.size(1) == L && pred.size(2) == P, "patch_mse_rows_out: pred must have "
              "shape (", B, ", ", L, ", ", P, ") for images ", images.sizes(), " and target_offset=",
              target_offset, ", got ", pred.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "patch_mse_rows_out: eps must be a positive float, got ", eps);
  at::Tensor prefix;
  if (prefix_lens.has_value()) {
    const at::Tensor& lens = *prefix_lens;
    TORCH_CHECK(lens.device().is_cpu(), "patch_mse_rows_out: prefix_lens must be a CPU tensor, got ",
                lens.device());
    TORCH_CHECK(at::isIntegralType(lens.scalar_type(), /*includeBool=*/false),
                "patch_mse_rows_out: prefix_lens must be an integer tensor, got ", lens.scalar_type());
    TORCH_CHECK(lens.dim() == 1 && lens.size(0) == B, "patch_mse_rows_out: prefix_lens must have shape (", B,
                ",), got ", lens.sizes());
    prefix = lens.to(at::kLong).contiguous();
  }
  at::Tensor scale;
  if (grad_rows.has_value()) {
    const at::Tensor& g = *grad_rows;
    TORCH_CHECK(g.device().is_cpu(), "patch_mse_rows_out: grad_rows must be a CPU tensor, got ", g.device());
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), "patch_mse_rows_out: grad_rows must be floating point, got ",
                g.scalar_type());
    TORCH_CHECK(g.sizes() == at::IntArrayRef({B, L}), "patch_mse_rows_out: grad_rows must have shape (", B, ", ",
                L, "), got ", g.sizes());
    scale = g.to(at::kFloat).contiguous();  // an expanded scalar (from .sum()) arrives with zero strides
  }
  if (rows.has_value()) check_output("rows", *rows, {B, L}, at::kFloat);
  if (grad.has_value()) check_output("grad", *grad, pred.sizes(), dtype);
  if (B * L == 0 || (!rows.has_value() && !grad.has_value())) return;

  const at::Tensor pred_c = pred.contiguous(), images_c = images.contiguous();
  const Geometry g{C, H, W, patch_size, W / patch_size, P, L, target_offset};
  const int64_t* prefix_ptr = prefix.defined() ? prefix.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "patch_mse_rows_out_cpu", [&] {
    patch_mse_rows_kernel<scalar_t>(pred_c, images_c, g, prefix_ptr, static_cast<float>(eps),
                                    scale.defined() ? scale.const_data_ptr<float>() : nullptr,
                                    rows.has_value() ? rows->mutable_data_ptr<float>() : nullptr,
                                    grad.has_value() ? grad->mutable_data_ptr<scalar_t>() : nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aimv2, CPU, m) { m.impl("patch_mse_rows_out", &patch_mse_rows_out_cpu); }

}  // namespace aimv2
