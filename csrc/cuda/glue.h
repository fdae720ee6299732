// Helpers shared by the torch-facing glue files csrc/cuda/*_glue.cpp.
//
// The glue includes ATen and c10 core headers only, never c10/cuda or ATen/cuda: those need the generated
// headers of a CUDA build of torch, which the CPU wheel on this project's machines lacks. So the glue can be
// syntax-checked here (tools/cuda_compile_check.py) and is built only against a CUDA build of torch (setup.py).
// The current CUDA stream comes through c10's device-generic stream API (c10::Stream::native_handle, which
// the CUDA guard implementation registered by libtorch_cuda answers with the cudaStream_t).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace aimv2::cuda_glue {

// The current stream of `device` (a CUDA device), as the opaque cudaStream_t the launchers take.
inline void* current_stream(const c10::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

// Every launcher returns nullptr on success or CUDA's error string (cudaGetErrorString of the launch).
inline void check_launch(const char* op, const char* error) {
  TORCH_CHECK(error == nullptr, op, ": CUDA kernel launch failed: ", error);
}

// A tensor argument on `device`: `what` names it in the message.
inline void check_on(const char* op, const char* what, const at::Tensor& t, const c10::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", what, " must be on ", device, ", got ", t.device());
}

}  // namespace aimv2::cuda_glue
