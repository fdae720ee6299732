// The arguments of the prefix-causal attention launchers (csrc/cuda/prefix_attention_fwd.cu, _bwd.cu), filled in
// by the glue (csrc/cuda/prefix_attention_glue.cpp). Plain C++ (no CUDA types): the glue compiles without nvcc.
//
// The kernels take the struct itself (by value, as their one parameter); the fields up to scale_log2 are what
// they read, in the order they always had. The fields after it are read by the launchers only.
#pragma once

#include <cstdint>

namespace aimv2 {
namespace attn {

struct Params {
  const void *q, *k, *v, *dout;  // (B, H, S, D) with unit stride on D, 16-byte aligned rows
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, do_sb, do_sh, do_ss;
  const int* prefix;  // (B,) int32 or nullptr
  void *out, *dq, *dk, *dv;  // contiguous (B, H, S, D)
  float *lse, *delta;        // contiguous (B, H, S); the backward only reads lse
  int H, S;
  bool causal;
  float scale;
  float scale_log2;  // scale * log2(e): set by the launchers (whatever the caller leaves here is overwritten)

  // Launchers only.
  int dtype;  // 1 bf16, 2 fp16 (DType in common.cuh)
  int B, D;   // D in {64, 128}
  const void* o;  // backward: the forward's output, same layout rules as q
  int64_t o_sb, o_sh, o_ss;
};

}  // namespace attn

// Both return nullptr on success (or when B, H or S is 0), else an error message (see glue.h: check_launch).
// `stream` is the cudaStream_t to launch on.
//
// Forward. Reads q, k, v (dtype, D in {64, 128}, unit stride on D, 16-byte aligned base pointers, (B, H, S)
// strides that are multiples of 8 elements), prefix (int32 (B,) or nullptr, used only when causal), causal, scale.
// Writes out (contiguous (B, H, S, D), 16-byte aligned) and lse (contiguous fp32 (B, H, S), base 2).
// B * H < 2^31, cdiv(S, 64) <= 65535.
const char* prefix_attention_forward_cuda(const attn::Params& p, void* stream);
// Backward. As the forward, plus dout and o (same layout rules as q), lse (contiguous fp32 (B, H, S), the
// forward's), delta (fp32 (B, H, S) contiguous scratch). Writes dq, dk, dv (contiguous (B, H, S, D), 16-byte
// aligned). out is not used.
const char* prefix_attention_backward_cuda(const attn::Params& p, void* stream);

}  // namespace aimv2
