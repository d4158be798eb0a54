// Attention over packed variable-length sequences on CPU.
//
// q, k, v are [T, N, D] (any token and head strides, unit stride over D), sequence b owning
// tokens [cu_seqlens[b], cu_seqlens[b + 1]). Work is split over (sequence, head, block of
// kBlockQ queries) with at::parallel_for. Each work item walks its keys in blocks of kBlockK
// with an online softmax (running max m and sum l per query row), so no [S, S] score matrix
// is ever stored:
//
//   S = (q * scale) Kᵀ        micro-kernel: kRows query rows x kBlockK keys, broadcast-FMA
//                             over D against a transposed copy of the key block
//   S += bias; mask padding keys and, if causal, keys after the query
//   m' = max(m, rowmax S);  P = exp(S - m');  l = l·exp(m - m') + rowsum P
//   O = O·exp(m - m') + P V   (broadcast p, FMA over D)
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

constexpr int64_t kBlockQ = 32;             // query rows per work item
constexpr int64_t kRows = 4;                // query rows per score micro-kernel call
constexpr int64_t kKeyVecs = 4;             // vectors per key block row
constexpr int64_t kBlockK = kKeyVecs * kVecSize;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(kBlockQ % kRows == 0);

struct Strides {
  int64_t token, head;
};

struct BiasView {  // additive bias [B, N, S, S] by strides (0 where broadcast)
  const void* data = nullptr;
  int64_t b = 0, n = 0, q = 0, k = 0;
};

// s[r][:] = sum_d q[r][d] * kt[d][:] for kRows rows; kt is the key block transposed [D, kBlockK].
inline void score_tile(const float* q, int64_t D, const float* kt, float* s) {
  Vec acc[kRows][kKeyVecs];
  for (auto& row : acc)
    for (auto& a : row) a = Vec(0.f);
  for (int64_t d = 0; d < D; ++d) {
    Vec kv[kKeyVecs];
    for (int64_t c = 0; c < kKeyVecs; ++c) kv[c] = Vec::loadu(kt + d * kBlockK + c * kVecSize);
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec qv(q[r * D + d]);
      for (int64_t c = 0; c < kKeyVecs; ++c) acc[r][c] = at::vec::fmadd(qv, kv[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < kKeyVecs; ++c) acc[r][c].store(s + r * kBlockK + c * kVecSize);
}

// o[:width] = o * corr + sum_j p[j] * v[j][:width], the accumulators held in registers.
// kFull: width is exactly kChunk vectors, so every count below is a constant.
constexpr int64_t kChunk = 4;
template <bool kFull>
inline void pv_chunk(float* o, Vec corr, const float* p, int64_t keys, const float* v,
                     int64_t v_stride, int64_t width) {
  const int64_t nvec = kFull ? kChunk : (width + kVecSize - 1) / kVecSize;
  auto count = [&](int64_t i) { return kFull ? kVecSize : std::min(kVecSize, width - i * kVecSize); };
  Vec acc[kChunk];
  for (int64_t i = 0; i < nvec; ++i) acc[i] = Vec::loadu(o + i * kVecSize, count(i)) * corr;
  for (int64_t j = 0; j < keys; ++j) {
    const Vec pj(p[j]);
    const float* vj = v + j * v_stride;
    for (int64_t i = 0; i < nvec; ++i)
      acc[i] = at::vec::fmadd(pj, Vec::loadu(vj + i * kVecSize, count(i)), acc[i]);
  }
  for (int64_t i = 0; i < nvec; ++i) acc[i].store(o + i * kVecSize, count(i));
}

inline void pv_row(float* o, float corr, const float* p, int64_t keys, const float* v,
                   int64_t v_stride, int64_t D) {
  for (int64_t d0 = 0; d0 < D; d0 += kChunk * kVecSize) {
    const int64_t width = std::min(kChunk * kVecSize, D - d0);
    if (width == kChunk * kVecSize) {
      pv_chunk<true>(o + d0, Vec(corr), p, keys, v + d0, v_stride, width);
    } else {
      pv_chunk<false>(o + d0, Vec(corr), p, keys, v + d0, v_stride, width);
    }
  }
}

// Per-thread scratch, sized once per parallel chunk.
struct Scratch {
  std::vector<float> q, kt, v, s, o, m, l;
  explicit Scratch(int64_t D)
      : q(kBlockQ * D), kt(D * kBlockK), v(kBlockK * D), s(kBlockQ * kBlockK), o(kBlockQ * D),
        m(kBlockQ), l(kBlockQ) {}
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
void attend_block(const Problem<T>& p, Scratch& w, int64_t b, int64_t h, int64_t q0) {
  const int64_t start = p.cu[b], len = p.cu[b + 1] - p.cu[b];
  const int64_t rows = std::min(kBlockQ, len - q0);
  const int64_t D = p.D;
  // Scaled queries; rows past `rows` are zero so the micro-kernel can run whole tiles.
  std::fill(w.q.begin(), w.q.end(), 0.f);
  for (int64_t i = 0; i < rows; ++i) {
    const T* src = p.q + (start + q0 + i) * p.qs.token + h * p.qs.head;
    for (int64_t d = 0; d < D; ++d) w.q[i * D + d] = static_cast<float>(src[d]) * p.scale;
  }
  std::fill(w.o.begin(), w.o.begin() + rows * D, 0.f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  const int64_t tiles = (rows + kRows - 1) / kRows;
  const int64_t key_end = p.causal ? std::min(len, q0 + rows) : len;
  const T* bias = static_cast<const T*>(p.bias.data);

  for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
    const int64_t keys = std::min(kBlockK, key_end - k0);
    // Transposed key block [D, kBlockK], zero past `keys`.
    if (keys < kBlockK) std::fill(w.kt.begin(), w.kt.end(), 0.f);
    for (int64_t j = 0; j < keys; ++j) {
      const T* src = p.k + (start + k0 + j) * p.ks.token + h * p.ks.head;
      for (int64_t d = 0; d < D; ++d) w.kt[d * kBlockK + j] = static_cast<float>(src[d]);
    }
    // fp32 values are read in place; other dtypes are converted into the scratch block.
    const float* vblock;
    int64_t v_stride;
    if constexpr (std::is_same_v<T, float>) {
      vblock = p.v + (start + k0) * p.vs.token + h * p.vs.head;
      v_stride = p.vs.token;
    } else {
      for (int64_t j = 0; j < keys; ++j) {
        const T* src = p.v + (start + k0 + j) * p.vs.token + h * p.vs.head;
        for (int64_t d = 0; d < D; ++d) w.v[j * D + d] = static_cast<float>(src[d]);
      }
      vblock = w.v.data();
      v_stride = D;
    }
    for (int64_t t = 0; t < tiles; ++t)
      score_tile(w.q.data() + t * kRows * D, D, w.kt.data(), w.s.data() + t * kRows * kBlockK);

    for (int64_t i = 0; i < rows; ++i) {
      float* s = w.s.data() + i * kBlockK;
      if (bias) {
        const T* br = bias + b * p.bias.b + h * p.bias.n + (q0 + i) * p.bias.q + k0 * p.bias.k;
        for (int64_t j = 0; j < keys; ++j) s[j] += static_cast<float>(br[j * p.bias.k]);
      }
      // Keys past the block end and, if causal, after this query are masked out.
      const int64_t visible = p.causal ? std::min(keys, q0 + i - k0 + 1) : keys;
      for (int64_t j = std::max<int64_t>(visible, 0); j < kBlockK; ++j) s[j] = kNegInf;

      Vec vmax(kNegInf);
      for (int64_t c = 0; c < kKeyVecs; ++c)
        vmax = at::vec::maximum(vmax, Vec::loadu(s + c * kVecSize));
      const float m_new = std::max(w.m[i], max(vmax));
      if (m_new == kNegInf) continue;  // every key so far masked: nothing to add
      const float corr = std::exp(w.m[i] - m_new);
      const Vec vm(m_new);
      Vec vsum(0.f);
      for (int64_t c = 0; c < kKeyVecs; ++c) {
        Vec e = (Vec::loadu(s + c * kVecSize) - vm).exp_u20();
        e.store(s + c * kVecSize);
        vsum = vsum + e;
      }
      w.l[i] = w.l[i] * corr + sum(vsum);
      w.m[i] = m_new;
      pv_row(w.o.data() + i * D, corr, s, std::max<int64_t>(visible, 0), vblock, v_stride, D);
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
    TORCH_CHECK(bias_in->scalar_type() == q.scalar_type(), "fastbert: attention bias has dtype ",
                bias_in->scalar_type(), " but q has ", q.scalar_type());
    TORCH_CHECK(bias_in->dim() <= 4, "fastbert: attention bias must broadcast to [batch, heads, ",
                "seq, seq], got ", bias_in->sizes());
    bias = *bias_in;
    while (bias.dim() < 4) bias = bias.unsqueeze(0);
    bias = bias.expand({B, N, bias.size(2), bias.size(3)});  // raises if it does not broadcast
    TORCH_CHECK(bias.size(2) >= longest && bias.size(3) >= longest, "fastbert: attention bias ",
                bias_in->sizes(), " is smaller than the longest sequence, ", longest);
    bias_view = {bias.const_data_ptr(), bias.stride(0), bias.stride(1), bias.stride(2), bias.stride(3)};
  }
  const int64_t q_blocks = (longest + kBlockQ - 1) / kBlockQ;
  dispatch_float(q.scalar_type(), "attention", [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> p{q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
                       strides_of(q), strides_of(k), strides_of(v), out.mutable_data_ptr<T>(),
                       cu, N, D, static_cast<float>(scale), causal, bias_view};
    // Items ordered (sequence, head, query block): neighbours share K and V in cache.
    at::parallel_for(0, B * N * q_blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(D);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t qb = item % q_blocks, bh = item / q_blocks;
        const int64_t b = bh / N, h = bh % N;
        if (qb * kBlockQ < p.cu[b + 1] - p.cu[b]) attend_block(p, scratch, b, h, qb * kBlockQ);
      }
    });
  });
  return out;
}

}  // namespace fastbert::cpu
