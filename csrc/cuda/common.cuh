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

// nullptr after a successful launch, else CUDA's message (see csrc/cuda/glue.h: check_launch).
inline const char* launch_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace aimv2
