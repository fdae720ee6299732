// emu.h: CPU emulation of the CUDA features used by csrc/cuda/prefix_attention_fwd.cu, prefix_attention_bwd.cu
// (with prefix_attention_mma.cuh), patch_mse.cu and cross_entropy.cu.
//
// Execution model: every CUDA thread of a block is one std::thread; blocks run one after another (grid in
// x-major order). __syncthreads is a std::barrier over the block; every warp has its own std::barrier, used by
// the warp-collective operations (__shfl_xor_sync, __syncwarp, mma.sync, ldmatrix), which exchange data
// through a per-warp, double-buffered slot array: each lane writes its slot of buffer `phase`, the warp
// barrier, each lane reads what it needs from all 32 slots, and flips its phase. Double buffering makes one
// barrier per collective enough: a lane can only overwrite buffer `phase` again after the next barrier, which
// every lane reaches only after it finished reading that buffer.
//
// Emulated PTX (the build script swaps the bodies of the kernel's inline-asm wrappers for these):
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}  emu::mma16816<T>   fragment layouts of the PTX ISA
//   ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16    emu::ldmatrix_x4_trans
//   cp.async.cg.shared.global 16 (+ src-size 0 fill) emu::cp_async16    synchronous copy / zero fill
//   cp.async.commit_group / wait_group               no-ops (the copy is already complete)
//   ex2.approx.ftz.f32                               exp2f (ftz: denormal results flushed to +0)
// Checks: 16-byte alignment of cp.async / uint4 / ldmatrix row addresses, shared addresses inside the dynamic
// shared memory of the launch, dynamic smem <= the opt-in attribute and <= the device limit, full shuffle
// masks. Dynamic shared memory is poisoned with NaN at the start of every block. Static __shared__ arrays
// become function-local statics: one copy shared by the threads of the running block (blocks run one after
// another), not poisoned between blocks.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
#include <vector>

namespace emu {
inline thread_local uint3 tid, bid;
inline thread_local unsigned phase = 0;  // this lane's exchange buffer (0/1)
inline uint3 bdim, gdim;
inline std::barrier<>* block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;

struct Slot {  // what one lane publishes for a warp-collective operation
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
  uint64_t x;
  const void* addr;
};
inline std::vector<Slot> slots;  // [warp][phase][lane]
inline std::vector<unsigned char> dyn_smem;
inline size_t dyn_bytes = 0;
inline long launches = 0, mma_count = 0;
inline size_t smem_limit = 232448;  // sm_90 opt-in maximum (227 KB); sm_80: 166912, sm_86/89: 101376
inline std::map<const void*, int> max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
inline const char* error = nullptr;

[[noreturn]] inline void fail(const char* what, const void* p = nullptr) {
  fprintf(stderr, "emu: %s %p (block %u,%u thread %u)\n", what, p, bid.x, bid.y, tid.x);
  abort();
}
inline unsigned lane() { return tid.x % 32; }
inline unsigned warp() { return tid.x / 32; }
// Publishes `mine`, waits for the warp, returns the warp's 32 slots (valid until this lane's next collective).
inline const Slot* exchange(const Slot& mine) {
  Slot* buf = &slots[(warp() * 2 + phase) * 32];
  buf[lane()] = mine;
  warp_bars[warp()]->arrive_and_wait();
  phase ^= 1;
  return buf;
}
inline void check_shared(const void* p, size_t bytes, size_t align) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < dyn_smem.data() || c + bytes > dyn_smem.data() + dyn_bytes) fail("shared access out of range", p);
  if (reinterpret_cast<uintptr_t>(p) % align != 0) fail("misaligned shared access", p);
}
template <class V, class P> V* check16(P* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("misaligned 16-byte access", (const void*)p);
  return reinterpret_cast<V*>(p);
}
template <class T> T* smem() { return reinterpret_cast<T*>(dyn_smem.data()); }

// 16-bit element of a .b32 register (half 0 = low 16 bits) as float: exact for bf16 and fp16.
template <class T> float elem(uint32_t reg, int half) {
  const unsigned bits = half ? reg >> 16 : reg & 0xffffu;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t u = bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32 d = a b + c (d aliases c), groupID g = lane >> 2, t = lane % 4:
//   A (16 x 16): a[0] (g, 2t..2t+1), a[1] (g+8, 2t..), a[2] (g, 2t+8..), a[3] (g+8, 2t+8..)
//   B (16 x 8):  b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C/D (16 x 8) fp32: c[0], c[1] (g, 2t..2t+1), c[2], c[3] (g+8, 2t..2t+1)
// Products are exact in fp32 (both factors are 16-bit floats); the sum is taken in double and rounded once
// (-DEMU_MMA_FP32_SEQUENTIAL: summed in fp32 one product at a time, a pessimistic stand-in for the hardware).
template <class T> void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Slot mine{};
  std::memcpy(mine.a, a, sizeof mine.a);
  mine.b[0] = b0;
  mine.b[1] = b1;
  const Slot* all = exchange(mine);
  const int g = lane() >> 2, t = lane() & 3;
  auto A = [&](int r, int k) {  // element (r, k) lives in lane 4 (r % 8) + (k % 8) / 2
    const Slot& s = all[4 * (r % 8) + (k % 8) / 2];
    return elem<T>(s.a[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
  };
  auto B = [&](int k, int n) {  // element (k, n) lives in lane 4 n + (k % 8) / 2
    const Slot& s = all[4 * n + (k % 8) / 2];
    return elem<T>(s.b[k >= 8 ? 1 : 0], k & 1);
  };
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
#ifdef EMU_MMA_FP32_SEQUENTIAL  // pessimistic variant: 16 fp32 roundings per mma instead of one
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    d[i] = acc;
#else
    double acc = c[i];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A(r, k) * B(k, n));
    d[i] = static_cast<float>(acc);
#endif
  }
  std::memcpy(c, d, sizeof d);
  if (lane() == 0) __atomic_add_fetch(&mma_count, 1, __ATOMIC_RELAXED);
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lane 8m + r gives the address of row r of matrix m (8
// contiguous 16-bit elements, 16-byte aligned); with .trans, lane L (g = L >> 2, t = L % 4) receives in
// register m the elements (row 2t, col g) (low half) and (row 2t + 1, col g) (high half) of matrix m.
template <class T> void ldmatrix_x4_trans(uint32_t (&r)[4], const T* row_addr) {
  check_shared(row_addr, 16, 16);
  Slot mine{};
  mine.addr = row_addr;
  const Slot* all = exchange(mine);
  const int g = lane() >> 2, t = lane() & 3;
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    std::memcpy(&lo, static_cast<const unsigned char*>(all[8 * m + 2 * t].addr) + 2 * g, 2);
    std::memcpy(&hi, static_cast<const unsigned char*>(all[8 * m + 2 * t + 1].addr) + 2 * g, 2);
    r[m] = lo | (static_cast<uint32_t>(hi) << 16);
  }
  // The data are read after the barrier, while other lanes may go on: they may not write shared memory
  // before the next block barrier in this kernel, so no second barrier is needed (but add one to be safe).
  warp_bars[warp()]->arrive_and_wait();
}

// cp.async.cg.shared.global [smem], [gmem], 16, src_size (16 or 0): completes at once.
inline void cp_async16(void* smem_dst, const void* gmem, bool valid) {
  check_shared(smem_dst, 16, 16);
  if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0) fail("misaligned cp.async source", gmem);
  if (valid) std::memcpy(smem_dst, gmem, 16);
  else std::memset(smem_dst, 0, 16);
}

inline float ex2_approx_ftz(float x) {
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline int to_int(int d) { return d; }
inline dim3 to_dim3(dim3 d) { return d; }
inline dim3 to_dim3(int d) { return dim3(d); }
inline dim3 to_dim3(unsigned d) { return dim3(d); }

template <class K, class G, class B, class... A>
void launch(K kernel, G grid_arg, B block_arg, size_t smem_bytes, cudaStream_t, const A&... args) {
  ++launches;
  const dim3 grid = to_dim3(grid_arg);
  const int nt = to_int(block_arg);
  if (nt % 32 != 0 || nt > 1024 || nt <= 0) fail("bad block size");
  if (grid.z != 1 || grid.y > 65535 || grid.x == 0 || grid.y == 0) fail("bad grid");
  if (smem_bytes > smem_limit) fail("dynamic shared memory above the device limit");
  if (smem_bytes > 49152) {
    auto it = max_dyn_smem.find(reinterpret_cast<const void*>(kernel));
    if (it == max_dyn_smem.end() || static_cast<size_t>(it->second) < smem_bytes)
      fail("dynamic shared memory above 48 KB without cudaFuncAttributeMaxDynamicSharedMemorySize");
  }
  bdim = make_uint3(nt, 1, 1);
  gdim = make_uint3(grid.x, grid.y, 1);
  dyn_bytes = smem_bytes;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      dyn_smem.assign(smem_bytes + 16, 0);
      const float nanv = std::nanf("");
      for (size_t i = 0; i + 4 <= smem_bytes; i += 4) std::memcpy(&dyn_smem[i], &nanv, 4);
      std::barrier<> bar(nt);
      block_bar = &bar;
      warp_bars.clear();
      for (int w = 0; w < nt / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
      slots.assign(static_cast<size_t>(nt) * 2, Slot{});
      std::vector<std::thread> threads;
      threads.reserve(nt);
      for (int t = 0; t < nt; ++t) {
        threads.emplace_back([&, t] {
          tid = make_uint3(t, 0, 0);
          bid = make_uint3(bx, by, 0);
          phase = 0;
          kernel(args...);
          bar.arrive_and_drop();
          warp_bars[t / 32]->arrive_and_drop();
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}
}  // namespace emu

#define threadIdx emu::tid
#define blockIdx emu::bid
#define blockDim emu::bdim
#define gridDim emu::gdim
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static  // static __shared__ arrays (extern ones are rewritten by build.py)

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("partial __syncwarp mask");
  emu::warp_bars[emu::warp()]->arrive_and_wait();
}
template <class T> T __shfl_xor_sync(unsigned mask, T v, int o) {
  static_assert(sizeof(T) <= 8, "shuffled value of at most 8 bytes");
  if (mask != 0xffffffffu) emu::fail("partial shuffle mask");
  emu::Slot mine{};
  std::memcpy(&mine.x, &v, sizeof(T));
  const emu::Slot* all = emu::exchange(mine);
  T r;
  std::memcpy(&r, &all[emu::lane() ^ o].x, sizeof(T));
  return r;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

// Runtime API stubs (the library is not linked against cudart).
extern "C" cudaError_t cudaGetLastError() { return cudaSuccess; }
extern "C" const char* cudaGetErrorString(cudaError_t) { return "emu: cuda error"; }
extern "C" cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > emu::smem_limit) return cudaErrorInvalidValue;
    emu::max_dyn_smem[func] = value;
  }
  return cudaSuccess;
}
// The typed overload cuda_runtime.h provides to nvcc only.
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*func)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}
