// Philox4x32-10 dropout masks, bit for bit as Triton's tl.rand4x(seed, counter) draws them (and
// as fastbert.reference.philox_uniform reproduces them): key (seed low, seed high 32 bits),
// counter (counter low, counter high, 0, 0); each output word read as int32, folded to
// non-negative (x < 0 -> ~x), times 4.6566127342e-10 in fp32. One call serves four elements:
// element counter c takes word c & 3 of the call at counter c >> 2. An element is kept when its
// uniform is > p, compared in fp32.
//
// Every CPU kernel with dropout (attention, add+LayerNorm, embeddings+LayerNorm, and their
// backwards) draws its mask here, through DropoutFactors. With AVX-512 the kVecSize calls of
// 4 * kVecSize consecutive elements run in 32-bit lanes (the 32x32 -> 64-bit products by two
// _mm512_mul_epu32, even and odd lanes) and their words are transposed into element order;
// elsewhere, and for single counters, the scalar code below, which the vector code matches.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>

#include "vec.h"

namespace fastbert::cpu {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kPhiloxToUniform = 4.6566127342e-10f;
// Elements drawn in one pass: four to each of kVecSize Philox calls.
constexpr int64_t kPhiloxDraw = 4 * kVecSize;

// The dropout counter of column 0 of a LayerNorm row: token · round_up(H, 4) (columns add to
// it), so each row starts a Philox call (fastbert.reference.row_dropout_counters).
inline uint64_t row_dropout_first(int64_t row, int64_t H) {
  return static_cast<uint64_t>(row * ((H + 3) / 4 * 4));
}

struct Philox {
  uint32_t k0 = 0, k1 = 0;

  Philox() = default;
  explicit Philox(int64_t seed)
      : k0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)) {}

  // The four output words of the call at one 64-bit Philox counter.
  std::array<uint32_t, 4> words(uint64_t counter) const {
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
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
    return {c0, c1, c2, c3};
  }

  // The uniform of one element counter.
  float uniform(uint64_t element) const {
    int32_t x = static_cast<int32_t>(words(element >> 2)[element & 3]);
    x ^= x >> 31;  // x < 0 -> ~x
    return static_cast<float>(x) * kPhiloxToUniform;
  }

#if defined(CPU_CAPABILITY_AVX512)
  // Uniforms of the kPhiloxDraw consecutive element counters first, first + 1, ... (first a
  // multiple of 4): u[v] holds elements first + 16 v to first + 16 v + 15.
  void uniforms(uint64_t first, Vec u[4]) const {
    const __m512i ra = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxRoundA));
    const __m512i rb = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxRoundB));
    // The calls first / 4 + lane, carrying into the high word.
    const uint64_t call = first >> 2;
    const __m512i lo = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(call)));
    __m512i c0 = _mm512_add_epi32(lo, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(call >> 32)));
    __m512i c1 = _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(c0, lo), hi, _mm512_set1_epi32(1));
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
    // Word w of call g is element 4 g + w: a 4 x 16 transpose. Within each 128-bit lane the
    // unpacks gather the four words of calls 4 l + m into t_m; the shuffles then collect the
    // 128-bit lanes of calls 4 v to 4 v + 3 into vector v.
    const __m512i w01lo = _mm512_unpacklo_epi32(c0, c1), w01hi = _mm512_unpackhi_epi32(c0, c1);
    const __m512i w23lo = _mm512_unpacklo_epi32(c2, c3), w23hi = _mm512_unpackhi_epi32(c2, c3);
    const __m512i t0 = _mm512_unpacklo_epi64(w01lo, w23lo), t1 = _mm512_unpackhi_epi64(w01lo, w23lo);
    const __m512i t2 = _mm512_unpacklo_epi64(w01hi, w23hi), t3 = _mm512_unpackhi_epi64(w01hi, w23hi);
    const __m512i t01lo = _mm512_shuffle_i32x4(t0, t1, 0x44), t01hi = _mm512_shuffle_i32x4(t0, t1, 0xEE);
    const __m512i t23lo = _mm512_shuffle_i32x4(t2, t3, 0x44), t23hi = _mm512_shuffle_i32x4(t2, t3, 0xEE);
    const __m512i ordered[4] = {_mm512_shuffle_i32x4(t01lo, t23lo, 0x88), _mm512_shuffle_i32x4(t01lo, t23lo, 0xDD),
                                _mm512_shuffle_i32x4(t01hi, t23hi, 0x88), _mm512_shuffle_i32x4(t01hi, t23hi, 0xDD)};
    for (int v = 0; v < 4; ++v) {
      const __m512i folded = _mm512_xor_si512(ordered[v], _mm512_srai_epi32(ordered[v], 31));
      u[v] = Vec(_mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(kPhiloxToUniform)));
    }
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
  void uniforms(uint64_t first, Vec u[4]) const {
    __at_align__ float all[kPhiloxDraw];
    for (int64_t i = 0; i < kPhiloxDraw; ++i) all[i] = uniform(first + i);
    for (int v = 0; v < 4; ++v) u[v] = Vec::loadu(all + v * kVecSize);
  }
#endif
};

// Dropout with keep probability 1 - p: off when p == 0.
struct Dropout {
  Philox philox;
  float p = 0.f, scale = 1.f;
  bool enabled = false;

  Dropout() = default;
  Dropout(double p_, int64_t seed)
      : philox(seed), p(static_cast<float>(p_)), scale(static_cast<float>(1.0 / (1.0 - p_))), enabled(p_ > 0) {}

  bool on() const { return enabled; }
};

// The dropout factors (1 / (1 - p) where kept, 0 where dropped) of a row of elements whose
// counters start at `first` (a multiple of 4): at(j) gives those of elements j to j + kVecSize - 1
// (j a multiple of kVecSize), drawn kPhiloxDraw at a time and kept until j leaves that draw.
class DropoutFactors {
 public:
  DropoutFactors(const Dropout& dropout, uint64_t first) : dropout_(dropout), first_(first) {}

  Vec at(int64_t j) {
    const int64_t draw = j / kPhiloxDraw * kPhiloxDraw;
    if (draw != drawn_) {
      dropout_.philox.uniforms(first_ + draw, uniforms_);
      drawn_ = draw;
    }
    return Vec::blendv(Vec(0.f), Vec(dropout_.scale), uniforms_[(j - draw) / kVecSize] > Vec(dropout_.p));
  }

 private:
  const Dropout& dropout_;
  uint64_t first_;
  int64_t drawn_ = -1;  // the first element of the draw in uniforms_
  Vec uniforms_[4];
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
