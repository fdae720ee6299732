// Argument checks of the cross_entropy_rows_out / cross_entropy_rows_inplace schemas (csrc/ops.cpp), shared by the
// CPU kernel (csrc/cross_entropy_cpu.cpp) and the CUDA glue (csrc/cuda/cross_entropy_glue.cpp). Each caller first
// checks that the logits are on its device type; here every other tensor must be on the logits' device.
// Target values are not checked here: the CPU op checks them on the host, the CUDA op cannot without a sync.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace aimv2::ce_args {

struct Buffers {
  std::optional<at::Tensor> saved_lse, grad_scale, loss_rows, lse;
};

// What the checks found: sizes, dtype, and the optional float inputs converted (undefined when absent).
struct Checked {
  int64_t n = 0, V = 0;
  at::ScalarType dtype = at::kFloat;
  at::Tensor saved_lse;  // float64 (N,)
  at::Tensor scale;      // fp32, one element or (N,)
};

#define AIMV2_CE_CHECK(cond, ...) TORCH_CHECK(cond, op_name, ": ", __VA_ARGS__)

inline void check_device(const char* op_name, const char* name, const at::Tensor& t, const c10::Device& device) {
  AIMV2_CE_CHECK(t.device() == device, name, " must be on the logits' device ", device, ", got ", t.device());
}

// A float (N,) input (or one element when allow_scalar) as a contiguous tensor of dtype `to`.
inline at::Tensor row_floats(const char* op_name, const char* name, const at::Tensor& t, int64_t n,
                             bool allow_scalar, at::ScalarType to, const c10::Device& device) {
  check_device(op_name, name, t, device);
  AIMV2_CE_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
  const bool is_rows = t.dim() == 1 && t.size(0) == n;
  AIMV2_CE_CHECK(is_rows || (allow_scalar && t.numel() == 1), name, " must have shape (", n, ",)",
                 allow_scalar ? " or hold one element" : "", ", got ", t.sizes());
  return t.to(to).contiguous();  // an expanded scalar (from .sum()) arrives with zero strides
}

inline void check_row_output(const char* op_name, const char* name, const at::Tensor& out, int64_t n,
                             at::ScalarType dtype, const c10::Device& device) {
  check_device(op_name, name, out, device);
  AIMV2_CE_CHECK(out.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", out.scalar_type());
  AIMV2_CE_CHECK(out.dim() == 1 && out.size(0) == n, name, " must have shape (", n, ",), got ", out.sizes());
  AIMV2_CE_CHECK(out.is_contiguous(), name, " must be contiguous");
}

// Every check of both schemas except the target values. `grad` is the gradient output: the logits when in_place.
inline Checked check(const char* op_name, const at::Tensor& logits, const at::Tensor& targets,
                     double label_smoothing, double z_loss, const Buffers& b,
                     const std::optional<at::Tensor>& grad, bool in_place) {
  const c10::Device device = logits.device();
  check_device(op_name, "targets", targets, device);
  AIMV2_CE_CHECK(logits.dim() == 2, "logits must be (N, V), got shape ", logits.sizes());
  Checked c;
  c.dtype = logits.scalar_type();
  AIMV2_CE_CHECK(c.dtype == at::kFloat || c.dtype == at::kBFloat16 || c.dtype == at::kHalf,
                 "logits must be float32, bfloat16 or float16, got ", c.dtype);
  c.n = logits.size(0);
  c.V = logits.size(1);
  AIMV2_CE_CHECK(c.V >= 1, "logits must have at least one class, got shape ", logits.sizes());
  AIMV2_CE_CHECK(at::isIntegralType(targets.scalar_type(), /*includeBool=*/false),
                 "targets must be an integer tensor, got ", targets.scalar_type());
  AIMV2_CE_CHECK(targets.dim() == 1 && targets.size(0) == c.n, "targets must have shape (", c.n, ",), got ",
                 targets.sizes());
  AIMV2_CE_CHECK(std::isfinite(label_smoothing) && 0.0 <= label_smoothing && label_smoothing <= 1.0,
                 "label_smoothing must lie in [0, 1], got ", label_smoothing);
  AIMV2_CE_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, "z_loss must be a finite float >= 0, got ", z_loss);
  const bool given = b.saved_lse.has_value();
  AIMV2_CE_CHECK(!given || (!b.loss_rows.has_value() && !b.lse.has_value()),
                 "with saved_lse, only the gradient can be computed (loss_rows and lse must be None)");
  if (given) c.saved_lse = row_floats(op_name, "saved_lse", *b.saved_lse, c.n, false, at::kDouble, device);
  if (b.grad_scale.has_value()) {
    c.scale = row_floats(op_name, "grad_scale", *b.grad_scale, c.n, true, at::kFloat, device);
  }
  if (b.loss_rows.has_value()) check_row_output(op_name, "loss_rows", *b.loss_rows, c.n, at::kFloat, device);
  if (b.lse.has_value()) check_row_output(op_name, "lse", *b.lse, c.n, at::kDouble, device);
  if (grad.has_value()) {
    check_device(op_name, "grad", *grad, device);
    AIMV2_CE_CHECK(grad->scalar_type() == c.dtype, "grad must have the logits' dtype ", c.dtype, ", got ",
                   grad->scalar_type());
    AIMV2_CE_CHECK(grad->sizes() == logits.sizes(), "grad must have shape ", logits.sizes(), ", got ",
                   grad->sizes());
    AIMV2_CE_CHECK(grad->stride(1) == 1 || c.V == 1, "grad must have unit column stride, got strides ",
                   grad->strides());
    if (in_place) {
      AIMV2_CE_CHECK(logits.stride(1) == 1 || c.V == 1, "logits must have unit column stride to be overwritten");
      at::assert_no_internal_overlap(logits);
    } else {
      at::assert_no_overlap(*grad, logits);
      at::assert_no_internal_overlap(*grad);
    }
  }
  return c;
}

#undef AIMV2_CE_CHECK

}  // namespace aimv2::ce_args
