// CUDA implementations of aimv2::prefix_attention_forward_out / prefix_attention_backward_out (schemas in
// csrc/ops.cpp / the CPU file): argument checks, layout fixes, and the launchers' arguments (attn::Params in
// prefix_attention_params.h) for csrc/cuda/prefix_attention_fwd.cu / prefix_attention_bwd.cu.
//
// Layout the kernels need (fixed up here with a copy when a tensor misses it): unit stride on D, 16-byte aligned
// data pointer, and (B, H, S) strides that are multiples of 8 elements (so every row starts 16-byte aligned).
// Permuted views of a fused qkv projection satisfy this and are passed through without copies.
#include "glue.h"
#include "prefix_attention_params.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

namespace aimv2 {

namespace {

constexpr const char* kFwd = "prefix_attention_forward_out";
constexpr const char* kBwd = "prefix_attention_backward_out";

int dtype_code(at::ScalarType t) { return t == at::kBFloat16 ? 1 : 2; }  // DType in common.cuh

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// `t` as the kernels read it: unit stride on D, aligned rows; a contiguous copy otherwise.
at::Tensor kernel_rows(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && aligned16(t.const_data_ptr()) && t.stride(0) % 8 == 0 &&
                  t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  if (ok) return t;
  at::Tensor copy = at::empty(t.sizes(), t.options());
  copy.copy_(t);
  return copy;
}

// An output the kernels can write directly (contiguous and aligned), else a fresh buffer to copy back.
at::Tensor writable(const at::Tensor& t) {
  return aligned16(t.const_data_ptr()) ? t : at::empty(t.sizes(), t.options());
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, S, D), got shape ", q.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": the CUDA backend supports bfloat16 and float16 inputs, got ", dtype);
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, op, ": the CUDA backend supports head dimensions 64 and 128, got ",
              q.size(3));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    cuda_glue::check_on(op, name, t, q.device());
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have q's dtype ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2);
  TORCH_CHECK(B * H <= INT32_MAX && S <= INT32_MAX, op, ": B * H and S must fit in int32, got B*H = ", B * H,
              ", S = ", S);
  TORCH_CHECK((S + 31) / 32 <= 65535, op, ": sequence length ", S, " is too long for the CUDA kernels");
}

void check_output(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                  at::ScalarType dtype, const c10::Device& device) {
  cuda_glue::check_on(op, name, t, device);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// prefix_lens as int32 on q's device (undefined when unused: not causal, or None).
at::Tensor prefix_arg(const char* op, const std::optional<at::Tensor>& prefix_lens, bool causal,
                      const at::Tensor& q) {
  if (!causal || !prefix_lens.has_value()) return at::Tensor();
  const at::Tensor& lens = *prefix_lens;
  cuda_glue::check_on(op, "prefix_lens", lens, q.device());
  TORCH_CHECK(at::isIntegralType(lens.scalar_type(), /*includeBool=*/false), op,
              ": prefix_lens must be an integer tensor, got ", lens.scalar_type());
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == q.size(0), op, ": prefix_lens must have shape (", q.size(0),
              ",), got ", lens.sizes());
  return lens.to(at::kInt).contiguous();  // on the device, no host sync; values validated by the caller
}

const int* prefix_ptr(const at::Tensor& prefix) {
  return prefix.defined() ? prefix.const_data_ptr<int>() : nullptr;
}

// The launchers' arguments both passes share: shape, dtype, q, k, v, the prefix and the scale.
attn::Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix,
                         bool causal, double scale) {
  attn::Params p{};
  p.dtype = dtype_code(q.scalar_type());
  p.B = static_cast<int>(q.size(0));
  p.H = static_cast<int>(q.size(1));
  p.S = static_cast<int>(q.size(2));
  p.D = static_cast<int>(q.size(3));
  p.q = q.const_data_ptr();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_ss = q.stride(2);
  p.k = k.const_data_ptr();
  p.k_sb = k.stride(0);
  p.k_sh = k.stride(1);
  p.k_ss = k.stride(2);
  p.v = v.const_data_ptr();
  p.v_sb = v.stride(0);
  p.v_sh = v.stride(1);
  p.v_ss = v.stride(2);
  p.prefix = prefix_ptr(prefix);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  return p;
}

void prefix_attention_forward_out_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       const std::optional<at::Tensor>& prefix_lens, bool causal, double scale,
                                       const at::Tensor& out, const at::Tensor& lse) {
  check_qkv(kFwd, q_in, k_in, v_in, scale);
  const c10::Device device = q_in.device();
  const int64_t B = q_in.size(0), H = q_in.size(1), S = q_in.size(2);
  check_output(kFwd, "out", out, q_in.sizes(), q_in.scalar_type(), device);
  check_output(kFwd, "lse", lse, {B, H, S}, at::kFloat, device);
  if (out.numel() == 0) return;
  c10::DeviceGuard guard(device);
  const at::Tensor prefix = prefix_arg(kFwd, prefix_lens, causal, q_in);
  const at::Tensor q = kernel_rows(q_in), k = kernel_rows(k_in), v = kernel_rows(v_in);
  const at::Tensor o = writable(out);
  attn::Params p = make_params(q, k, v, prefix, causal, scale);
  p.out = o.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  const char* err = prefix_attention_forward_cuda(p, cuda_glue::current_stream(device));
  cuda_glue::check_launch(kFwd, err);
  if (!o.is_same(out)) out.copy_(o);
}

void prefix_attention_backward_out_cuda(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                        const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
                                        const at::Tensor& lse_in, const std::optional<at::Tensor>& prefix_lens,
                                        bool causal, double scale, const at::Tensor& grad_q,
                                        const at::Tensor& grad_k, const at::Tensor& grad_v) {
  check_qkv(kBwd, q_in, k_in, v_in, scale);
  const c10::Device device = q_in.device();
  const int64_t B = q_in.size(0), H = q_in.size(1), S = q_in.size(2);
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out_in}, {"out", out_in}}) {
    cuda_glue::check_on(kBwd, name, t, device);
    TORCH_CHECK(t.scalar_type() == q_in.scalar_type() && t.sizes() == q_in.sizes(), kBwd, ": ", name,
                " must have q's dtype and shape (", q_in.scalar_type(), " ", q_in.sizes(), "), got ",
                t.scalar_type(), " ", t.sizes());
  }
  cuda_glue::check_on(kBwd, "lse", lse_in, device);
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.sizes() == at::IntArrayRef({B, H, S}), kBwd,
              ": lse must be float32 of shape (", B, ", ", H, ", ", S, "), got ", lse_in.scalar_type(), " ",
              lse_in.sizes());
  check_output(kBwd, "grad_q", grad_q, q_in.sizes(), q_in.scalar_type(), device);
  check_output(kBwd, "grad_k", grad_k, q_in.sizes(), q_in.scalar_type(), device);
  check_output(kBwd, "grad_v", grad_v, q_in.sizes(), q_in.scalar_type(), device);
  if (grad_q.numel() == 0) return;
  c10::DeviceGuard guard(device);
  const at::Tensor prefix = prefix_arg(kBwd, prefix_lens, causal, q_in);
  const at::Tensor q = kernel_rows(q_in), k = kernel_rows(k_in), v = kernel_rows(v_in);
  const at::Tensor dout = kernel_rows(grad_out_in), o = kernel_rows(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor delta = at::empty({B, H, S}, q.options().dtype(at::kFloat));
  const at::Tensor dq = writable(grad_q), dk = writable(grad_k), dv = writable(grad_v);
  attn::Params p = make_params(q, k, v, prefix, causal, scale);
  p.dout = dout.const_data_ptr();
  p.do_sb = dout.stride(0);
  p.do_sh = dout.stride(1);
  p.do_ss = dout.stride(2);
  p.o = o.const_data_ptr();
  p.o_sb = o.stride(0);
  p.o_sh = o.stride(1);
  p.o_ss = o.stride(2);
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());  // read only (Params has one lse for both passes)
  p.delta = delta.mutable_data_ptr<float>();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  const char* err = prefix_attention_backward_cuda(p, cuda_glue::current_stream(device));
  cuda_glue::check_launch(kBwd, err);
  if (!dq.is_same(grad_q)) grad_q.copy_(dq);
  if (!dk.is_same(grad_k)) grad_k.copy_(dk);
  if (!dv.is_same(grad_v)) grad_v.copy_(dv);
}

}  // namespace

TORCH_LIBRARY_IMPL(aimv2, CUDA, m) {
  m.impl("prefix_attention_forward_out", &prefix_attention_forward_out_cuda);
  m.impl("prefix_attention_backward_out", &prefix_attention_backward_out_cuda);
}

}  // namespace aimv2
