// Fused per-patch-normalized MSE on CUDA: pred and the NCHW images are read once, in place, through their
// strides (no patchified copy), and each output (rows, grad) is written once.
//
// For row (b, l), with patch n = l + target_offset of image b (the same math as csrc/patch_mse_cpu.cpp):
//   x      = the patch, ordered (row in patch, column in patch, channel), channel fastest   (P = C*p*p values)
//   target = (x - mean(x)) / sqrt(var_unbiased(x) + eps)
//   rows[b, l]    = mean_P (pred[b, l] - target)^2                              0 when n < prefix_lens[b]
//   grad[b, l, :] = grad_rows[b, l] * 2 (pred[b, l] - target) / P  (pred's dtype) 0 when n < prefix_lens[b]
// All math is fp32; grad is rounded to pred's dtype once (round to nearest even).
//
// Work split: one CTA (kThreads threads) per segment of G consecutive patches of one patch row of one image
// (G = the whole patch row when its fp32 staging fits kSmemFloats). Phase 1 copies the segment's C*p image
// row pieces (each G*p contiguous elements when the W stride is 1) into shared memory in patch-vector order,
// with 16-byte loads when every piece starts 16-byte aligned (kImageVec), else element loads; vectors that
// hold only columns of patches that do not count are skipped. Phase 2: one warp per patch of the segment:
// mean and unbiased variance from shared memory (two passes, fp32), then one pass over the pred row that
// accumulates (pred - target)^2 and writes the gradient. A pred row with unit last stride is read with 16-byte
// vectors between a scalar head and tail (kPredVec); the gradient row is written with the same vectors, which
// the launcher allows only when grad's rows share pred's alignment modulo 16 bytes.
#include "common.cuh"

#include <cstdint>

namespace aimv2 {
namespace patch_mse {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Shared staging per CTA in floats: 48 KiB, the dynamic shared memory a launch gets without opting in.
constexpr int64_t kSmemFloats = 12288;

// ------------------------------------------------------------------------------ pure index helpers (host too)

// Index of image element (channel c, row i, column j of the patch) in the patch vector: the CPU kernel's
// order, (i, j, c) with c fastest.
__host__ __device__ inline int patch_index(int c, int i, int j, int C, int p) { return (i * p + j) * C + c; }

// Bytes left before the next 16-byte boundary of `addr`, in elements of `elem` bytes, capped at n: the scalar
// head of a row read with 16-byte vectors. `addr` is a multiple of `elem` (a tensor element's address).
__host__ __device__ inline int64_t vector_head(uintptr_t addr, int64_t elem, int64_t n) {
  const int64_t head = static_cast<int64_t>((16 - (addr & 15)) & 15) / elem;
  return head < n ? head : n;
}

__host__ __device__ inline int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

struct Plan {
  bool image_vec;  // 16-byte image loads
  bool pred_vec;   // 16-byte pred loads (and grad stores)
  int64_t G;       // patches per CTA segment
  int64_t nseg;    // segments per patch row
};

// `images` (B, C, H, W) at strides is*, element size `elem`; pred (B, L, P) at strides ps*; grad (optional)
// contiguous (B, L, P). Wp = W / p patches per patch row.
__host__ __device__ inline Plan make_plan(uintptr_t images, const int64_t* isz, const int64_t* is, uintptr_t pred,
                                          const int64_t* psz, const int64_t* ps, uintptr_t grad, int64_t p,
                                          int64_t elem) {
  Plan plan{};
  const int64_t vec = 16 / elem;  // elements per 16-byte vector
  const int64_t P = isz[1] * p * p, Wp = isz[3] / p;
  // Image pieces start at b*is0 + c*is1 + h*is2 + (segment start column)*is3; a stride of a size-1 dim is
  // never multiplied by a nonzero index.
  bool iv = is[3] == 1 && images % 16 == 0;
  for (int d = 0; d < 3; ++d) iv = iv && (isz[d] == 1 || is[d] % vec == 0);
  int64_t G = kSmemFloats / P;
  if (G >= Wp) {
    G = Wp;  // one segment per patch row: pieces start at column 0
  } else if (iv) {
    const int64_t unit = vec / gcd64(p, vec);  // G*p must be a multiple of vec
    const int64_t aligned = (G / unit) * unit;
    if (aligned > 0) {
      G = aligned;
    } else {
      iv = false;
    }
  }
  plan.image_vec = iv;
  plan.G = G < 1 ? 1 : G;
  plan.nseg = (Wp + plan.G - 1) / plan.G;
  bool pv = ps[2] == 1;
  if (pv && grad != 0) {  // grad row r starts at r*P; pred row (b, l) at b*ps0 + l*ps1: same offset mod 16 bytes
    const int64_t L = psz[1];
    pv = pred % 16 == grad % 16 && (psz[0] == 1 || (ps[0] - L * P) % vec == 0) && (L == 1 || (ps[1] - P) % vec == 0);
  }
  plan.pred_vec = pv;
  return plan;
}

// --------------------------------------------------------------------------------------------- device code

// Vec16, load16 and store16: common.cuh.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Params {
  const void* pred;
  int64_t ps0, ps1, ps2;
  const void* images;
  int64_t is0, is1, is2, is3;
  int C, p, P;         // channels, patch size, C*p*p
  int Wp, Hp;          // patches per patch row, patch rows
  int64_t L;           // rows per sample
  int64_t target_offset;
  int G, nseg;         // patches per segment, segments per patch row (grid = B * Hp * nseg < 2^31)
  const int64_t* prefix;    // (B,) or null
  float eps;
  const float* grad_rows;   // contiguous (B, L) or null
  float* rows;              // contiguous (B, L) or null
  void* grad;               // contiguous (B, L, P) or null
};

template <typename T, bool kImageVec, bool kPredVec>
__global__ void __launch_bounds__(kThreads) patch_mse_kernel(const Params a) {
  extern __shared__ float stage[];  // G * P floats: patch q of the segment at stage[q * P + patch_index(...)]
  // 32-bit index math: a 64-bit division is a called subroutine (and its ABI spilled registers on sm_90a).
  const unsigned nseg = static_cast<unsigned>(a.nseg), Hp = static_cast<unsigned>(a.Hp);
  const unsigned seg = blockIdx.x % nseg, strip = blockIdx.x / nseg;
  const unsigned ph = strip % Hp, b32 = strip / Hp;
  const int64_t b = b32;
  const int g0 = static_cast<int>(seg) * a.G;
  const int ng = a.Wp - g0 < a.G ? a.Wp - g0 : a.G;  // patches in this segment
  const int64_t n0 = static_cast<int64_t>(ph) * a.Wp + g0;  // patch index of the segment's first patch
  int64_t first = a.target_offset;  // patches before it have no row or do not count
  if (a.prefix != nullptr && a.prefix[b] > first) first = a.prefix[b];
  const int64_t q_first64 = first - n0;
  const int q_first = q_first64 <= 0 ? 0 : (q_first64 >= ng ? ng : static_cast<int>(q_first64));
  const int C = a.C, p = a.p, P = a.P;

  // Phase 1: stage the counted patches' pixels in fp32.
  if (q_first < ng) {
    const T* img = static_cast<const T*>(a.images) + b * a.is0 + static_cast<int64_t>(ph) * p * a.is2 +
                   static_cast<int64_t>(g0) * p * a.is3;
    const int width = ng * p;          // columns of the segment
    const int skip = q_first * p;      // columns before `skip` belong to patches that do not count
    const int pieces = C * p;          // image rows of the segment, piece = c * p + i
    int done = 0;                      // columns [0, done) are covered by vectors
    if (kImageVec) {
      constexpr int V = Vec16<T>::N;
      const int nv = width / V;
      for (int e = threadIdx.x; e < pieces * nv; e += kThreads) {
        const int piece = e / nv, col0 = (e - piece * nv) * V;
        if (col0 + V <= skip) continue;
        const int c = piece / p, i = piece - c * p;
        float v[V];
        load16(img + c * a.is1 + i * a.is2 + col0, v);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          const int col = col0 + u, q = col / p, j = col - q * p;
          stage[q * P + patch_index(c, i, j, C, p)] = v[u];
        }
      }
      done = nv * V;
    }
    const int rest = width - done;
    for (int e = threadIdx.x; e < pieces * rest; e += kThreads) {
      const int piece = e / rest, col = done + (e - piece * rest);
      if (col < skip) continue;
      const int c = piece / p, i = piece - c * p, q = col / p, j = col - q * p;
      stage[q * P + patch_index(c, i, j, C, p)] = to_float(img[c * a.is1 + i * a.is2 + col * a.is3]);
    }
  }
  __syncthreads();

  // Phase 2: one warp per patch.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int q = warp; q < ng; q += kWarps) {
    const int64_t n = n0 + q;
    if (n < a.target_offset) continue;  // no row
    const int64_t r = b * a.L + (n - a.target_offset);
    T* grad = a.grad == nullptr ? nullptr : static_cast<T*>(a.grad) + r * P;
    if (q < q_first) {  // does not count: zeros, nothing read
      if (lane == 0 && a.rows != nullptr) a.rows[r] = 0.f;
      if (grad != nullptr) {
        for (int k = lane; k < P; k += 32) grad[k] = from_float<T>(0.f);
      }
      continue;
    }
    const float* x = stage + q * P;
    float sum = 0.f;
    for (int k = lane; k < P; k += 32) sum += x[k];
    const float mean = warp_sum(sum) / static_cast<float>(P);
    float sq = 0.f;
    for (int k = lane; k < P; k += 32) {
      const float d = x[k] - mean;
      sq += d * d;
    }
    const float var = warp_sum(sq) / static_cast<float>(P - 1);
    const float std = sqrtf(var + a.eps);
    const float scale = 2.f * (a.grad_rows == nullptr ? 1.f : a.grad_rows[r]) / static_cast<float>(P);
    const T* pred = static_cast<const T*>(a.pred) + b * a.ps0 + (n - a.target_offset) * a.ps1;
    float acc = 0.f;
    if (kPredVec) {  // ps2 == 1: scalar head, 16-byte body, scalar tail
      constexpr int V = Vec16<T>::N;
      const int head = static_cast<int>(vector_head(reinterpret_cast<uintptr_t>(pred), sizeof(T), P));
      const int nb = (P - head) / V, body_end = head + nb * V;
      if (lane < head) {
        const float d = to_float(pred[lane]) - (x[lane] - mean) / std;
        acc += d * d;
        if (grad != nullptr) grad[lane] = from_float<T>(d * scale);
      }
      for (int vi = lane; vi < nb; vi += 32) {
        const int k0 = head + vi * V;
        float v[V];
        load16(pred + k0, v);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          const float d = v[u] - (x[k0 + u] - mean) / std;
          acc += d * d;
          v[u] = d * scale;
        }
        if (grad != nullptr) store16(grad + k0, v);
      }
      if (lane < P - body_end) {
        const int k = body_end + lane;
        const float d = to_float(pred[k]) - (x[k] - mean) / std;
        acc += d * d;
        if (grad != nullptr) grad[k] = from_float<T>(d * scale);
      }
    } else {
      for (int k = lane; k < P; k += 32) {
        const float d = to_float(pred[k * a.ps2]) - (x[k] - mean) / std;
        acc += d * d;
        if (grad != nullptr) grad[k] = from_float<T>(d * scale);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0 && a.rows != nullptr) a.rows[r] = acc / static_cast<float>(P);
  }
}

template <typename T>
const char* launch(const Params& a, const Plan& plan, int64_t grid, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(plan.G) * a.P * sizeof(float);
  const dim3 blocks(static_cast<unsigned>(grid));
  if (plan.image_vec && plan.pred_vec) {
    patch_mse_kernel<T, true, true><<<blocks, kThreads, smem, stream>>>(a);
  } else if (plan.image_vec) {
    patch_mse_kernel<T, true, false><<<blocks, kThreads, smem, stream>>>(a);
  } else if (plan.pred_vec) {
    patch_mse_kernel<T, false, true><<<blocks, kThreads, smem, stream>>>(a);
  } else {
    patch_mse_kernel<T, false, false><<<blocks, kThreads, smem, stream>>>(a);
  }
  return launch_error();
}

}  // namespace patch_mse

// Launcher called by csrc/cuda/patch_mse_glue.cpp, which has checked the arguments (shapes, dtypes, devices,
// P <= patch_mse_max_numel()). dtype: 0 fp32, 1 bf16, 2 fp16. isz/is: images' sizes and strides (4 each);
// psz/ps: pred's (3 each). prefix: int64 (B,) or null; grad_rows: fp32 contiguous (B, L) or null; rows: fp32
// contiguous (B, L) or null; grad: pred's dtype, contiguous (B, L, P), or null. Returns nullptr on success.
int64_t patch_mse_max_numel() { return patch_mse::kSmemFloats; }

const char* patch_mse_rows_cuda(int dtype, const void* pred, const int64_t* psz, const int64_t* ps,
                                const void* images, const int64_t* isz, const int64_t* is, int64_t patch_size,
                                int64_t target_offset, const int64_t* prefix, float eps, const float* grad_rows,
                                float* rows, void* grad, void* stream) {
  using namespace patch_mse;
  const int64_t elem = dtype == static_cast<int>(DType::kFloat32) ? 4 : 2;
  const Plan plan = make_plan(reinterpret_cast<uintptr_t>(images), isz, is, reinterpret_cast<uintptr_t>(pred), psz,
                              ps, reinterpret_cast<uintptr_t>(grad), patch_size, elem);
  Params a{};
  a.pred = pred;
  a.ps0 = ps[0];
  a.ps1 = ps[1];
  a.ps2 = ps[2];
  a.images = images;
  a.is0 = is[0];
  a.is1 = is[1];
  a.is2 = is[2];
  a.is3 = is[3];
  a.C = static_cast<int>(isz[1]);
  a.p = static_cast<int>(patch_size);
  a.P = static_cast<int>(isz[1] * patch_size * patch_size);
  a.Wp = static_cast<int>(isz[3] / patch_size);
  a.Hp = static_cast<int>(isz[2] / patch_size);
  a.L = psz[1];
  a.target_offset = target_offset;
  a.G = static_cast<int>(plan.G);
  a.nseg = static_cast<int>(plan.nseg);
  a.prefix = prefix;
  a.eps = eps;
  a.grad_rows = grad_rows;
  a.rows = rows;
  a.grad = grad;
  const int64_t grid = isz[0] * (isz[2] / patch_size) * plan.nseg;
  if (grid <= 0) return nullptr;
  if (grid > 0x7fffffff || isz[3] / patch_size > 0x7fffffff) return "patch_mse_rows_cuda: too many patch segments for one launch";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: return launch<float>(a, plan, grid, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, plan, grid, s);
    case DType::kFloat16: return launch<__half>(a, plan, grid, s);
  }
  return "patch_mse_rows_cuda: unknown dtype code";
}

}  // namespace aimv2
