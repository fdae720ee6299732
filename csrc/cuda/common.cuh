// Device helpers shared by the CUDA kernels in csrc/cuda/*.cu.
//
// .cu files include only CUDA's own headers (never torch's): the machine that compile-checks them has nvcc
// but a CPU build of torch. torch's CUDAExtension compiles them with -D__CUDA_NO_HALF_OPERATORS__,
// -D__CUDA_NO_HALF_CONVERSIONS__, -D__CUDA_NO_BFLOAT16_CONVERSIONS__ and -D__CUDA_NO_HALF2_OPERATORS__, so
// 16-bit values go through the explicit intrinsics below, never through implicit conversions or operators.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace aimv2 {

// Element types of the kernels' templates: the dtype codes the glue passes (0 fp32, 1 bf16, 2 fp16).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// 16 bytes <-> floats. fp32: 4 values; bf16/fp16: 8 values, the lower half of each 32-bit word first.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
  static constexpr int N = 4;
  __device__ static void unpack(uint4 u, float* v) {
    v[0] = __uint_as_float(u.x); v[1] = __uint_as_float(u.y); v[2] = __uint_as_float(u.z); v[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float* v) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};
__device__ __forceinline__ float half_bits_to_float(__nv_bfloat16*, unsigned bits) { return __uint_as_float(bits << 16); }
__device__ __forceinline__ float half_bits_to_float(__half*, unsigned bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
__device__ __forceinline__ unsigned float_to_half_bits(__nv_bfloat16*, float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ unsigned float_to_half_bits(__half*, float x) { return __half_as_ushort(__float2half_rn(x)); }

template <typename T> struct Vec16Half {
  static constexpr int N = 8;
  __device__ static void unpack_word(unsigned w, float* v) {
    v[0] = half_bits_to_float(static_cast<T*>(nullptr), w & 0xffffu);
    v[1] = half_bits_to_float(static_cast<T*>(nullptr), w >> 16);
  }
  __device__ static unsigned pack_word(const float* v) {
    return float_to_half_bits(static_cast<T*>(nullptr), v[0]) | (float_to_half_bits(static_cast<T*>(nullptr), v[1]) << 16);
  }
  __device__ static void unpack(uint4 u, float* v) {
    unpack_word(u.x, v); unpack_word(u.y, v + 2); unpack_word(u.z, v + 4); unpack_word(u.w, v + 6);
  }
  __device__ static uint4 pack(const float* v) { return make_uint4(pack_word(v), pack_word(v + 2), pack_word(v + 4), pack_word(v + 6)); }
};
template <> struct Vec16<__nv_bfloat16> : Vec16Half<__nv_bfloat16> {};
template <> struct Vec16<__half> : Vec16Half<__half> {};

template <typename T> __device__ __forceinline__ void load16(const T* src, float* v) {
  Vec16<T>::unpack(*reinterpret_cast<const uint4*>(src), v);
}
template <typename T> __device__ __forceinline__ void store16(T* dst, const float* v) {
  *reinterpret_cast<uint4*>(dst) = Vec16<T>::pack(v);
}

// nullptr after a successful launch, else CUDA's message (see csrc/cuda/glue.h: check_launch).
inline const char* launch_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace aimv2
