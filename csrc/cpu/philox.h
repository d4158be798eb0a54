// Philox4x32-10 dropout masks, bit for bit as Triton's tl.rand(seed, offset) draws them (and as
// fastbert.reference.philox_uniform reproduces them): key (seed low, seed high 32 bits), counter
// (offset low, offset high, 0, 0); the first output word, read as int32 and folded to
// non-negative (x < 0 -> ~x), times 4.6566127342e-10 in fp32. An element is kept when that
// uniform is > p, compared in fp32.
//
// Every CPU kernel with dropout (attention, add+LayerNorm, embeddings+LayerNorm, and their
// backwards) draws its mask here. With AVX-512 a vector of kVecSize consecutive counters runs
// in 32-bit lanes (the 32x32 -> 64-bit products by two _mm512_mul_epu32, even and odd lanes);
// elsewhere, and for single counters, the scalar code below, which the vector code matches.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "vec.h"

namespace fastbert::cpu {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kPhiloxToUniform = 4.6566127342e-10f;

struct Philox {
  uint32_t k0 = 0, k1 = 0;

  Philox() = default;
  explicit Philox(int64_t seed)
      : k0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)) {}

  // The uniform of one 64-bit counter offset.
  float uniform(uint64_t offset) const {
    uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2;
      const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0;
      c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ a;
      c1 = static_cast<uint32_t>(pb);
      c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ b;
      c3 = static_cast<uint32_t>(pa);
      a += kPhiloxKeyA;
      b += kPhiloxKeyB;
    }
    int32_t x = static_cast<int32_t>(c0);
    x ^= x >> 31;  // x < 0 -> ~x
    return static_cast<float>(x) * kPhiloxToUniform;
  }

#if defined(CPU_CAPABILITY_AVX512)
  // Uniforms of the counters (c0[i], c1[i]) in 16 lanes.
  Vec uniforms(__m512i c0, __m512i c1) const {
    const __m512i ra = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxRoundA));
    const __m512i rb = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxRoundB));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mul_wide(rb, c2, hi_b, lo_b);
      mul_wide(ra, c0, hi_a, lo_a);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32(static_cast<int32_t>(a)));
      c1 = lo_b;
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32(static_cast<int32_t>(b)));
      c3 = lo_a;
      a += kPhiloxKeyA;
      b += kPhiloxKeyB;
    }
    const __m512i folded = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));
    return Vec(_mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(kPhiloxToUniform)));
  }

  // Uniforms of the kVecSize consecutive offsets first, first + 1, ... (carrying into the high word).
  Vec uniforms(uint64_t first) const {
    const __m512i lo = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first)));
    const __m512i c0 = _mm512_add_epi32(lo, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first >> 32)));
    const __m512i c1 = _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(c0, lo), hi, _mm512_set1_epi32(1));
    return uniforms(c0, c1);
  }

 private:
  // High and low 32 bits of the lane-wise products a * x (a a broadcast constant).
  static void mul_wide(__m512i a, __m512i x, __m512i& hi, __m512i& lo) {
    const __m512i even = _mm512_mul_epu32(a, x);                         // lanes 0, 2, ...: 64-bit products
    const __m512i odd = _mm512_mul_epu32(a, _mm512_srli_epi64(x, 32));  // lanes 1, 3, ...
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }

 public:
#else
  Vec uniforms(uint64_t first) const {
    __at_align__ float u[kVecSize];
    for (int64_t i = 0; i < kVecSize; ++i) u[i] = uniform(first + i);
    return Vec::loadu(u);
  }
#endif
};

// Dropout with keep probability 1 - p: off when p == 0. keep(first) is the vector of factors
// of the kVecSize elements with counters first, first + 1, ...: 1 / (1 - p) where kept, 0 where dropped.
struct Dropout {
  Philox philox;
  float p = 0.f, scale = 1.f;
  bool enabled = false;

  Dropout() = default;
  Dropout(double p_, int64_t seed)
      : philox(seed), p(static_cast<float>(p_)), scale(static_cast<float>(1.0 / (1.0 - p_))), enabled(p_ > 0) {}

  bool on() const { return enabled; }

  Vec keep(uint64_t first) const {
    const Vec u = philox.uniforms(first);
    return Vec::blendv(Vec(0.f), Vec(scale), u > Vec(p));
  }
};

// The dropout of an op's (dropout_p, seed) arguments, as fastbert.reference.check_dropout checks
// them: 0 <= p < 1 and, when p > 0, an int64 seed tensor of one element (read here, on the host).
inline Dropout dropout_arg(double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "fastbert: dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return {};
  TORCH_CHECK_VALUE(seed.has_value() && seed->scalar_type() == at::kLong && seed->numel() == 1,
                    "fastbert: seed must be an int64 tensor of one element when dropout_p > 0");
  return Dropout(p, seed->item<int64_t>());
}

}  // namespace fastbert::cpu
