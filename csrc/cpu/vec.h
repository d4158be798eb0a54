// Small helpers over ATen's at::vec shared by the CPU kernels.
//
// Every kernel computes in fp32. Vectorized<float> loads and stores of fp32 data are direct;
// full vectors of bf16 on AVX-512 convert in registers (with AMX/AVX512-BF16 GEMMs, bf16 is a
// mode people run for speed, and element-wise conversion made attention slower than in fp32);
// other bf16/fp16 data is converted element by element through an aligned scratch array, which
// is simple and keeps one code path per kernel.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace fastbert::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVecSize = Vec::size();

// Loads `count` elements of `ptr` (the rest of the vector is zero) as fp32.
template <typename T>
inline Vec load(const T* ptr, int64_t count = kVecSize) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(ptr, count);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if (std::is_same_v<T, c10::BFloat16> && count == kVecSize) {
      __m512 out;
      at::vec::cvtbf16_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ptr)), out);
      return out;
    }
#endif
    __at_align__ float tmp[kVecSize] = {};
    for (int64_t i = 0; i < count; ++i) tmp[i] = static_cast<float>(ptr[i]);
    return Vec::loadu(tmp);
  }
}

// Stores the first `count` lanes of `v` to `ptr`, rounding to T.
template <typename T>
inline void store(Vec v, T* ptr, int64_t count = kVecSize) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(ptr, count);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if (std::is_same_v<T, c10::BFloat16> && count == kVecSize) {  // rounds to nearest even, as c10 does
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptr), at::vec::cvtfp32_bf16(__m512(v)));
      return;
    }
#endif
    __at_align__ float tmp[kVecSize];
    v.store(tmp);
    for (int64_t i = 0; i < count; ++i) ptr[i] = static_cast<T>(tmp[i]);
  }
}

inline float sum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline float max(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// Lanes [0, count) of `v`, the others replaced by `fill`.
inline Vec head(Vec v, int64_t count, float fill = 0.f) {
  return count == kVecSize ? v : Vec::set(Vec(fill), v, count);
}

// Calls f(offset, count) over [0, n) in vector steps; the full steps get a constant count so
// the compiler drops the masking there.
template <typename F>
inline void for_each_vec(int64_t n, F f) {
  int64_t j = 0;
  for (; j + kVecSize <= n; j += kVecSize) f(j, kVecSize);
  if (j < n) f(j, n - j);
}

// Calls f(T{}) with T the C++ type of `dtype` (fp32, bf16 or fp16); other dtypes are an error.
template <typename F>
inline void dispatch_float(c10::ScalarType dtype, const char* what, F f) {
  switch (dtype) {
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    case c10::ScalarType::Half: return f(c10::Half{});
    default: TORCH_CHECK(false, "fastbert: ", what, " supports float32, bfloat16 and float16, got ", dtype);
  }
}

}  // namespace fastbert::cpu
