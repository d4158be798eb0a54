// Attention over packed variable-length sequences on CPU.
//
// q, k, v are [T, N, D] (any token and head strides, unit stride over D), sequence b owning
// tokens [cu_seqlens[b], cu_seqlens[b + 1]). Work is split over (sequence, head) pairs with
// at::parallel_for. Each pair transposes its keys once into fp32 scratch (and converts its
// values, unless they are fp32 already), then runs blocks of kBlockQ queries, each walking
// the keys in blocks of kBlockK with an online softmax (running max m and sum l per query
// row), so no [S, S] score matrix is ever stored:
//
//   S = (q * scale) Kᵀ        micro-kernel: kRows queries x kBlockK keys, broadcast-FMA over D
//   S += bias; mask padding keys and, if causal, keys after the query
//   m' = max(m, rowmax S);  P = exp(S - m');  l = l·exp(m - m') + rowsum P
//   O = O·exp(m - m') + P V   micro-kernel: kRows queries x 4 vectors of D, each loaded
//                             value vector shared by the kRows rows
//
// and finally out = O / l. A row whose keys are all masked keeps l = 0 and is written as
// zeros, as the reference does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace fastbert::cpu {
namespace {

constexpr int64_t kBlockQ = 32;             // query rows per block
constexpr int64_t kRows = 4;                // query rows per score micro-kernel call
constexpr int64_t kKeyVecs = 4;             // vectors per key block row
constexpr int64_t kBlockK = kKeyVecs * kVecSize;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(kBlockQ % kRows == 0);

struct Strides {
  int64_t token, head;
};

struct BiasView {  // additive fp32 bias [B, N, S, S] by strides (0 where broadcast)
  const float* data = nullptr;
  int64_t b = 0, n = 0, q = 0, k = 0;
};

// s[r][:] = sum_d q[r][d] * kt[d][:] for kRows query rows and kBlockK keys; kt is the
// transposed key block, row stride ld.
inline void score_tile(const float* q, int64_t D, const float* kt, int64_t ld, float* s) {
  Vec acc[kRows][kKeyVecs];
  for (auto& row : acc)
    for (auto& a : row) a = Vec(0.f);
  for (int64_t d = 0; d < D; ++d) {
    Vec kv[kKeyVecs];
    for (int64_t c = 0; c < kKeyVecs; ++c) kv[c] = Vec::loadu(kt + d * ld + c * kVecSize);
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec qv(q[r * D + d]);
      for (int64_t c = 0; c < kKeyVecs; ++c) acc[r][c] = at::vec::fmadd(qv, kv[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < kKeyVecs; ++c) acc[r][c].store(s + r * kBlockK + c * kVecSize);
}

// o[r][:width] = o[r] * corr[r] + sum_j p[r][j] * v[j][:width] for kRows rows: each loaded
// vector of v feeds kRows FMAs. kFull: width is exactly kChunk vectors (constant counts).
constexpr int64_t kChunk = 4;
template <bool kFull>
inline void pv_tile(float* o, int64_t ldo, const float* corr, const float* p, int64_t keys,
                    const float* v, int64_t v_stride, int64_t width) {
  const int64_t nvec = kFull ? kChunk : (width + kVecSize - 1) / kVecSize;
  auto count = [&](int64_t i) { return kFull ? kVecSize : std::min(kVecSize, width - i * kVecSize); };
  Vec acc[kRows][kChunk];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t i = 0; i < nvec; ++i)
      acc[r][i] = Vec::loadu(o + r * ldo + i * kVecSize, count(i)) * Vec(corr[r]);
  for (int64_t j = 0; j < keys; ++j) {
    Vec vj[kChunk];
    for (int64_t i = 0; i < nvec; ++i) vj[i] = Vec::loadu(v + j * v_stride + i * kVecSize, count(i));
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec pj(p[r * kBlockK + j]);
      for (int64_t i = 0; i < nvec; ++i) acc[r][i] = at::vec::fmadd(pj, vj[i], acc[r][i]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t i = 0; i < nvec; ++i) acc[r][i].store(o + r * ldo + i * kVecSize, count(i));
}

inline void pv_rows(float* o, const float* corr, const float* p, int64_t keys, const float* v,
                    int64_t v_stride, int64_t D) {
  for (int64_t d0 = 0; d0 < D; d0 += kChunk * kVecSize) {
    const int64_t width = std::min(kChunk * kVecSize, D - d0);
    if (width == kChunk * kVecSize) {
      pv_tile<true>(o + d0, D, corr, p, keys, v + d0, v_stride, width);
    } else {
      pv_tile<false>(o + d0, D, corr, p, keys, v + d0, v_stride, width);
    }
  }
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Per-thread scratch, sized once per parallel chunk for the longest sequence.
struct Scratch {
  std::vector<float> q, kt, v, s, o, m, l, corr;
  Scratch(int64_t D, int64_t longest)
      : q(kBlockQ * D), kt(D * round_up(longest, kBlockK)), v(round_up(longest, kBlockK) * D),
        s(kBlockQ * kBlockK), o(kBlockQ * D), m(kBlockQ), l(kBlockQ), corr(kBlockQ) {}
};

template <typename T>
struct Problem {
  const T *q, *k, *v;
  Strides qs, ks, vs;
  T* out;  // contiguous [T, N, D]
  const int64_t* cu;
  int64_t N, D;
  float scale;
  bool causal;
  BiasView bias;
};

template <typename T>
void attend_queries(const Problem<T>& p, Scratch& w, int64_t b, int64_t h, int64_t q0,
                    const float* kt, int64_t ld, const float* v, int64_t v_stride) {
  const int64_t start = p.cu[b], len = p.cu[b + 1] - p.cu[b];
  const int64_t rows = std::min(kBlockQ, len - q0);
  const int64_t tiles = (rows + kRows - 1) / kRows;
  const int64_t D = p.D;
  // Scaled queries; rows past `rows` are zero so the micro-kernels can run whole tiles.
  std::fill(w.q.begin(), w.q.end(), 0.f);
  for (int64_t i = 0; i < rows; ++i) {
    const T* src = p.q + (start + q0 + i) * p.qs.token + h * p.qs.head;
    for (int64_t d = 0; d < D; ++d) w.q[i * D + d] = static_cast<float>(src[d]) * p.scale;
  }
  std::fill(w.o.begin(), w.o.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  const int64_t key_end = p.causal ? std::min(len, q0 + rows) : len;
  const float* bias = p.bias.data;

  for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
    const int64_t keys = std::min(kBlockK, key_end - k0);
    for (int64_t t = 0; t < tiles; ++t)
      score_tile(w.q.data() + t * kRows * D, D, kt + k0, ld, w.s.data() + t * kRows * kBlockK);

    for (int64_t i = 0; i < tiles * kRows; ++i) {
      float* s = w.s.data() + i * kBlockK;
      if (i >= rows) {  // padding rows of the last tile: contribute nothing
        std::fill(s, s + kBlockK, 0.f);
        w.corr[i] = 1.f;
        continue;
      }
      if (bias) {
        const float* br = bias + b * p.bias.b + h * p.bias.n + (q0 + i) * p.bias.q + k0 * p.bias.k;
        for (int64_t j = 0; j < keys; ++j) s[j] += br[j * p.bias.k];
      }
      // Keys past the block end and, if causal, after this query are masked out.
      const int64_t visible = p.causal ? std::min(keys, q0 + i - k0 + 1) : keys;
      for (int64_t j = std::max<int64_t>(visible, 0); j < kBlockK; ++j) s[j] = kNegInf;

      Vec vmax(kNegInf);
      for (int64_t c = 0; c < kKeyVecs; ++c)
        vmax = at::vec::maximum(vmax, Vec::loadu(s + c * kVecSize));
      const float m_new = std::max(w.m[i], max(vmax));
      if (m_new == kNegInf) {  // every key so far masked: nothing to add yet
        std::fill(s, s + kBlockK, 0.f);
        w.corr[i] = 1.f;
        continue;
      }
      w.corr[i] = std::exp(w.m[i] - m_new);
      const Vec vm(m_new);
      Vec vsum(0.f);
      for (int64_t c = 0; c < kKeyVecs; ++c) {
        Vec e = (Vec::loadu(s + c * kVecSize) - vm).exp_u20();
        e.store(s + c * kVecSize);
        vsum = vsum + e;
      }
      w.l[i] = w.l[i] * w.corr[i] + sum(vsum);
      w.m[i] = m_new;
    }
    for (int64_t t = 0; t < tiles; ++t) {
      pv_rows(w.o.data() + t * kRows * D, w.corr.data() + t * kRows, w.s.data() + t * kRows * kBlockK,
              keys, v + k0 * v_stride, v_stride, D);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    T* dst = p.out + ((start + q0 + i) * p.N + h) * D;
    const float inv = w.l[i] > 0.f ? 1.f / w.l[i] : 0.f;
    for_each_vec(D, [&](int64_t d, int64_t n) {
      store(Vec::loadu(w.o.data() + i * D + d, n) * Vec(inv), dst + d, n);
    });
  }
}

// One (sequence, head): its keys are transposed (and values converted to fp32) once, then
// every block of kBlockQ queries runs against them.
template <typename T>
void attend_sequence_head(const Problem<T>& p, Scratch& w, int64_t b, int64_t h) {
  const int64_t start = p.cu[b], len = p.cu[b + 1] - p.cu[b];
  if (len == 0) return;
  const int64_t D = p.D, ld = round_up(len, kBlockK);
  float* kt = w.kt.data();
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * ld + len, kt + (d + 1) * ld, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const T* src = p.k + (start + j) * p.ks.token + h * p.ks.head;
    for (int64_t d = 0; d < D; ++d) kt[d * ld + j] = static_cast<float>(src[d]);
  }
  // fp32 values are read in place; other dtypes are converted into the scratch.
  const float* v;
  int64_t v_stride;
  if constexpr (std::is_same_v<T, float>) {
    v = p.v + start * p.vs.token + h * p.vs.head;
    v_stride = p.vs.token;
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const T* src = p.v + (start + j) * p.vs.token + h * p.vs.head;
      for (int64_t d = 0; d < D; ++d) w.v[j * D + d] = static_cast<float>(src[d]);
    }
    v = w.v.data();
    v_stride = D;
  }
  for (int64_t q0 = 0; q0 < len; q0 += kBlockQ) attend_queries(p, w, b, h, q0, kt, ld, v, v_stride);
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

// Unit stride over the head dim is all the kernel needs; anything else is copied.
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, bool causal,
                     const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3,
              "fastbert: attention needs q, k, v of shape [tokens, heads, head_dim], got ",
              q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes());
  TORCH_CHECK(q_in.sizes() == k_in.sizes() && q_in.sizes() == v_in.sizes(),
              "fastbert: attention needs q, k, v of one shape, got ", q_in.sizes(), ", ",
              k_in.sizes(), ", ", v_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "fastbert: attention needs q, k, v of one dtype");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
              "fastbert: cu_seqlens must be [batch + 1], got ", cu_seqlens.sizes());
  auto q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t total = q.size(0), N = q.size(1), D = q.size(2);
  auto cu_t = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* cu = cu_t.const_data_ptr<int64_t>();
  const int64_t B = cu_t.numel() - 1;
  TORCH_CHECK(cu[0] == 0 && cu[B] == total, "fastbert: cu_seqlens must run from 0 to the ",
              total, " tokens, got ", cu[0], " to ", cu[B]);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "fastbert: cu_seqlens must be non-decreasing");
    longest = std::max(longest, cu[b + 1] - cu[b]);
  }
  TORCH_CHECK(longest <= std::max<int64_t>(max_seqlen, 0), "fastbert: a sequence has ", longest,
              " tokens but max_seqlen is ", max_seqlen);
  auto out = at::empty({total, N, D}, q.options());
  if (total == 0 || N == 0 || D == 0) return out;

  BiasView bias_view;
  at::Tensor bias;
  if (bias_in) {
    TORCH_CHECK(bias_in->is_floating_point(), "fastbert: attention bias must be floating point, got ",
                bias_in->scalar_type());
    TORCH_CHECK(bias_in->dim() <= 4, "fastbert: attention bias must broadcast to [batch, heads, ",
                "seq, seq], got ", bias_in->sizes());
    bias = bias_in->to(at::kFloat);  // scores are fp32; converted before any broadcast
    while (bias.dim() < 4) bias = bias.unsqueeze(0);
    bias = bias.expand({B, N, bias.size(2), bias.size(3)});  // raises if it does not broadcast
    TORCH_CHECK(bias.size(2) >= longest && bias.size(3) >= longest, "fastbert: attention bias ",
                bias_in->sizes(), " is smaller than the longest sequence, ", longest);
    bias_view = {bias.const_data_ptr<float>(), bias.stride(0), bias.stride(1), bias.stride(2), bias.stride(3)};
  }
  dispatch_float(q.scalar_type(), "attention", [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> p{q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
                       strides_of(q), strides_of(k), strides_of(v), out.mutable_data_ptr<T>(),
                       cu, N, D, static_cast<float>(scale), causal, bias_view};
    at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(D, longest);
      for (int64_t item = begin; item < end; ++item) attend_sequence_head(p, scratch, item / N, item % N);
    });
  });
  return out;
}

}  // namespace fastbert::cpu
