// GELU on fp32 vectors, shared by the bias+GELU epilogue (gelu.cpp) and the panel GEMM (gemm.cpp).
#pragma once

#include <cmath>
#include <string_view>

#include "vec.h"

namespace fastbert::cpu {

enum class Gelu { kErf, kTanh };

inline Gelu parse_gelu(std::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "fastbert: approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "none" ? Gelu::kErf : Gelu::kTanh;
}

// erf as the odd rational function x·P(x²)/Q(x²) on [-4, 4] (erf is ±1 in fp32 beyond),
// with the minimax coefficients Eigen uses for float: |error| <= 5e-7, GELU error on par with
// torch's in fp32 (the tests hold it to the accuracy rule). Thirteen FMAs and one division,
// where the usual A&S form with exp costs about twice that: this epilogue is compute-bound
// when the GEMM output sits in cache.
inline Vec erf(Vec x) {
  x = at::vec::minimum(at::vec::maximum(x, Vec(-4.f)), Vec(4.f));
  const Vec x2 = x * x;
  Vec p(-2.72614225801306e-10f);
  for (float c : {2.77068142495902e-08f, -2.10102402082508e-06f, -5.69250639462346e-05f,
                  -7.34990630326855e-04f, -2.95459980854025e-03f, -1.60960333262415e-02f}) {
    p = at::vec::fmadd(p, x2, Vec(c));
  }
  Vec q(-1.45660718464996e-05f);
  for (float c : {-2.13374055278905e-04f, -1.68282697438203e-03f, -7.37332916720468e-03f,
                  -1.42647390514189e-02f}) {
    q = at::vec::fmadd(q, x2, Vec(c));
  }
  return x * p / q;
}

// tanh form as 0.5·x·(1 + tanh(u)) = x · sigmoid(2u) = x / (1 + exp(-2u)): one exp and one
// division instead of a tanh, and no cancellation in 1 + tanh(u) for negative x.
template <Gelu kind>
inline Vec gelu(Vec x) {
  const Vec one(1.f);
  if constexpr (kind == Gelu::kErf) {
    return Vec(0.5f) * x * (one + erf(x * Vec(static_cast<float>(M_SQRT1_2))));
  } else {
    const Vec minus_two_k0(static_cast<float>(-2 * M_2_SQRTPI * M_SQRT1_2)), k1(0.044715f);
    Vec minus_two_u = minus_two_k0 * at::vec::fmadd(k1 * x, x * x, x);
    return x / (one + minus_two_u.exp_u20());
  }
}

// GELU'(x), for the backward: with erf, Φ(x) + x φ(x); with tanh, for σ = sigmoid(2u) (so that
// 0.5 (1 + tanh u) = σ and 1 - tanh² u = 4 σ (1 - σ)), σ + 2 x σ (1 - σ) k0 (1 + 3 k1 x²). Both stay
// finite for any |x| (σ saturates to 0 or 1).
template <Gelu kind>
inline Vec gelu_grad(Vec x) {
  const Vec one(1.f);
  if constexpr (kind == Gelu::kErf) {
    const Vec cdf = Vec(0.5f) * (one + erf(x * Vec(static_cast<float>(M_SQRT1_2))));
    const Vec pdf = (x * x * Vec(-0.5f)).exp() * Vec(static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2));
    return at::vec::fmadd(x, pdf, cdf);
  } else {
    const Vec k0(static_cast<float>(M_2_SQRTPI * M_SQRT1_2)), k1(0.044715f);
    const Vec x2 = x * x;
    const Vec minus_two_u = Vec(-2.f) * k0 * at::vec::fmadd(k1 * x, x2, x);
    const Vec sig = one / (one + minus_two_u.exp());
    const Vec du = k0 * at::vec::fmadd(Vec(3.f) * k1, x2, one);  // du/dx
    return at::vec::fmadd(Vec(2.f) * x * sig * (one - sig), du, sig);
  }
}

}  // namespace fastbert::cpu
