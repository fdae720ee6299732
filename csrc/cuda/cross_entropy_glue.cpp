// CUDA implementations of aimv2::cross_entropy_rows_out and aimv2::cross_entropy_rows_inplace (schemas in
// csrc/ops.cpp): argument checks shared with the CPU op (csrc/cross_entropy_args.h), then one launch of the kernel in
// csrc/cuda/cross_entropy.cu. No host synchronisation: targets, grad_scale and saved_lse are converted on the
// device, so target values are NOT checked here (the CPU op checks them on the host; the Python side validates
// them beforehand). The kernel never reads outside a row: a target outside [0, V) that is not ignore_index
// gives that row a NaN loss and a NaN gradient.
#include "glue.h"
#include "../cross_entropy_args.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace aimv2 {

// csrc/cuda/cross_entropy.cu
const char* cross_entropy_rows_cuda(int dtype, const void* logits, int64_t n, int64_t V, int64_t x_stride,
                                    void* grad, int64_t grad_stride, const int64_t* targets, int64_t ignore_index,
                                    float label_smoothing, float z_loss, const float* scale, bool per_row_scale,
                                    const double* saved_lse, float* loss, double* lse, void* stream);

namespace {

#define CE_CHECK(cond, ...) TORCH_CHECK(cond, op_name, ": ", __VA_ARGS__)

using ce_args::Buffers;

int dtype_code(at::ScalarType t) { return t == at::kFloat ? 0 : t == at::kBFloat16 ? 1 : 2; }

// Shared entry of both schemas. `grad` is the gradient output: the logits themselves when `in_place`.
void ce_rows(const char* op_name, const at::Tensor& logits_in, const at::Tensor& targets, int64_t ignore_index,
             double label_smoothing, double z_loss, const Buffers& b, const std::optional<at::Tensor>& grad,
             bool in_place) {
  CE_CHECK(logits_in.is_cuda(), "logits must be a CUDA tensor, got ", logits_in.device());
  const ce_args::Checked c =
      ce_args::check(op_name, logits_in, targets, label_smoothing, z_loss, b, grad, in_place);
  const int64_t n = c.n, V = c.V;
  const at::Tensor &saved_lse = c.saved_lse, &scale = c.scale;
  const c10::Device device = logits_in.device();
  if (n == 0) return;
  if (!grad.has_value() && !b.loss_rows.has_value() && !b.lse.has_value()) return;  // nothing asked for

  c10::DeviceGuard guard(device);
  const at::Tensor long_targets = targets.to(at::kLong).contiguous();
  // Rows need a unit column stride; any row stride is fine (chunk views of a buffer).
  const at::Tensor logits = logits_in.stride(1) == 1 || V == 1 ? logits_in : logits_in.contiguous();
  const char* error = cross_entropy_rows_cuda(
      dtype_code(c.dtype), logits.const_data_ptr(), n, V, logits.stride(0),
      grad.has_value() ? grad->mutable_data_ptr() : nullptr, grad.has_value() ? grad->stride(0) : 0,
      long_targets.const_data_ptr<int64_t>(), ignore_index, static_cast<float>(label_smoothing),
      static_cast<float>(z_loss), scale.defined() ? scale.const_data_ptr<float>() : nullptr,
      scale.defined() && scale.numel() > 1,  // else one scalar for every row
      saved_lse.defined() ? saved_lse.const_data_ptr<double>() : nullptr,
      b.loss_rows.has_value() ? b.loss_rows->mutable_data_ptr<float>() : nullptr,
      b.lse.has_value() ? b.lse->mutable_data_ptr<double>() : nullptr, cuda_glue::current_stream(device));
  cuda_glue::check_launch(op_name, error);
}

void cross_entropy_rows_out_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                 double label_smoothing, double z_loss, const std::optional<at::Tensor>& saved_lse,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& loss_rows, const std::optional<at::Tensor>& lse,
                                 const std::optional<at::Tensor>& grad) {
  ce_rows("cross_entropy_rows_out", logits, targets, ignore_index, label_smoothing, z_loss,
          {saved_lse, grad_scale, loss_rows, lse}, grad, /*in_place=*/false);
}

void cross_entropy_rows_inplace_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                     double label_smoothing, double z_loss,
                                     const std::optional<at::Tensor>& saved_lse,
                                     const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& loss_rows,
                                     const std::optional<at::Tensor>& lse) {
  ce_rows("cross_entropy_rows_inplace", logits, targets, ignore_index, label_smoothing, z_loss,
          {saved_lse, grad_scale, loss_rows, lse}, logits, /*in_place=*/true);
}

#undef CE_CHECK

}  // namespace

TORCH_LIBRARY_IMPL(aimv2, CUDA, m) {
  m.impl("cross_entropy_rows_out", &cross_entropy_rows_out_cuda);
  m.impl("cross_entropy_rows_inplace", &cross_entropy_rows_inplace_cuda);
}

}  // namespace aimv2
