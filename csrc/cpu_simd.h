// The SIMD layer of the CPU kernels (csrc/attention_cpu.cpp, csrc/cross_entropy_cpu.cpp) and the one switch that
// picks their instruction set at run time.
//
// The hot loops use GCC/Clang vector extensions over fp32 vectors of 4 or 8 lanes (F4, F8) and are compiled
// twice: for the build's baseline ISA (setup.py compiles every file for it) and, on x86, for AVX2+FMA, through
// entry functions marked AIMV2_TARGET_AVX2. Everything such an entry calls is force-inlined (AIMV2_INLINE), so the
// vector code takes the entry's ISA. avx2_enabled() says which build to run.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace aimv2 {
namespace simd {

// The one switch: true runs the AVX2+FMA builds, false the baseline ones. AVX2+FMA where the CPU has both, unless
// the environment variable AIMV2_CPU_SIMD is "portable" (read once per process; the tests use it to run the
// baseline builds).
inline bool avx2_enabled() {
  static const bool yes = [] {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    const char* simd = std::getenv("AIMV2_CPU_SIMD");
    if (simd != nullptr && std::string_view(simd) == "portable") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return yes;
}

}  // namespace simd
}  // namespace aimv2

#if defined(__GNUC__)  // GCC and Clang: vector extensions

// Vectors only ever pass between always-inlined functions, so the ABI note about passing them is moot. (Not
// popped: GCC reports -Wpsabi at the end of the translation unit.)
#pragma GCC diagnostic ignored "-Wpsabi"

#define AIMV2_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define AIMV2_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define AIMV2_TARGET_AVX2
#endif

namespace aimv2 {
namespace simd {

typedef float F4 __attribute__((vector_size(16)));
typedef int32_t I4 __attribute__((vector_size(16)));
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));

template <class F> struct IntVec;
template <> struct IntVec<F4> { using type = I4; };
template <> struct IntVec<F8> { using type = I8; };

template <class F> constexpr int64_t kLanes = sizeof(F) / sizeof(float);

// Unaligned loads and stores.
template <class F> AIMV2_INLINE F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(F));
  return v;
}
template <class F> AIMV2_INLINE void store(float* p, const F& v) { std::memcpy(p, &v, sizeof(F)); }

// Every lane x.
template <class F> AIMV2_INLINE F splat(float x) {
  F v;
  for (int64_t j = 0; j < kLanes<F>; ++j) v[j] = x;
  return v;
}

// Lane-wise mask ? yes : no; mask lanes are all ones (true) or zero (as comparisons give them).
template <class F, class I> AIMV2_INLINE F select(const I& mask, const F& yes, const F& no) {
  return (F)(((I)yes & mask) | ((I)no & ~mask));
}

// Lane-wise a < b ? b : a, so `a` where the two compare equal or either is NaN.
template <class F> AIMV2_INLINE F vmax(const F& a, const F& b) { return select(a < b, b, a); }

// The lanes' sum, lane 0 first.
template <class F> AIMV2_INLINE float lane_sum(const F& v) {
  float t = 0.f;
  for (int64_t j = 0; j < kLanes<F>; ++j) t += v[j];
  return t;
}

// exp(x), Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, 2^n into the exponent.
// 0 below -87.34 (where fp32 results turn subnormal), NaN for NaN. Max error 1.4 ulp measured over [-87, 88].
template <class F> AIMV2_INLINE F vexp(F x) {
  using I = typename IntVec<F>::type;
  const F lo = splat<F>(-87.33654f), hi = splat<F>(88.37626f);
  const I under = x < lo;
  F xc = select(under, lo, x);
  xc = select(xc > hi, hi, xc);
  const F n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (|n| < 2^22)
  F r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = splat<F>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;  // 2^n, n in [-126, 127]
  return (F)((I)(p * (F)bits) & ~under);
}

// 2^x, relative error about 2e-7 (Cephes exp2f polynomial on [-0.5, 0.5]). Exactly 0 for x < -126 (and -inf).
template <class F> AIMV2_INLINE F exp2v(const F& in) {
  using I = typename IntVec<F>::type;
  const I zero = in < splat<F>(-126.f);
  F x = select(zero, splat<F>(-126.f), in);
  x = select(x > splat<F>(127.f), splat<F>(127.f), x);
  const F magic = splat<F>(12582912.f);  // 1.5 * 2^23: (x + magic) - magic rounds x to an integer
  const F n = (x + magic) - magic;
  const F f = x - n;
  F p = splat<F>(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const I bits = (I)p + (__builtin_convertvector(n, I) << 23);
  return (F)(bits & ~zero);
}

}  // namespace simd
}  // namespace aimv2

#endif  // defined(__GNUC__)
