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
#include <vector>

#include "ops.h"
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
};

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
  const float* bias = p.bias.data;
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
      if (rel_table) add_rel_bias(s, keys, rel_table, static_cast<int32_t>(p.rel.radius), columns + k0, columns[q0 + i]);
      if (bias) {
        const float* br = bias + b * p.bias.b + h * p.bias.n + (q0 + i) * p.bias.q + k0 * p.bias.k;
        for (int64_t j = 0; j < keys; ++j) s[j] += br[j * p.bias.k];
      }
      // Keys past the block end and, if causal, after this query are masked out.
      const int64_t visible = p.causal ? std::min(keys, q0 + i - k0 + 1) : keys;
      softmax_row(s, width, visible, w.m[i], w.l[i], w.corr[i]);
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
  }
}

// Copies the keys (transposed, as panels, zero past the sequence's end) and values of one
// (sequence, head) to the fp32 scratch, where every block of its queries reads them.
template <typename T>
void load_keys_values(const Problem<T>& p, Scratch& w, int64_t b, int64_t h) {
  const int64_t start = p.cu[b], len = p.cu[b + 1] - p.cu[b];
  const int64_t D = p.D, Dp = w.Dp, padded = round_up(len, kBlockK);
  float* kt = w.kt.data();
  float* v = w.v.data();
  std::fill(kt + (len / kPanelK) * kPanelK * D, kt + padded * D, 0.f);
  std::fill(v + len * Dp, v + padded * Dp, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const T* ks = p.k + (start + j) * p.ks.token + h * p.ks.head;
    float* panel = kt + (j / kPanelK) * kPanelK * D + j % kPanelK;
    for (int64_t d = 0; d < D; ++d) panel[d * kPanelK] = static_cast<float>(ks[d]);
    const T* vs = p.v + (start + j) * p.vs.token + h * p.vs.head;
    float* vr = v + j * Dp;
    for_each_vec(D, [&](int64_t d, int64_t n) { load(vs + d, n).store(vr + d, n); });
    std::fill(vr + D, vr + Dp, 0.f);
  }
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

  WorkList(const int64_t* cu, int64_t B, int64_t N, int64_t D, bool causal) {
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = cu[b + 1] - cu[b];
      for (int64_t h = 0; h < N; ++h) {
        for (int64_t q0 = 0; q0 < len; q0 += kBlockQ) {
          const int64_t rows = std::min(kBlockQ, len - q0);
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

}  // namespace

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, bool causal,
                     const std::optional<at::Tensor>& bias_in,
                     const std::optional<at::Tensor>& rel_bias_in,
                     const std::optional<at::Tensor>& positions_in) {
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
  TORCH_CHECK(cu[0] == 0 && cu[B] <= total, "fastbert: cu_seqlens must run from 0 to at most the ",
              total, " tokens, got ", cu[0], " to ", cu[B]);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "fastbert: cu_seqlens must be non-decreasing");
    longest = std::max(longest, cu[b + 1] - cu[b]);
  }
  TORCH_CHECK(longest <= std::max<int64_t>(max_seqlen, 0), "fastbert: a sequence has ", longest,
              " tokens but max_seqlen is ", max_seqlen);
  RelBiasView rel_view;
  at::Tensor rel_bias, positions;
  if (rel_bias_in) {
    check_rel_bias_args(q, *rel_bias_in, positions_in);
    rel_bias = rel_bias_in->contiguous();
    positions = positions_in->contiguous();
    rel_view = {rel_bias.const_data_ptr<float>(), positions.const_data_ptr<int32_t>(), (rel_bias.size(1) - 1) / 2};
  }
  auto out = at::empty({total, N, D}, q.options());
  if (total == 0 || N == 0 || D == 0) return out;
  // Rows past cu[B] are the dummy rows of a static packing: no sequence reads or owns them.
  // Zeros keep uninitialised memory (NaN, denormals) out of the GEMMs that follow.
  out.narrow(0, cu[B], total - cu[B]).zero_();

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
                       cu, N, D, static_cast<float>(scale), causal, bias_view, rel_view};
    const WorkList work(cu, B, N, D, causal);
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), work.blocks.size());
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
  return out;
}

}  // namespace fastbert::cpu
