// Attention over packed variable-length sequences on CPU.
//
// q, k, v are [T, N, D] (any token and head strides, unit stride over D), sequence b owning
// tokens [cu_seqlens[b], cu_seqlens[b + 1]). The work is blocks of kBlockQ queries of one
// (sequence, head), shared out between threads by cost (WorkList). A thread copies the keys
// (transposed, in panels) and values of a (sequence, head) into fp32 scratch once for its run
// of blocks of that pair; each block walks the keys in blocks of kBlockK with an online
// softmax (running max m and sum l per query row), so no [S, S] score matrix is ever stored:
//
//   S = (q * scale) Kᵀ
//   S += rel_bias[h, clamp(col[key] - col[query], -R, R) + R]  (if a relative-bias table is given)
//   S += bias; mask padding keys and, if causal, keys after the query
//   m' = max(m, rowmax S);  P = exp(S - m');  l = l·exp(m - m') + rowsum P
//   O = O·exp(m - m') + P V
//
// and finally out = O / l. A row whose keys are all masked keeps l = 0 and is written as
// zeros, as the reference does.
//
// Both products run one micro-kernel, a register tile of kAccRegs accumulators (3/4 of the
// vector registers: the rest hold loaded vectors), R rows by NV vectors with R = kAccRegs / NV
// and compile-time trip counts, so the tile never leaves registers. As every tile height
// divides kAccRegs, query blocks are processed in whole multiples of kAccRegs rows; rows past
// the block's end hold zero queries and contribute nothing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "philox.h"
#include "vec.h"

namespace fastbert::cpu {
namespace {

// 32 vector registers with AVX-512, 16 with AVX2 and narrower.
constexpr int64_t kAccRegs = kVecSize >= 16 ? 24 : 12;
constexpr int64_t kStripVecs = 4;                      // widest tile, in vectors
constexpr int64_t kStrip = kStripVecs * kVecSize;      // columns of the widest tile
constexpr int64_t kPanelK = kStrip;                    // keys per transposed-key panel
constexpr int64_t kBlockK = 2 * kPanelK;               // keys per block: one softmax update each
constexpr int64_t kBlockQ = 2 * kAccRegs;              // query rows per block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(kBlockQ % kAccRegs == 0);

struct Strides {
  int64_t token, head;
};

struct BiasView {  // additive fp32 bias [B, N, S, S] by strides (0 where broadcast)
  const float* data = nullptr;
  int64_t b = 0, n = 0, q = 0, k = 0;
};

struct RelBiasView {  // relative-position bias: a contiguous fp32 [N, 2R + 1] table, int32 [T] columns
  const float* table = nullptr;
  const int32_t* positions = nullptr;
  int64_t radius = 0;
};

// Both products are one register-tiled micro-kernel: for R = kAccRegs / NV rows,
//   c[r][:NV vectors] = (c_scale ? c[r] * c_scale[r] : 0) + sum_k a[r][k] * b[k][:NV vectors]
// a is row-major (row stride lda), b has row stride ldb. The tile stays in registers and each
// loaded vector of b feeds R FMAs.
template <int64_t NV>
inline void gemm_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                      float* c, int64_t ldc, const float* c_scale) {
  constexpr int64_t R = kAccRegs / NV;
  Vec acc[R][NV];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < NV; ++i)
      acc[r][i] = c_scale ? Vec::loadu(c + r * ldc + i * kVecSize) * Vec(c_scale[r]) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec bk[NV];
    for (int64_t i = 0; i < NV; ++i) bk[i] = Vec::loadu(b + k * ldb + i * kVecSize);
    for (int64_t r = 0; r < R; ++r) {
      const Vec ar(a[r * lda + k]);
      for (int64_t i = 0; i < NV; ++i) acc[r][i] = at::vec::fmadd(ar, bk[i], acc[r][i]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < NV; ++i) acc[r][i].store(c + r * ldc + i * kVecSize);
}

template <int64_t NV>
inline void gemm_tiles(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                       float* c, int64_t ldc, const float* c_scale, int64_t rows) {
  constexpr int64_t R = kAccRegs / NV;
  for (int64_t r = 0; r < rows; r += R)
    gemm_tile<NV>(a + r * lda, lda, b, ldb, K, c + r * ldc, ldc, c_scale ? c_scale + r : nullptr);
}

// gemm_tile over `rows` rows (a multiple of kAccRegs) and `width` columns (whole vectors), in
// strips of up to kStripVecs vectors; strip j of b starts at b + j * b_strip.
inline void gemm_rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t b_strip,
                      int64_t K, float* c, int64_t ldc, const float* c_scale, int64_t rows, int64_t width) {
  for (int64_t j = 0; j * kStrip < width; ++j) {
    const float* bj = b + j * b_strip;
    float* cj = c + j * kStrip;
    switch (std::min(kStripVecs, (width - j * kStrip) / kVecSize)) {
      case 1: gemm_tiles<1>(a, lda, bj, ldb, K, cj, ldc, c_scale, rows); break;
      case 2: gemm_tiles<2>(a, lda, bj, ldb, K, cj, ldc, c_scale, rows); break;
      case 3: gemm_tiles<3>(a, lda, bj, ldb, K, cj, ldc, c_scale, rows); break;
      default: gemm_tiles<4>(a, lda, bj, ldb, K, cj, ldc, c_scale, rows); break;
    }
  }
}
static_assert(kStripVecs == 4, "gemm_rows dispatches strips of 1 to 4 vectors");

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Per-thread scratch, sized once per parallel chunk for the longest sequence: the keys as
// [D, kPanelK] panels (each score tile reads one contiguous panel), the values as [keys, Dp]
// rows padded with zeros to whole vectors, like the output accumulator o. Both copies also
// keep the micro-kernels off the strided [T, 3, N, D] layout, whose large token stride
// maps many rows to few L1 sets (S=512 ran 15 % slower reading it in place).
struct Scratch {
  int64_t Dp;
  std::vector<float> q, kt, v, s, o, m, l, corr;
  Scratch(int64_t D, int64_t longest)
      : Dp(round_up(D, kVecSize)), q(kBlockQ * D), kt(D * round_up(longest, kBlockK)),
        v(round_up(longest, kBlockK) * Dp), s(kBlockQ * kBlockK), o(kBlockQ * Dp), m(kBlockQ),
        l(kBlockQ), corr(kBlockQ) {}
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
  RelBiasView rel;
  // attention_train: dropout on the probabilities, and the log-sum-exp [N, total] (null: not wanted)
  Dropout dropout = {};
  float* lse = nullptr;
  int64_t total = 0;
};

// The dropout counter of (head h, packed query row, key 0 of the sequence): the key index
// within the sequence is the low word, added to it.
inline uint64_t dropout_row(int64_t h, int64_t total, int64_t row) {
  return static_cast<uint64_t>(h * total + row) << 32;
}

// Online-softmax update of one query row's scores s[:width] (width keys computed, the first
// `visible` of them real): on return s holds P (zeros where masked), corr the factor that
// rescales the row's earlier output, and m, l the running max and sum.
inline void softmax_row(float* s, int64_t width, int64_t visible, float& m, float& l, float& corr) {
  for (int64_t j = std::max<int64_t>(visible, 0); j < width; ++j) s[j] = kNegInf;
  Vec vmax(kNegInf);
  for (int64_t j = 0; j < width; j += kVecSize) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
  const float m_new = std::max(m, max(vmax));
  if (m_new == kNegInf) {  // every key so far masked: nothing to add yet
    std::fill(s, s + width, 0.f);
    corr = 1.f;
    return;
  }
  corr = std::exp(m - m_new);
  const Vec vm(m_new);
  Vec vsum(0.f);
  for (int64_t j = 0; j < width; j += kVecSize) {
    Vec e = (Vec::loadu(s + j) - vm).exp_u20();
    e.store(s + j);
    vsum = vsum + e;
  }
  l = l * corr + sum(vsum);
  m = m_new;
}

// s[j] += table[clamp(key_columns[j] - query_column, -R, R) + R] for j < keys, in vectors of
// int32 distances and a gather from the head's table row (2R + 1 floats: L1-resident). The
// lanes in [keys, round_up(keys, kVecSize)) get some table value; the softmax masks them.
// Columns are non-negative int32, so their difference cannot overflow.
inline void add_rel_bias(float* s, int64_t keys, const float* table, int32_t R, const int32_t* key_columns,
                         int32_t query_column) {
  using VecI = at::vec::Vectorized<int32_t>;
  static_assert(VecI::size() == kVecSize);
  const VecI vq(query_column), lo(-R), hi(R), vr(R);
  for_each_vec(keys, [&](int64_t j, int64_t n) {
    const VecI distance = at::vec::minimum(at::vec::maximum(VecI::loadu(key_columns + j, n) - vq, lo), hi);
    (Vec::loadu(s + j) + at::vec::gather<sizeof(float)>(table, distance + vr)).store(s + j);
  });
}

// The biases of one query row's scores s[:keys] (keys k0, ... of the sequence; query index qi):
// the relative bias of the head's table row and the additive bias. Shared by the forward and
// the backward, which recomputes the scores the forward's softmax saw.
inline void add_biases(float* s, int64_t keys, const BiasView& bias, const float* rel_table, int32_t radius,
                       const int32_t* columns, int64_t b, int64_t h, int64_t qi, int64_t k0) {
  if (rel_table) add_rel_bias(s, keys, rel_table, radius, columns + k0, columns[qi]);
  if (bias.data) {
    const float* br = bias.data + b * bias.b + h * bias.n + qi * bias.q + k0 * bias.k;
    for (int64_t j = 0; j < keys; ++j) s[j] += br[j * bias.k];
  }
}

template <typename T>
void attend_queries(const Problem<T>& p, Scratch& w, int64_t b, int64_t h, int64_t q0) {
  const int64_t start = p.cu[b], len = p.cu[b + 1] - p.cu[b];
  const int64_t rows = std::min(kBlockQ, len - q0);
  const int64_t tile_rows = round_up(rows, kAccRegs);  // every tile height divides kAccRegs
  const int64_t D = p.D, Dp = w.Dp;
  // Scaled queries; rows past `rows` are zero so the micro-kernels can run whole tiles.
  std::fill(w.q.begin(), w.q.end(), 0.f);
  for (int64_t i = 0; i < rows; ++i) {
    const T* src = p.q + (start + q0 + i) * p.qs.token + h * p.qs.head;
    float* row = w.q.data() + i * D;
    for_each_vec(D, [&](int64_t d, int64_t n) { (load(src + d, n) * Vec(p.scale)).store(row + d, n); });
  }
  std::fill(w.o.begin(), w.o.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  const int64_t key_end = p.causal ? std::min(len, q0 + rows) : len;
  const float* rel_table = p.rel.table ? p.rel.table + h * (2 * p.rel.radius + 1) : nullptr;
  const int32_t* columns = p.rel.positions ? p.rel.positions + start : nullptr;  // this sequence's

  for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
    const int64_t keys = std::min(kBlockK, key_end - k0);
    const int64_t width = round_up(keys, kVecSize);  // keys scored: whole vectors
    // S: the strips of b are whole key panels
    gemm_rows(w.q.data(), D, w.kt.data() + k0 * D, kPanelK, kPanelK * D, D, w.s.data(), kBlockK,
              nullptr, tile_rows, width);

    for (int64_t i = 0; i < tile_rows; ++i) {
      float* s = w.s.data() + i * kBlockK;
      if (i >= rows) {  // padding rows of the last tiles: contribute nothing
        std::fill(s, s + width, 0.f);
        w.corr[i] = 1.f;
        continue;
      }
      add_biases(s, keys, p.bias, rel_table, static_cast<int32_t>(p.rel.radius), columns, b, h, q0 + i, k0);
      // Keys past the block end and, if causal, after this query are masked out.
      const int64_t visible = p.causal ? std::min(keys, q0 + i - k0 + 1) : keys;
      softmax_row(s, width, visible, w.m[i], w.l[i], w.corr[i]);
      if (p.dropout.on()) {  // on P before the division by l: the same as on the normalised P
        DropoutFactors keep(p.dropout, dropout_row(h, p.total, start + q0 + i) + k0);
        for (int64_t j = 0; j < width; j += kVecSize) (Vec::loadu(s + j) * keep.at(j)).store(s + j);
      }
    }
    // O = O * corr + P V
    gemm_rows(w.s.data(), kBlockK, w.v.data() + k0 * Dp, Dp, kStrip, keys, w.o.data(), Dp,
              w.corr.data(), tile_rows, Dp);
  }
  for (int64_t i = 0; i < rows; ++i) {
    T* dst = p.out + ((start + q0 + i) * p.N + h) * D;
    const float inv = w.l[i] > 0.f ? 1.f / w.l[i] : 0.f;
    for_each_vec(D, [&](int64_t d, int64_t n) {
      store(Vec::loadu(w.o.data() + i * Dp + d, n) * Vec(inv), dst + d, n);
    });
    if (p.lse) {
      p.lse[h * p.total + start + q0 + i] =
          w.l[i] > 0.f ? w.m[i] + std::log(w.l[i]) : std::numeric_limits<float>::infinity();
    }
  }
}

// Copies rows [start, start + len) of head h of x ([tokens, heads, D] by strides) to fp32
// [D, kPanelK] panels (transposed; zero from len up to `padded`, a multiple of kPanelK).
template <typename T>
void load_panels(const T* x, Strides xs, int64_t start, int64_t len, int64_t h, int64_t D, int64_t padded,
                 float* panels) {
  std::fill(panels + (len / kPanelK) * kPanelK * D, panels + padded * D, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const T* src = x + (start + j) * xs.token + h * xs.head;
    float* panel = panels + (j / kPanelK) * kPanelK * D + j % kPanelK;
    for (int64_t d = 0; d < D; ++d) panel[d * kPanelK] = static_cast<float>(src[d]);
  }
}

// The same rows to fp32 [padded, Dp] rows, times `scale`, zero past D and from len up to `padded`.
template <typename T>
void load_rows(const T* x, Strides xs, int64_t start, int64_t len, int64_t h, int64_t D, int64_t Dp,
               int64_t padded, float* rows, float scale = 1.f) {
  std::fill(rows + len * Dp, rows + padded * Dp, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const T* src = x + (start + j) * xs.token + h * xs.head;
    float* row = rows + j * Dp;
    if (scale == 1.f) {
      for_each_vec(D, [&](int64_t d, int64_t n) { load(src + d, n).store(row + d, n); });
    } else {
      for_each_vec(D, [&](int64_t d, int64_t n) { (load(src + d, n) * Vec(scale)).store(row + d, n); });
    }
    std::fill(row + D, row + Dp, 0.f);
  }
}

// Copies the keys (transposed, as panels, zero past the sequence's end) and values of one
// (sequence, head) to the fp32 scratch, where every block of its queries reads them.
template <typename T>
void load_keys_values(const Problem<T>& p, Scratch& w, int64_t b, int64_t h) {
  const int64_t start = p.cu[b], len = p.cu[b + 1] - p.cu[b], padded = round_up(len, kBlockK);
  load_panels(p.k, p.ks, start, len, h, p.D, padded, w.kt.data());
  load_rows(p.v, p.vs, start, len, h, p.D, w.Dp, padded, w.v.data());
}

// The unit of work: kBlockQ queries of one (sequence, head).
struct QueryBlock {
  int64_t b, h, q0;
};

// Every query block in (sequence, head, q0) order, and cost[i], the summed cost of blocks
// [0, i] (score area plus the per-row copies), by which the blocks are shared out: sequence
// lengths differ, and splitting the (sequence, head) pairs evenly by count, as a plain
// parallel_for over them does, gave one thread most of the work in a varlen batch.
struct WorkList {
  std::vector<QueryBlock> blocks;
  std::vector<int64_t> cost;

  // Blocks of block_q queries (the backward's unit is a whole (sequence, head): block_q >= the
  // longest sequence).
  WorkList(const int64_t* cu, int64_t B, int64_t N, int64_t D, bool causal, int64_t block_q = kBlockQ) {
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = cu[b + 1] - cu[b];
      for (int64_t h = 0; h < N; ++h) {
        for (int64_t q0 = 0; q0 < len; q0 += block_q) {
          const int64_t rows = std::min(block_q, len - q0);
          total += rows * ((causal ? std::min(len, q0 + rows) : len) + 2 * D);
          blocks.push_back({b, h, q0});
          cost.push_back(total);
        }
      }
    }
  }

  // Blocks [first(part), first(part + 1)) make up part `part` of `parts`: a block belongs to
  // the part its cumulative cost ends in, so the parts cost about the same.
  int64_t first(int64_t part, int64_t parts) const {
    const int64_t total = cost.back();
    auto it = std::upper_bound(cost.begin(), cost.end(), part,
                               [&](int64_t k, int64_t c) { return k * total < c * parts; });
    return it - cost.begin();
  }
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

// attention's relative-position bias: a float32 [N, 2R + 1] table on q's device and int32 [T]
// columns there (as fastbert.reference.check_rel_bias, with the same exception types).
void check_rel_bias_args(const at::Tensor& q, const at::Tensor& rel_bias,
                         const std::optional<at::Tensor>& positions) {
  const int64_t T = q.size(0), N = q.size(1);
  TORCH_CHECK_TYPE(rel_bias.scalar_type() == at::kFloat, "fastbert: rel_bias must be a float32 tensor, got ",
                   rel_bias.scalar_type());
  TORCH_CHECK_VALUE(rel_bias.dim() == 2 && rel_bias.size(0) == N && rel_bias.size(1) % 2 == 1,
                    "fastbert: rel_bias must be [heads, 2R + 1] = [", N, ", odd], got ", rel_bias.sizes());
  TORCH_CHECK_VALUE(rel_bias.device() == q.device(), "fastbert: rel_bias is on ", rel_bias.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(positions.has_value(), "fastbert: positions (int32 [T], each token's column in its padded ",
                    "sequence) is required with rel_bias");
  TORCH_CHECK_TYPE(positions->scalar_type() == at::kInt, "fastbert: positions must be an int32 tensor, got ",
                   positions->scalar_type());
  TORCH_CHECK_VALUE(positions->dim() == 1 && positions->size(0) == T, "fastbert: positions must be [T] = [", T,
                    "], got ", positions->sizes());
  TORCH_CHECK_VALUE(positions->device() == q.device(), "fastbert: positions is on ", positions->device(),
                    " but q is on ", q.device());
}

// Unit stride over the head dim is all the kernel needs; anything else is copied.
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The checked arguments of attention, attention_train and attention_backward, in the layout
// the kernels read: q, k, v with unit stride over D, int64 cu_seqlens, fp32 biases.
struct Args {
  at::Tensor q, k, v, cu_t, bias, rel_bias, positions;
  const int64_t* cu = nullptr;
  int64_t total = 0, N = 0, D = 0, B = 0, longest = 0;
  BiasView bias_view;
  RelBiasView rel_view;
};

Args prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_seqlens,
             int64_t max_seqlen, const std::optional<at::Tensor>& bias_in,
             const std::optional<at::Tensor>& rel_bias_in, const std::optional<at::Tensor>& positions_in) {
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
  Args a;
  a.q = unit_last_stride(q_in), a.k = unit_last_stride(k_in), a.v = unit_last_stride(v_in);
  a.total = a.q.size(0), a.N = a.q.size(1), a.D = a.q.size(2);
  a.cu_t = cu_seqlens.to(at::kLong).contiguous();
  a.cu = a.cu_t.const_data_ptr<int64_t>();
  const int64_t B = a.B = a.cu_t.numel() - 1;
  const int64_t* cu = a.cu;
  TORCH_CHECK(cu[0] == 0 && cu[B] <= a.total, "fastbert: cu_seqlens must run from 0 to at most the ",
              a.total, " tokens, got ", cu[0], " to ", cu[B]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "fastbert: cu_seqlens must be non-decreasing");
    a.longest = std::max(a.longest, cu[b + 1] - cu[b]);
  }
  TORCH_CHECK(a.longest <= std::max<int64_t>(max_seqlen, 0), "fastbert: a sequence has ", a.longest,
              " tokens but max_seqlen is ", max_seqlen);
  if (rel_bias_in) {
    check_rel_bias_args(a.q, *rel_bias_in, positions_in);
    a.rel_bias = rel_bias_in->contiguous();
    a.positions = positions_in->contiguous();
    a.rel_view = {a.rel_bias.const_data_ptr<float>(), a.positions.const_data_ptr<int32_t>(),
                  (a.rel_bias.size(1) - 1) / 2};
  }
  if (bias_in) {
    TORCH_CHECK(bias_in->is_floating_point(), "fastbert: attention bias must be floating point, got ",
                bias_in->scalar_type());
    TORCH_CHECK(bias_in->dim() <= 4, "fastbert: attention bias must broadcast to [batch, heads, ",
                "seq, seq], got ", bias_in->sizes());
    auto bias = bias_in->to(at::kFloat);  // scores are fp32; converted before any broadcast
    while (bias.dim() < 4) bias = bias.unsqueeze(0);
    bias = bias.expand({B, a.N, bias.size(2), bias.size(3)});  // raises if it does not broadcast
    TORCH_CHECK(bias.size(2) >= a.longest && bias.size(3) >= a.longest, "fastbert: attention bias ",
                bias_in->sizes(), " is smaller than the longest sequence, ", a.longest);
    a.bias = bias;
    a.bias_view = {bias.const_data_ptr<float>(), bias.stride(0), bias.stride(1), bias.stride(2), bias.stride(3)};
  }
  return a;
}

// The forward, with the log-sum-exp [N, total] when with_lse (+inf where no key is visible and
// on dummy rows), else an undefined tensor.
std::tuple<at::Tensor, at::Tensor> forward(const Args& a, double scale, bool causal, const Dropout& dropout,
                                           bool with_lse) {
  const int64_t total = a.total, N = a.N, D = a.D, B = a.B;
  const int64_t* cu = a.cu;
  auto out = at::empty({total, N, D}, a.q.options());
  at::Tensor lse;
  if (with_lse) lse = at::full({N, total}, std::numeric_limits<float>::infinity(), a.q.options().dtype(at::kFloat));
  if (total == 0 || N == 0 || D == 0) return {out, lse};
  // Rows past cu[B] are the dummy rows of a static packing: no sequence reads or owns them.
  // Zeros keep uninitialised memory (NaN, denormals) out of the GEMMs that follow.
  out.narrow(0, cu[B], total - cu[B]).zero_();
  dispatch_float(a.q.scalar_type(), "attention", [&](auto tag) {
    using T = decltype(tag);
    Problem<T> p{a.q.const_data_ptr<T>(), a.k.const_data_ptr<T>(), a.v.const_data_ptr<T>(),
                 strides_of(a.q), strides_of(a.k), strides_of(a.v), out.mutable_data_ptr<T>(),
                 cu, N, D, static_cast<float>(scale), causal, a.bias_view, a.rel_view};
    p.dropout = dropout;
    p.lse = with_lse ? lse.mutable_data_ptr<float>() : nullptr;
    p.total = total;
    const WorkList work(cu, B, N, D, causal);
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), work.blocks.size());
    const int64_t longest = a.longest;
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(D, longest);
      int64_t loaded = -1;  // b * N + h of the keys and values in the scratch
      for (int64_t i = work.first(begin, parts); i < work.first(end, parts); ++i) {
        const QueryBlock& block = work.blocks[i];
        if (block.b * N + block.h != loaded) {
          load_keys_values(p, scratch, block.b, block.h);
          loaded = block.b * N + block.h;
        }
        attend_queries(p, scratch, block.b, block.h, block.q0);
      }
    });
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------- backward
//
// FlashAttention-2's backward with the forward recomputed from the saved log-sum-exp, one
// (sequence, head) at a time, wholly by one thread (so dK and dV need no atomics, and every
// sum runs in one fixed order: the results do not depend on the thread count). For each block
// of kBlockQ queries i and kBlockK keys j, with M the dropout factors (0 or 1 / (1 - p)):
//
//   S = (q * scale) Kᵀ + biases, masked as the forward;  P = exp(S - lse)
//   (for rows where fp32 lost log l from lse = m + log l, a first sweep recomputes m and l:
//   P = exp((S - m) - log l); see kInexactLse)
//   dV_j += (P∘M)ᵀ dO_i;  dP = (dO_i Vᵀ)∘M;  dS = P∘(dP - Δ_i), Δ = rowsum(dO∘O)
//   (O the saved output, after dropout; for bf16/fp16, whose saved O is rounded, Δ comes from
//   a first sweep over the keys as Σ_j (P∘M)_ij (dO Vᵀ)_ij in fp32 instead)
//   dQ_i += dS K_j (times scale at the end);  dK_j += dSᵀ (q_i * scale)
//   d_rel_bias[h, bucket] += dS over the (query, key) pairs of that bucket
//
// on the same register-tiled micro-kernel as the forward. dV and dK take P∘M and dS
// transposed (a copy per block), so that all five products read row-major operands.

constexpr int64_t kKeyRows = (kBlockK + kAccRegs - 1) / kAccRegs * kAccRegs;  // a key block in whole tiles
// From this |lse| up, fp32 keeps the log l of lse = m + log l to worse than 2^-16 relative (the
// Triton kernels' 2^8 in base 2): a row whose largest score is huge (every key masked by a
// finite minimum, as Hugging Face masks are: scores near -3.4e38) has lost log l entirely, and
// exp(S - lse) would be 1 instead of 1/l. Query blocks holding such a row recompute m and l.
constexpr float kInexactLse = 256.f * 0.693147181f;

template <typename T>
struct Backward {
  Problem<T> f;            // q, k, v, the sequences, scale, masks, biases, dropout, total
  const T* grad;           // dO [total, N, D] by strides
  Strides gs;
  const T* out;            // O as the forward saved it (after dropout), [total, N, D] by strides
  Strides os;
  const float* lse;        // [N, total]
  T* dqkv;                 // contiguous [total, 3, N, D]
  double* drel = nullptr;  // [B, N, W]: each (sequence, head)'s d_rel_bias, or null
  int64_t W = 0;
};

// Per-thread fp32 scratch for the longest sequence: queries (scaled), dO, keys as rows and as
// panels, values as panels, the three gradient accumulators, and one block's P, dS and their
// transposes.
struct BackScratch {
  int64_t Dp;
  // lse and log_l: P = exp((S - lse) - log_l); log_l is 0 but where the block recomputed m and l
  // (lse then holds m). row_max, row_sum, corr: that recomputation's online softmax state.
  std::vector<float> q, dout, dq, k, dk, dv, kt, vt, delta, lse, log_l, s, dp, pt, dst, ones, row_max, row_sum, corr;
  std::vector<double> drel;
  BackScratch(int64_t D, int64_t longest, int64_t W) : Dp(round_up(D, kVecSize)) {
    const int64_t Lq = round_up(longest, kBlockQ), Lk = round_up(longest, kBlockK) + kAccRegs;
    for (auto* buf : {&q, &dout, &dq}) buf->resize(Lq * Dp);
    for (auto* buf : {&k, &dk, &dv}) buf->resize(Lk * Dp);
    for (auto* buf : {&kt, &vt}) buf->resize(D * round_up(longest, kBlockK));
    delta.resize(Lq);
    lse.resize(Lq);
    log_l.resize(Lq);
    for (auto* buf : {&row_max, &row_sum, &corr}) buf->resize(kBlockQ);
    s.resize(kBlockQ * kBlockK);
    dp.resize(kBlockQ * kBlockK);
    pt.resize(kKeyRows * kBlockQ);
    dst.resize(kKeyRows * kBlockQ);
    ones.assign(std::max(kBlockQ, kKeyRows), 1.f);
    drel.resize(W);
  }
};

template <typename T>
void backward_pair(const Backward<T>& p, BackScratch& w, int64_t b, int64_t h) {
  const Problem<T>& f = p.f;
  const int64_t start = f.cu[b], L = f.cu[b + 1] - f.cu[b];
  if (L == 0) return;
  const int64_t D = f.D, Dp = w.Dp, N = f.N;
  const int64_t Lq = round_up(L, kBlockQ), Lkp = round_up(L, kBlockK), Lk = Lkp + kAccRegs;
  load_rows(f.q, f.qs, start, L, h, D, Dp, Lq, w.q.data(), f.scale);
  load_rows(p.grad, p.gs, start, L, h, D, Dp, Lq, w.dout.data());
  load_rows(f.k, f.ks, start, L, h, D, Dp, Lk, w.k.data());
  load_panels(f.k, f.ks, start, L, h, D, Lkp, w.kt.data());
  load_panels(f.v, f.vs, start, L, h, D, Lkp, w.vt.data());
  for (int64_t i = 0; i < L; ++i) {
    w.lse[i] = p.lse[h * f.total + start + i];
    if constexpr (std::is_same_v<T, float>) {  // Δ = rowsum(dO∘O), O as saved (after dropout)
      const T* o = p.out + (start + i) * p.os.token + h * p.os.head;
      const float* g = w.dout.data() + i * Dp;
      Vec acc(0.f);
      for_each_vec(D, [&](int64_t d, int64_t n) { acc = at::vec::fmadd(load(o + d, n), Vec::loadu(g + d, n), acc); });
      w.delta[i] = sum(acc);
    }
  }
  std::fill(w.dq.begin(), w.dq.begin() + Lq * Dp, 0.f);
  std::fill(w.dk.begin(), w.dk.begin() + Lk * Dp, 0.f);
  std::fill(w.dv.begin(), w.dv.begin() + Lk * Dp, 0.f);
  std::fill(w.drel.begin(), w.drel.end(), 0.0);
  const float* rel_table = f.rel.table ? f.rel.table + h * (2 * f.rel.radius + 1) : nullptr;
  const int32_t* columns = f.rel.positions ? f.rel.positions + start : nullptr;
  const int32_t radius = static_cast<int32_t>(f.rel.radius);
  const float* ones = w.ones.data();

  // One block's scores S (biased, masked: -inf where no key is visible) in w.s and dO Vᵀ in w.dp;
  // calls each(i, s, dp, visible, first) for its rows, `first` the row's dropout counter at k0.
  auto block = [&](int64_t q0, int64_t rows, int64_t k0, int64_t keys, auto each) {
    const int64_t width = round_up(keys, kVecSize), tile_rows = round_up(rows, kAccRegs);
    gemm_rows(w.q.data() + q0 * Dp, Dp, w.kt.data() + k0 * D, kPanelK, kPanelK * D, D, w.s.data(), kBlockK, nullptr,
              tile_rows, width);
    gemm_rows(w.dout.data() + q0 * Dp, Dp, w.vt.data() + k0 * D, kPanelK, kPanelK * D, D, w.dp.data(), kBlockK,
              nullptr, tile_rows, width);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t qi = q0 + i;
      float* s = w.s.data() + i * kBlockK;
      add_biases(s, keys, f.bias, rel_table, radius, columns, b, h, qi, k0);
      const int64_t visible = std::max<int64_t>(f.causal ? std::min(keys, qi - k0 + 1) : keys, 0);
      for (int64_t j = visible; j < width; ++j) s[j] = kNegInf;
      each(i, s, w.dp.data() + i * kBlockK, visible, dropout_row(h, f.total, start + qi) + k0);
    }
  };

  for (int64_t q0 = 0; q0 < L; q0 += kBlockQ) {
    const int64_t rows = std::min(kBlockQ, L - q0), tile_rows = round_up(rows, kAccRegs);
    const int64_t key_end = f.causal ? std::min(L, q0 + rows) : L;
    bool inexact = false;
    for (int64_t i = 0; i < rows; ++i) {
      const float lse = w.lse[q0 + i];
      w.log_l[q0 + i] = 0.f;
      inexact = inexact || (std::isfinite(lse) && std::abs(lse) >= kInexactLse);
    }
    if (inexact) {  // the forward's m and l, recomputed (rows that see no key keep lse = +inf)
      std::fill(w.row_max.begin(), w.row_max.end(), kNegInf);
      std::fill(w.row_sum.begin(), w.row_sum.end(), 0.f);
      for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
        const int64_t keys = std::min(kBlockK, key_end - k0), width = round_up(keys, kVecSize);
        block(q0, rows, k0, keys, [&](int64_t i, float* s, float*, int64_t visible, uint64_t) {
          softmax_row(s, width, visible, w.row_max[i], w.row_sum[i], w.corr[i]);
        });
      }
      for (int64_t i = 0; i < rows; ++i) {
        if (!std::isfinite(w.lse[q0 + i])) continue;
        w.lse[q0 + i] = w.row_max[i];
        w.log_l[q0 + i] = std::log(w.row_sum[i]);
      }
    }
    if constexpr (!std::is_same_v<T, float>) {
      // Δ = rowsum(dO∘O) = Σ_j (P∘M)_ij (dO Vᵀ)_ij: the saved O is rounded to T, which would
      // put about one ulp of T on Δ and through dS on dQ and dK; this sweep recomputes it in fp32.
      for (int64_t i = 0; i < rows; ++i) w.delta[q0 + i] = 0.f;
      for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
        const int64_t keys = std::min(kBlockK, key_end - k0), width = round_up(keys, kVecSize);
        block(q0, rows, k0, keys, [&](int64_t i, float* s, float* dp, int64_t, uint64_t first) {
          const Vec lse(w.lse[q0 + i]), log_l(w.log_l[q0 + i]);
          Vec acc(0.f);
          DropoutFactors keep(f.dropout, first);
          for (int64_t j = 0; j < width; j += kVecSize) {
            Vec prob = ((Vec::loadu(s + j) - lse) - log_l).exp_u20();
            if (f.dropout.on()) prob = prob * keep.at(j);
            acc = at::vec::fmadd(prob, Vec::loadu(dp + j), acc);
          }
          w.delta[q0 + i] += sum(acc);
        });
      }
    }
    for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
      const int64_t keys = std::min(kBlockK, key_end - k0), width = round_up(keys, kVecSize);
      const int64_t key_rows = round_up(keys, kAccRegs);
      float* sb = w.s.data();
      float* dpb = w.dp.data();
      block(q0, rows, k0, keys, [&](int64_t i, float* s, float* dp, int64_t visible, uint64_t first) {
        const int64_t qi = q0 + i;
        const Vec lse(w.lse[qi]), log_l(w.log_l[qi]), delta(w.delta[qi]);
        DropoutFactors keep(f.dropout, first);
        for (int64_t j = 0; j < width; j += kVecSize) {
          // 0 where masked and on rows with lse = inf
          const Vec prob = ((Vec::loadu(s + j) - lse) - log_l).exp_u20();
          Vec dprob = Vec::loadu(dp + j), kept = prob;
          if (f.dropout.on()) {
            const Vec m = keep.at(j);
            kept = prob * m;
            dprob = dprob * m;
          }
          (prob * (dprob - delta)).store(dp + j);
          kept.store(s + j);
        }
        if (rel_table) {
          double* drel = w.drel.data();
          const int32_t qc = columns[qi];
          for (int64_t j = 0; j < visible; ++j) {
            const int32_t distance = std::min(std::max(columns[k0 + j] - qc, -radius), radius);
            drel[distance + radius] += dp[j];
          }
        }
      });
      // (P∘M)ᵀ and dSᵀ, [key_rows, kBlockQ], zero rows past the block's keys
      float* pt = w.pt.data();
      float* dst = w.dst.data();
      for (int64_t j = 0; j < keys; ++j) {
        for (int64_t i = 0; i < rows; ++i) {
          pt[j * kBlockQ + i] = sb[i * kBlockK + j];
          dst[j * kBlockQ + i] = dpb[i * kBlockK + j];
        }
      }
      for (int64_t j = keys; j < key_rows; ++j) {
        std::fill(pt + j * kBlockQ, pt + j * kBlockQ + rows, 0.f);
        std::fill(dst + j * kBlockQ, dst + j * kBlockQ + rows, 0.f);
      }
      // dV_j += (P∘M)ᵀ dO_i;  dK_j += dSᵀ (q_i * scale);  dQ_i += dS K_j
      gemm_rows(pt, kBlockQ, w.dout.data() + q0 * Dp, Dp, kStrip, rows, w.dv.data() + k0 * Dp, Dp, ones, key_rows, Dp);
      gemm_rows(dst, kBlockQ, w.q.data() + q0 * Dp, Dp, kStrip, rows, w.dk.data() + k0 * Dp, Dp, ones, key_rows, Dp);
      gemm_rows(dpb, kBlockK, w.k.data() + k0 * Dp, Dp, kStrip, keys, w.dq.data() + q0 * Dp, Dp, ones, tile_rows, Dp);
    }
  }
  const Vec scale(f.scale);
  for (int64_t i = 0; i < L; ++i) {
    T* dst = p.dqkv + (start + i) * 3 * N * D + h * D;
    const float *dq = w.dq.data() + i * Dp, *dk = w.dk.data() + i * Dp, *dv = w.dv.data() + i * Dp;
    for_each_vec(D, [&](int64_t d, int64_t n) {
      store(Vec::loadu(dq + d, n) * scale, dst + d, n);
      store(Vec::loadu(dk + d, n), dst + N * D + d, n);
      store(Vec::loadu(dv + d, n), dst + 2 * N * D + d, n);
    });
  }
  if (p.drel) std::copy(w.drel.begin(), w.drel.end(), p.drel + (b * N + h) * p.W);
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                     int64_t max_seqlen, double scale, bool causal, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& positions) {
  const Args a = prepare(q, k, v, cu_seqlens, max_seqlen, bias, rel_bias, positions);
  return std::get<0>(forward(a, scale, causal, Dropout(), false));
}

std::tuple<at::Tensor, at::Tensor> attention_train(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double scale, bool causal, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_bias,
    const std::optional<at::Tensor>& positions, double dropout_p, const std::optional<at::Tensor>& seed) {
  const Dropout dropout = dropout_arg(dropout_p, seed);
  const Args a = prepare(q, k, v, cu_seqlens, max_seqlen, bias, rel_bias, positions);
  return forward(a, scale, causal, dropout, true);
}

std::tuple<at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double scale, bool causal, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_bias,
    const std::optional<at::Tensor>& positions, double dropout_p, const std::optional<at::Tensor>& seed) {
  const Dropout dropout = dropout_arg(dropout_p, seed);
  const Args a = prepare(q, k, v, cu_seqlens, max_seqlen, bias, rel_bias, positions);
  const int64_t total = a.total, N = a.N, D = a.D, B = a.B;
  TORCH_CHECK(grad_in.sizes() == q.sizes() && out_in.sizes() == q.sizes(),
              "fastbert: attention_backward needs grad and out shaped like q, ", q.sizes(), ", got ",
              grad_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == q.scalar_type() && out_in.scalar_type() == q.scalar_type(),
              "fastbert: attention_backward needs grad and out in q's dtype, ", q.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 2 && lse_in.size(0) == N &&
                  lse_in.size(1) == total,
              "fastbert: lse must be float32 [heads, tokens] = [", N, ", ", total, "], got ", lse_in.scalar_type(),
              " ", lse_in.sizes());
  auto grad = unit_last_stride(grad_in), out = unit_last_stride(out_in), lse = lse_in.contiguous();
  auto dqkv = at::empty({total, 3, N, D}, q.options());
  const int64_t W = a.rel_bias.defined() ? a.rel_bias.size(1) : 0;
  auto d_rel = a.rel_bias.defined() ? at::zeros({N, W}, q.options().dtype(at::kFloat))
                                    : at::empty({0}, q.options().dtype(at::kFloat));
  if (total == 0 || N == 0 || D == 0) return {dqkv.zero_(), d_rel};
  dqkv.narrow(0, a.cu[B], total - a.cu[B]).zero_();  // dummy rows
  at::Tensor parts;
  if (W) parts = at::zeros({B, N, W}, q.options().dtype(at::kDouble));
  dispatch_float(q.scalar_type(), "attention_backward", [&](auto tag) {
    using T = decltype(tag);
    Backward<T> p{{a.q.const_data_ptr<T>(), a.k.const_data_ptr<T>(), a.v.const_data_ptr<T>(), strides_of(a.q),
                   strides_of(a.k), strides_of(a.v), nullptr, a.cu, N, D, static_cast<float>(scale), causal,
                   a.bias_view, a.rel_view},
                  grad.const_data_ptr<T>(), strides_of(grad), out.const_data_ptr<T>(), strides_of(out),
                  lse.const_data_ptr<float>(), dqkv.mutable_data_ptr<T>()};
    p.f.dropout = dropout;
    p.f.total = total;
    if (W) {
      p.drel = parts.mutable_data_ptr<double>();
      p.W = W;
    }
    // The unit of work is a whole (sequence, head), shared out by cost as the forward's blocks.
    const WorkList work(a.cu, B, N, D, causal, std::max<int64_t>(a.longest, 1));
    const int64_t nparts = std::min<int64_t>(at::get_num_threads(), work.blocks.size());
    const int64_t longest = a.longest;
    at::parallel_for(0, nparts, 1, [&](int64_t begin, int64_t end) {
      BackScratch scratch(D, longest, W);
      for (int64_t i = work.first(begin, nparts); i < work.first(end, nparts); ++i) {
        backward_pair(p, scratch, work.blocks[i].b, work.blocks[i].h);
      }
    });
  });
  if (W) {  // the sequences' d_rel_bias summed in sequence order
    const double* pp = parts.const_data_ptr<double>();
    float* dr = d_rel.mutable_data_ptr<float>();
    for (int64_t h = 0; h < N; ++h) {
      for (int64_t j = 0; j < W; ++j) {
        double acc = 0.0;
        for (int64_t b = 0; b < B; ++b) acc += pp[(b * N + h) * W + j];
        dr[h * W + j] = static_cast<float>(acc);
      }
    }
  }
  return {dqkv, d_rel};
}

}  // namespace fastbert::cpu
