// CUDA implementations of aimv2::cross_entropy_rows_out and aimv2::cross_entropy_rows_inplace (schemas in
// csrc/cross_entropy_cpu.cpp): argument checks as on the CPU, then one launch of the kernel in
// csrc/cuda/cross_entropy.cu. No host synchronisation: targets, grad_scale and saved_lse are converted on the
// device, so target values are NOT checked here (the CPU op checks them on the host; the Python side validates
// them beforehand). The kernel never reads outside a row: a target outside [0, V) that is not ignore_index
// gives that row a NaN loss and a NaN gradient.
#include "glue.h"

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

struct Buffers {
  std::optional<at::Tensor> saved_lse, grad_scale, loss_rows, lse;
};

int dtype_code(at::ScalarType t) { return t == at::kFloat ? 0 : t == at::kBFloat16 ? 1 : 2; }

// A float (N,) input as a contiguous tensor of dtype `to` on `device`.
at::Tensor row_floats(const char* op_name, const char* name, const at::Tensor& t, int64_t n, bool allow_scalar,
                      at::ScalarType to, const c10::Device& device) {
  cuda_glue::check_on(op_name, name, t, device);
  CE_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
  const bool is_rows = t.dim() == 1 && t.size(0) == n;
  CE_CHECK(is_rows || (allow_scalar && t.numel() == 1), name, " must have shape (", n, ",)",
           allow_scalar ? " or hold one element" : "", ", got ", t.sizes());
  return t.to(to).contiguous();  // an expanded scalar (from .sum()) arrives with zero strides
}

void check_row_output(const char* op_name, const char* name, const at::Tensor& out, int64_t n,
                      at::ScalarType dtype, const c10::Device& device) {
  cuda_glue::check_on(op_name, name, out, device);
  CE_CHECK(out.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", out.scalar_type());
  CE_CHECK(out.dim() == 1 && out.size(0) == n, name, " must have shape (", n, ",), got ", out.sizes());
  CE_CHECK(out.is_contiguous(), name, " must be contiguous");
}

// Shared entry of both schemas. `grad` is the gradient output: the logits themselves when `in_place`.
void ce_rows(const char* op_name, const at::Tensor& logits_in, const at::Tensor& targets, int64_t ignore_index,
             double label_smoothing, double z_loss, const Buffers& b, const std::optional<at::Tensor>& grad,
             bool in_place) {
  CE_CHECK(logits_in.is_cuda() && targets.is_cuda(), "logits and targets must be CUDA tensors, got ",
           logits_in.device(), " and ", targets.device());
  const c10::Device device = logits_in.device();
  cuda_glue::check_on(op_name, "targets", targets, device);
  CE_CHECK(logits_in.dim() == 2, "logits must be (N, V), got shape ", logits_in.sizes());
  const auto dtype = logits_in.scalar_type();
  CE_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
           "logits must be float32, bfloat16 or float16, got ", dtype);
  const int64_t n = logits_in.size(0), V = logits_in.size(1);
  CE_CHECK(V >= 1, "logits must have at least one class, got shape ", logits_in.sizes());
  CE_CHECK(at::isIntegralType(targets.scalar_type(), /*includeBool=*/false),
           "targets must be an integer tensor, got ", targets.scalar_type());
  CE_CHECK(targets.dim() == 1 && targets.size(0) == n, "targets must have shape (", n, ",), got ",
           targets.sizes());
  CE_CHECK(std::isfinite(label_smoothing) && 0.0 <= label_smoothing && label_smoothing <= 1.0,
           "label_smoothing must lie in [0, 1], got ", label_smoothing);
  CE_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, "z_loss must be a finite float >= 0, got ", z_loss);
  const bool given = b.saved_lse.has_value();
  CE_CHECK(!given || (!b.loss_rows.has_value() && !b.lse.has_value()),
           "with saved_lse, only the gradient can be computed (loss_rows and lse must be None)");
  at::Tensor saved_lse, scale;
  if (given) saved_lse = row_floats(op_name, "saved_lse", *b.saved_lse, n, false, at::kDouble, device);
  if (b.grad_scale.has_value()) {
    scale = row_floats(op_name, "grad_scale", *b.grad_scale, n, true, at::kFloat, device);
  }
  if (b.loss_rows.has_value()) check_row_output(op_name, "loss_rows", *b.loss_rows, n, at::kFloat, device);
  if (b.lse.has_value()) check_row_output(op_name, "lse", *b.lse, n, at::kDouble, device);
  if (grad.has_value()) {
    cuda_glue::check_on(op_name, "grad", *grad, device);
    CE_CHECK(grad->scalar_type() == dtype, "grad must have the logits' dtype ", dtype, ", got ",
             grad->scalar_type());
    CE_CHECK(grad->sizes() == logits_in.sizes(), "grad must have shape ", logits_in.sizes(), ", got ",
             grad->sizes());
    CE_CHECK(grad->stride(1) == 1 || V == 1, "grad must have unit column stride, got strides ", grad->strides());
    if (in_place) {
      CE_CHECK(logits_in.stride(1) == 1 || V == 1, "logits must have unit column stride to be overwritten");
      at::assert_no_internal_overlap(logits_in);
    } else {
      at::assert_no_overlap(*grad, logits_in);
      at::assert_no_internal_overlap(*grad);
    }
  }
  if (n == 0) return;
  if (!grad.has_value() && !b.loss_rows.has_value() && !b.lse.has_value()) return;  // nothing asked for

  c10::DeviceGuard guard(device);
  const at::Tensor long_targets = targets.to(at::kLong).contiguous();
  // Rows need a unit column stride; any row stride is fine (chunk views of a buffer).
  const at::Tensor logits = logits_in.stride(1) == 1 || V == 1 ? logits_in : logits_in.contiguous();
  const char* error = cross_entropy_rows_cuda(
      dtype_code(dtype), logits.const_data_ptr(), n, V, logits.stride(0),
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
