// CUDA implementation of aimv2::patch_mse_rows_out (schema in csrc/ops.cpp): argument checks as in
// csrc/patch_mse_cpu.cpp, then one launch of the kernel in csrc/cuda/patch_mse.cu. No host synchronisation:
// prefix_lens and grad_rows are converted on the device.
#include "glue.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace aimv2 {

// csrc/cuda/patch_mse.cu
int64_t patch_mse_max_numel();
const char* patch_mse_rows_cuda(int dtype, const void* pred, const int64_t* psz, const int64_t* ps,
                                const void* images, const int64_t* isz, const int64_t* is, int64_t patch_size,
                                int64_t target_offset, const int64_t* prefix, float eps, const float* grad_rows,
                                float* rows, void* grad, void* stream);

namespace {

constexpr const char* kOp = "patch_mse_rows_out";

int dtype_code(at::ScalarType t) { return t == at::kFloat ? 0 : t == at::kBFloat16 ? 1 : 2; }

void check_output(const char* name, const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype,
                  const c10::Device& device) {
  cuda_glue::check_on(kOp, name, out, device);
  TORCH_CHECK(out.scalar_type() == dtype, kOp, ": ", name, " must have dtype ", dtype, ", got ", out.scalar_type());
  TORCH_CHECK(out.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

void patch_mse_rows_out_cuda(const at::Tensor& pred, const at::Tensor& images, int64_t patch_size,
                             const std::optional<at::Tensor>& prefix_lens, int64_t target_offset, double eps,
                             const std::optional<at::Tensor>& grad_rows, const std::optional<at::Tensor>& rows,
                             const std::optional<at::Tensor>& grad) {
  TORCH_CHECK(pred.is_cuda() && images.is_cuda(), kOp, ": pred and images must be CUDA tensors, got ",
              pred.device(), " and ", images.device());
  const c10::Device device = pred.device();
  cuda_glue::check_on(kOp, "images", images, device);
  TORCH_CHECK(pred.dim() == 3, kOp, ": pred must be (B, L, P), got shape ", pred.sizes());
  TORCH_CHECK(images.dim() == 4, kOp, ": images must be (B, C, H, W), got shape ", images.sizes());
  const auto dtype = pred.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
              ": pred must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(images.scalar_type() == dtype, kOp, ": images has dtype ", images.scalar_type(),
              " but pred has dtype ", dtype);
  TORCH_CHECK(patch_size > 0, kOp, ": patch_size must be positive, got ", patch_size);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK(H % patch_size == 0 && W % patch_size == 0, kOp, ": images height and width (", H, ", ", W,
              ") must be multiples of patch_size=", patch_size);
  const int64_t N = (H / patch_size) * (W / patch_size), P = C * patch_size * patch_size;
  TORCH_CHECK(P >= 2, kOp, ": a patch must hold at least 2 values (C*p*p), got ", P);
  TORCH_CHECK(P <= patch_mse_max_numel(), kOp, ": the CUDA kernel supports patches of at most ",
              patch_mse_max_numel(), " values (C*p*p), got ", P);
  TORCH_CHECK(0 <= target_offset && target_offset <= N, kOp, ": target_offset must lie in [0, ", N, "], got ",
              target_offset);
  const int64_t L = N - target_offset;
  TORCH_CHECK(pred.size(0) == B && pred.size(1) == L && pred.size(2) == P, kOp, ": pred must have shape (", B,
              ", ", L, ", ", P, ") for images ", images.sizes(), " and target_offset=", target_offset, ", got ",
              pred.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps > 0, kOp, ": eps must be a positive float, got ", eps);
  at::Tensor prefix;
  if (prefix_lens.has_value()) {
    const at::Tensor& lens = *prefix_lens;
    cuda_glue::check_on(kOp, "prefix_lens", lens, device);
    TORCH_CHECK(at::isIntegralType(lens.scalar_type(), /*includeBool=*/false), kOp,
                ": prefix_lens must be an integer tensor, got ", lens.scalar_type());
    TORCH_CHECK(lens.dim() == 1 && lens.size(0) == B, kOp, ": prefix_lens must have shape (", B, ",), got ",
                lens.sizes());
    prefix = lens.to(at::kLong).contiguous();
  }
  at::Tensor scale;
  if (grad_rows.has_value()) {
    const at::Tensor& g = *grad_rows;
    cuda_glue::check_on(kOp, "grad_rows", g, device);
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), kOp, ": grad_rows must be floating point, got ",
                g.scalar_type());
    TORCH_CHECK(g.sizes() == at::IntArrayRef({B, L}), kOp, ": grad_rows must have shape (", B, ", ", L, "), got ",
                g.sizes());
    scale = g.to(at::kFloat).contiguous();  // an expanded scalar (from .sum()) arrives with zero strides
  }
  if (rows.has_value()) check_output("rows", *rows, {B, L}, at::kFloat, device);
  if (grad.has_value()) check_output("grad", *grad, pred.sizes(), dtype, device);
  if (B * L == 0 || (!rows.has_value() && !grad.has_value())) return;

  c10::DeviceGuard guard(device);
  const int64_t psz[3] = {pred.size(0), pred.size(1), pred.size(2)};
  const int64_t ps[3] = {pred.stride(0), pred.stride(1), pred.stride(2)};
  const int64_t isz[4] = {B, C, H, W};
  const int64_t is[4] = {images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
  const char* error = patch_mse_rows_cuda(
      dtype_code(dtype), pred.const_data_ptr(), psz, ps, images.const_data_ptr(), isz, is, patch_size,
      target_offset, prefix.defined() ? prefix.const_data_ptr<int64_t>() : nullptr, static_cast<float>(eps),
      scale.defined() ? scale.const_data_ptr<float>() : nullptr,
      rows.has_value() ? rows->mutable_data_ptr<float>() : nullptr,
      grad.has_value() ? grad->mutable_data_ptr() : nullptr, cuda_glue::current_stream(device));
  cuda_glue::check_launch(kOp, error);
}

}  // namespace

TORCH_LIBRARY_IMPL(aimv2, CUDA, m) { m.impl("patch_mse_rows_out", &patch_mse_rows_out_cuda); }

}  // namespace aimv2
