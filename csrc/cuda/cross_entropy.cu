// Fused softmax cross-entropy rows on CUDA: one CTA per row computes its logsumexp, its loss and the gradient
// of its loss with respect to its logits, in fp32 (the same math as csrc/cross_entropy_cpu.cpp).
//
// For row r with logits x (V values), target t, smoothing eps and z-loss weight z:
//   lse[r]       = m + log s,    m = max_k x_k,  s = sum_k exp(x_k - m)          (float64)
//   loss_rows[r] = log s + (1 - eps)(m - x_t) + eps (m - mean_k x_k) + z lse^2    0 when t == ignore_index
//   grad[r, k]   = scale_r (softmax_k (1 + 2 z lse) - (1 - eps) [k == t] - eps / V)  0 when t == ignore_index
// rounded once to the logits' dtype. With saved_lse (the backward form) the lse is read, as hi + lo with
// exp(x - hi) * exp(-lo), and the gradient costs one exp per element.
//
// Structure: pass 1 reads the row once (16-byte vectors between a scalar head and tail, any row alignment)
// keeping a per-thread online (max, sum of exp) and a plain sum of x; a block reduction merges the threads'
// pairs (max in fp32, sums rescaled to the row max in fp32 and added in float64). Pass 2 reads the row again
// and writes the gradient, each thread the elements it read, so the in-place variant (grad == logits) is safe:
// the reduction's __syncthreads separates every read of pass 1 (and of x_t) from the writes. A target outside
// [0, V) that is not ignore_index is never read: its row gets a NaN loss and a NaN gradient.
#include "common.cuh"

#include <cstdint>

namespace aimv2 {
namespace ce {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

// ------------------------------------------------------------------------------ pure helpers (host too)

// The scalar head of a row read with 16-byte vectors: elements before the next 16-byte boundary, capped at n.
__host__ __device__ inline int64_t vector_head(uintptr_t addr, int64_t elem, int64_t n) {
  const int64_t head = static_cast<int64_t>((16 - (addr & 15)) & 15) / elem;
  return head < n ? head : n;
}

// Threads per CTA for a row of V values.
__host__ __device__ inline int threads_for(int64_t V) { return V <= 4096 ? 128 : V <= 16384 ? 256 : kMaxThreads; }

// Whether grad row r can be stored with the vectors that read logits row r: same address modulo 16 bytes for
// every row.
__host__ __device__ inline bool same_alignment(uintptr_t x, int64_t x_stride, uintptr_t g, int64_t g_stride,
                                               int64_t n, int64_t elem) {
  return x % 16 == g % 16 && (n <= 1 || ((x_stride - g_stride) * elem) % 16 == 0);
}

// --------------------------------------------------------------------------------------------- device code

// Vec16 (16 bytes <-> floats): common.cuh.

struct Params {
  const void* x;          // logits (N, V), unit column stride
  int64_t x_stride;       // row stride, elements
  void* grad;             // (N, V) in the logits' dtype, unit column stride, or null; may equal x (in place)
  int64_t grad_stride;
  bool grad_vec;          // grad rows share the logits rows' alignment modulo 16 bytes
  const int64_t* targets;  // (N,)
  int64_t V;
  int64_t ignore_index;
  float smoothing, z_loss;
  const float* scale;     // null, one value, or (N,)
  bool per_row_scale;
  const double* saved_lse;  // (N,) or null: backward form
  float* loss;            // (N,) or null
  double* lse;            // (N,) or null
};

constexpr float kNegInf = -__builtin_huge_valf();

// Adds one value to a thread's online (max, sum of exp(x - max)).
__device__ __forceinline__ void online_add(float v, float& m, float& s) {
  if (v > m) {
    s *= expf(m - v);  // 0 while m is -inf
    m = v;
  }
  if (m != kNegInf) s += expf(v - m);
}

// Each thread calls f(k, value) for the elements it owns of row x (n values): a scalar head up to the first
// 16-byte boundary, 16-byte vectors, a scalar tail. fv(k0, values[N]) handles one vector.
template <typename T, class Scalar, class Vector>
__device__ __forceinline__ void for_row(const T* x, int64_t n, Scalar f, Vector fv) {
  constexpr int N = Vec16<T>::N;
  const int64_t head = vector_head(reinterpret_cast<uintptr_t>(x), sizeof(T), n);
  const int64_t nb = (n - head) / N, body_end = head + nb * N;
  const int tid = threadIdx.x, nt = blockDim.x;
  if (tid < head) f(tid, to_float(x[tid]));
  for (int64_t v = tid; v < nb; v += nt) {
    const int64_t k0 = head + v * N;
    float vals[N];
    Vec16<T>::unpack(*reinterpret_cast<const uint4*>(x + k0), vals);
    fv(k0, vals);
  }
  if (tid < n - body_end) f(body_end + tid, to_float(x[body_end + tid]));
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) ce_kernel(const Params a) {
  constexpr int N = Vec16<T>::N;
  __shared__ float sh_max[kMaxWarps];
  __shared__ double sh_sum[kMaxWarps], sh_sumx[kMaxWarps];
  const int64_t r = blockIdx.x, V = a.V;
  const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
  T* g = a.grad == nullptr ? nullptr : static_cast<T*>(a.grad) + r * a.grad_stride;
  const int64_t t = a.targets[r];
  const bool counted = t != a.ignore_index;
  const bool bad = counted && (t < 0 || t >= V);  // never read; NaN results
  const float nan = __int_as_float(0x7fffffff);
  float scale = 1.f;
  if (a.scale != nullptr) scale = a.scale[a.per_row_scale ? r : 0];
  if (bad) scale = nan;

  // Writes the gradient row: out_k = e(x_k) * p - u, minus tc at k == t.
  auto write_grad = [&](auto exp_of, float p, float u, float tc) {
    for_row<T>(
        x, V,
        [&](int64_t k, float v) {
          float o = exp_of(v) * p - u;
          if (k == t) o -= tc;
          g[k] = from_float<T>(o);
        },
        [&](int64_t k0, float* v) {
#pragma unroll
          for (int i = 0; i < N; ++i) {
            float o = exp_of(v[i]) * p - u;
            if (k0 + i == t) o -= tc;
            v[i] = o;
          }
          if (a.grad_vec) {
            *reinterpret_cast<uint4*>(g + k0) = Vec16<T>::pack(v);
          } else {
#pragma unroll
            for (int i = 0; i < N; ++i) g[k0 + i] = from_float<T>(v[i]);
          }
        });
  };
  auto zero_grad = [&]() {
    for (int64_t k = threadIdx.x; k < V; k += blockDim.x) g[k] = from_float<T>(0.f);
  };

  if (a.saved_lse != nullptr) {  // backward: grad = exp(x - hi) * exp(hi - lse) * p - u - tc [k == t]
    if (g == nullptr) return;
    if (!counted) {
      zero_grad();
      return;
    }
    const double lse = a.saved_lse[r];
    const float hi = static_cast<float>(lse), lo_factor = static_cast<float>(exp(static_cast<double>(hi) - lse));
    const float p = (1.f + 2.f * a.z_loss * hi) * scale * lo_factor;
    const float u = a.smoothing / static_cast<float>(V) * scale, tc = (1.f - a.smoothing) * scale;
    write_grad([hi](float v) { return expf(v - hi); }, p, u, tc);
    return;
  }

  if (!counted && a.lse == nullptr) {
    if (threadIdx.x == 0 && a.loss != nullptr) a.loss[r] = 0.f;
    if (g != nullptr) zero_grad();
    return;
  }
  // x_t is read before the reduction's barriers: after them, other threads overwrite the row (in place).
  float x_t = 0.f;
  if (threadIdx.x == 0 && counted) x_t = bad ? nan : to_float(x[t]);

  // Pass 1: per-thread online max / sum of exp, and sum of x.
  float m = kNegInf, s = 0.f, sx = 0.f;
  for_row<T>(
      x, V,
      [&](int64_t, float v) {
        online_add(v, m, s);
        sx += v;
      },
      [&](int64_t, const float* v) {
        float vm = v[0], vs = v[0];
#pragma unroll
        for (int i = 1; i < N; ++i) {
          vm = fmaxf(vm, v[i]);
          vs += v[i];
        }
        sx += vs;
        if (vm > m) {
          s *= expf(m - vm);
          m = vm;
        }
        if (m != kNegInf) {
#pragma unroll
          for (int i = 0; i < N; ++i) s += expf(v[i] - m);
        }
      });

  // Block reduction: M = max of the threads' maxima; S = sum of s * exp(m - M) in float64; SX likewise.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  float wm = m;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) wm = fmaxf(wm, __shfl_xor_sync(0xffffffffu, wm, o));
  if (lane == 0) sh_max[warp] = wm;
  __syncthreads();
  float M = sh_max[0];
  for (int w = 1; w < nwarps; ++w) M = fmaxf(M, sh_max[w]);
  double ds = (m == kNegInf) ? 0.0 : static_cast<double>(s * expf(m - M)), dx = sx;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ds += __shfl_xor_sync(0xffffffffu, ds, o);
    dx += __shfl_xor_sync(0xffffffffu, dx, o);
  }
  if (lane == 0) {
    sh_sum[warp] = ds;
    sh_sumx[warp] = dx;
  }
  __syncthreads();
  double S = 0.0, SX = 0.0;
  for (int w = 0; w < nwarps; ++w) {  // the same order in every thread: every thread gets the same values
    S += sh_sum[w];
    SX += sh_sumx[w];
  }

  const float log_s = static_cast<float>(log(S)), lse_f = M + log_s;
  if (threadIdx.x == 0) {
    if (a.lse != nullptr) a.lse[r] = static_cast<double>(M) + log(S);
    if (a.loss != nullptr) {
      float loss = 0.f;
      if (counted) {
        const float mean_x = static_cast<float>(SX / static_cast<double>(V));
        loss = log_s + (1.f - a.smoothing) * (M - x_t) + a.smoothing * (M - mean_x) + a.z_loss * lse_f * lse_f;
      }
      a.loss[r] = loss;
    }
  }
  if (g == nullptr) return;
  if (!counted) {
    zero_grad();
    return;
  }
  // Pass 2: grad = exp(x - M) * p - u - tc [k == t], p = (1 + 2 z lse) scale / s.
  const float p = (1.f + 2.f * a.z_loss * lse_f) * scale / static_cast<float>(S);
  const float u = a.smoothing / static_cast<float>(V) * scale, tc = (1.f - a.smoothing) * scale;
  write_grad([M](float v) { return expf(v - M); }, p, u, tc);
}

template <typename T> const char* launch(const Params& a, int64_t n, cudaStream_t stream) {
  ce_kernel<T><<<static_cast<unsigned>(n), threads_for(a.V), 0, stream>>>(a);
  return launch_error();
}

}  // namespace ce

// Launcher called by csrc/cuda/cross_entropy_glue.cpp, which has checked the arguments. dtype: 0 fp32, 1 bf16,
// 2 fp16. logits: (n, V) with unit column stride, row stride x_stride (elements). grad: null, or (n, V) in the
// logits' dtype with unit column stride and row stride grad_stride; it may equal logits (in place). targets:
// int64 (n,). scale: null, one float (per_row_scale false) or n floats. saved_lse: float64 (n,) or null (then
// loss and lse must be null). loss: fp32 (n,) or null; lse: float64 (n,) or null. Returns nullptr on success.
const char* cross_entropy_rows_cuda(int dtype, const void* logits, int64_t n, int64_t V, int64_t x_stride,
                                    void* grad, int64_t grad_stride, const int64_t* targets, int64_t ignore_index,
                                    float label_smoothing, float z_loss, const float* scale, bool per_row_scale,
                                    const double* saved_lse, float* loss, double* lse, void* stream) {
  using namespace ce;
  if (n <= 0) return nullptr;
  if (n > 0x7fffffff) return "cross_entropy_rows_cuda: more than 2^31 - 1 rows in one launch";
  const int64_t elem = dtype == static_cast<int>(DType::kFloat32) ? 4 : 2;
  Params a{};
  a.x = logits;
  a.x_stride = x_stride;
  a.grad = grad;
  a.grad_stride = grad_stride;
  a.grad_vec = grad != nullptr && same_alignment(reinterpret_cast<uintptr_t>(logits), x_stride,
                                                 reinterpret_cast<uintptr_t>(grad), grad_stride, n, elem);
  a.targets = targets;
  a.V = V;
  a.ignore_index = ignore_index;
  a.smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.scale = scale;
  a.per_row_scale = per_row_scale;
  a.saved_lse = saved_lse;
  a.loss = loss;
  a.lse = lse;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: return launch<float>(a, n, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, n, s);
    case DType::kFloat16: return launch<__half>(a, n, s);
  }
  return "cross_entropy_rows_cuda: unknown dtype code";
}

}  // namespace aimv2
