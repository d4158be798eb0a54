// add+LayerNorm and embeddings+LayerNorm on CPU.
//
// One pass per row over the inputs: the pre-norm row h goes to an fp32 scratch row that stays
// in L1 while its mean and variance are summed up, then the output is written once from it.
// Rows are split across threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "ops.h"
#include "philox.h"
#include "vec.h"

namespace fastbert::cpu {
namespace {

// Writes the pre-norm row (pre(j, n): its vector at column j, n valid lanes, zero beyond) to
// h and returns its mean and variance, from one pass of shifted sums: with the shift c the mean
// of h's first vector, sum(h - c) and sum((h - c)^2) give the variance without the cancellation
// of E[h^2] - E[h]^2 when |mean| >> std, as c is within a few standard deviations of the mean.
template <typename Pre>
inline std::pair<float, float> fill_row(float* h, int64_t H, Pre pre) {
  const int64_t n0 = std::min(H, kVecSize);
  const float c = sum(pre(0, n0)) / n0;
  Vec s1(0.f), s2(0.f);
  for_each_vec(H, [&](int64_t j, int64_t n) {
    const Vec s = pre(j, n);
    s.store(h + j, n);
    const Vec d = head(s - Vec(c), n);
    s1 = s1 + d;
    s2 = at::vec::fmadd(d, d, s2);
  });
  const float d = sum(s1) / H;
  return {c + d, std::max(sum(s2) / H - d * d, 0.f)};
}

inline float rstd_of(std::pair<float, float> stats, float eps) { return 1.f / std::sqrt(stats.second + eps); }

// out = (h - mean) * rstd * gamma + beta for one row in fp32; with dropout (counters
// first, first + 1, ... over the row, first a multiple of 4) on the result.
template <typename T>
inline void normalize_row(const float* h, std::pair<float, float> stats, const T* gamma,
                          const T* beta, T* out, int64_t H, float eps, const Dropout& dropout = {},
                          uint64_t first = 0) {
  const Vec mean(stats.first), rstd(rstd_of(stats, eps));
  DropoutFactors keep(dropout, first);
  for_each_vec(H, [&](int64_t j, int64_t n) {
    Vec y = (Vec::loadu(h + j, n) - mean) * rstd;
    y = at::vec::fmadd(y, load(gamma + j, n), load(beta + j, n));
    if (dropout.on()) y = y * keep.at(j);
    store(y, out + j, n);
  });
}

// Rows per chunk of the backward's column sums (dweight, dln_bias, dbias): fixed, so each sum
// (a chunk's rows in order, then the chunks in order) does not depend on the thread count.
constexpr int64_t kSumRows = 32;

// One row of LayerNorm's backward, from xhat = (h - mean) * rstd and gy, the gradient at
// y = xhat * gamma + beta: dh = rstd * (gy gamma - mean(gy gamma) - xhat mean(gy gamma xhat)),
// and dgamma += gy xhat, dbeta += gy (this chunk's column sums).
template <typename T>
inline void layernorm_grad_row(const float* xhat, const float* gy, const T* gamma, float rstd, int64_t H, float* dh,
                               float* dgamma, float* dbeta) {
  Vec a(0.f), c(0.f);
  for_each_vec(H, [&](int64_t j, int64_t n) {
    const Vec g = Vec::loadu(gy + j, n) * load(gamma + j, n);
    a = a + g;
    c = at::vec::fmadd(g, Vec::loadu(xhat + j, n), c);
  });
  const Vec mean_a(sum(a) / H), mean_c(sum(c) / H), vr(rstd);
  for_each_vec(H, [&](int64_t j, int64_t n) {
    const Vec g = Vec::loadu(gy + j, n), x = Vec::loadu(xhat + j, n);
    const Vec gg = g * load(gamma + j, n);
    (vr * (gg - mean_a - x * mean_c)).store(dh + j, n);
    at::vec::fmadd(g, x, Vec::loadu(dgamma + j, n)).store(dgamma + j, n);
    (Vec::loadu(dbeta + j, n) + g).store(dbeta + j, n);
  });
}

// Sums the chunks' column partials [chunks, parts, H] in chunk order into out[part] ([H] each, dtype T).
template <typename T>
void sum_chunks(const std::vector<float>& partial, int64_t chunks, int64_t parts, int64_t H,
                const std::vector<T*>& out) {
  at::parallel_for(0, parts * H, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t part = i / H, j = i % H;
      if (!out[part]) continue;
      float acc = 0.f;
      for (int64_t c = 0; c < chunks; ++c) acc += partial[(c * parts + part) * H + j];
      out[part][j] = static_cast<T>(acc);
    }
  });
}

int64_t row_grain(int64_t H) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / (4 * H)); }

at::Tensor stats_tensor(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
}

}  // namespace

at::Tensor add_layernorm(const at::Tensor& x, const at::Tensor& residual,
                         const std::optional<at::Tensor>& bias, const at::Tensor& weight,
                         const at::Tensor& ln_bias, double eps) {
  const int64_t H = check_add_layernorm_args(x, residual, bias, weight, ln_bias);
  auto xc = x.contiguous(), rc = residual.contiguous();
  auto wc = weight.contiguous(), bc = ln_bias.contiguous();
  auto pre = bias ? bias->contiguous() : at::Tensor();
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = H ? x.numel() / H : 0;
  if (rows == 0) return out;
  dispatch_float(x.scalar_type(), "add_layernorm", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const scalar_t* pp = pre.defined() ? pre.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = wc.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(H), [&](int64_t begin, int64_t end) {
      std::vector<float> h(H);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* xr = xp + row * H;
        const scalar_t* rr = rp + row * H;
        const auto stats = fill_row(h.data(), H, [&](int64_t j, int64_t n) {
          Vec s = load(xr + j, n) + load(rr + j, n);
          return pp ? s + load(pp + j, n) : s;
        });
        normalize_row(h.data(), stats, gp, bp, op + row * H, H, static_cast<float>(eps));
      }
    });
  });
  return out;
}

at::Tensor embed_layernorm(const at::Tensor& input_ids, const at::Tensor& position_ids,
                           const at::Tensor& token_type_ids, const at::Tensor& word_embeddings,
                           const at::Tensor& position_embeddings,
                           const at::Tensor& token_type_embeddings, const at::Tensor& weight,
                           const at::Tensor& ln_bias, double eps) {
  const auto& words = word_embeddings;
  check_embed_args(input_ids, position_ids, token_type_ids, words, position_embeddings,
                   token_type_embeddings, weight, ln_bias);
  const int64_t H = words.size(1), T = input_ids.numel();
  auto ids = input_ids.to(at::kLong).contiguous();
  auto pos = position_ids.to(at::kLong).contiguous();
  auto tts = token_type_ids.to(at::kLong).contiguous();
  auto wc = words.contiguous(), pc = position_embeddings.contiguous();
  auto tc = token_type_embeddings.contiguous();
  auto gc = weight.contiguous(), bc = ln_bias.contiguous();
  auto out = at::empty({T, H}, words.options());
  if (T == 0 || H == 0) return out;
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const int64_t* tp = tts.const_data_ptr<int64_t>();
  const int64_t nw = wc.size(0), np = pc.size(0), nt = tc.size(0);
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < nw, "fastbert: input id ", ip[i], " is outside [0, ", nw, ")");
    TORCH_CHECK(pp[i] >= 0 && pp[i] < np, "fastbert: position id ", pp[i], " is outside [0, ", np, ")");
    TORCH_CHECK(tp[i] >= 0 && tp[i] < nt, "fastbert: token type id ", tp[i], " is outside [0, ", nt, ")");
  }
  dispatch_float(words.scalar_type(), "embed_layernorm", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    const scalar_t* pe = pc.const_data_ptr<scalar_t>();
    const scalar_t* te = tc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H), [&](int64_t begin, int64_t end) {
      std::vector<float> h(H);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* wr = wp + ip[t] * H;
        const scalar_t* pr = pe + pp[t] * H;
        const scalar_t* tr = te + tp[t] * H;
        const auto stats = fill_row(h.data(), H, [&](int64_t j, int64_t n) {
          return load(wr + j, n) + load(tr + j, n) + load(pr + j, n);
        });
        normalize_row(h.data(), stats, gp, bp, op + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------------------- training

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_train(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& bias, const at::Tensor& weight,
    const at::Tensor& ln_bias, double eps, double dropout_p, const std::optional<at::Tensor>& seed) {
  const Dropout dropout = dropout_arg(dropout_p, seed);
  const int64_t H = check_add_layernorm_args(x, residual, bias, weight, ln_bias);
  auto xc = x.contiguous(), rc = residual.contiguous();
  auto wc = weight.contiguous(), bc = ln_bias.contiguous();
  auto pre = bias ? bias->contiguous() : at::Tensor();
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto mean = stats_tensor(x), rstd = stats_tensor(x);
  const int64_t rows = H ? x.numel() / H : 0;
  if (rows == 0) return {out, mean, rstd};
  float *mp = mean.mutable_data_ptr<float>(), *sp = rstd.mutable_data_ptr<float>();
  dispatch_float(x.scalar_type(), "add_layernorm_train", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const scalar_t* pp = pre.defined() ? pre.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = wc.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(H), [&](int64_t begin, int64_t end) {
      std::vector<float> h(H);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* xr = xp + row * H;
        const scalar_t* rr = rp + row * H;
        DropoutFactors keep(dropout, row_dropout_first(row, H));
        const auto stats = fill_row(h.data(), H, [&](int64_t j, int64_t n) {
          Vec s = load(xr + j, n);
          if (pp) s = s + load(pp + j, n);
          if (dropout.on()) s = s * keep.at(j);
          return s + load(rr + j, n);
        });
        normalize_row(h.data(), stats, gp, bp, op + row * H, H, static_cast<float>(eps));
        mp[row] = stats.first;
        sp[row] = rstd_of(stats, static_cast<float>(eps));
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& bias,
    const at::Tensor& weight, const at::Tensor& ln_bias, const at::Tensor& mean, const at::Tensor& rstd, double eps,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  const Dropout dropout = dropout_arg(dropout_p, seed);
  const int64_t H = check_add_layernorm_args(x, residual, bias, weight, ln_bias);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "fastbert: add_layernorm_backward needs grad shaped like x, got ", grad.sizes(), " ", grad.scalar_type());
  const int64_t rows = H ? x.numel() / H : 0;
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == rows &&
                  rstd.numel() == rows,
              "fastbert: mean and rstd must be float32 with one value per row (", rows, ")");
  auto xc = x.contiguous(), rc = residual.contiguous(), gc = grad.contiguous();
  auto wc = weight.contiguous();
  auto pre = bias ? bias->contiguous() : at::Tensor();
  auto mc = mean.contiguous(), sc = rstd.contiguous();
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  auto dx = at::empty(x.sizes(), opts), dres = at::empty(x.sizes(), opts);
  auto dbias = bias ? at::empty({H}, weight.options()) : at::empty({0}, x.options());
  auto dweight = at::empty({H}, weight.options()), dln_bias = at::empty({H}, weight.options());
  if (rows == 0) {
    for (auto* t : {&dbias, &dweight, &dln_bias}) t->zero_();
    return {dx, dres, dbias, dweight, dln_bias};
  }
  const int64_t chunks = (rows + kSumRows - 1) / kSumRows;
  std::vector<float> partial(chunks * 3 * H);  // per chunk: dweight, dln_bias, dbias
  const float *mp = mc.const_data_ptr<float>(), *sp = sc.const_data_ptr<float>();
  dispatch_float(x.scalar_type(), "add_layernorm_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* pp = pre.defined() ? pre.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t *dxp = dx.mutable_data_ptr<scalar_t>(), *drp = dres.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xhat(H), gy(H), dh(H), keep(dropout.on() ? H : 0);
      for (int64_t c = begin; c < end; ++c) {
        float* acc = partial.data() + c * 3 * H;
        std::fill(acc, acc + 3 * H, 0.f);
        for (int64_t row = c * kSumRows; row < std::min(rows, (c + 1) * kSumRows); ++row) {
          const scalar_t *xr = xp + row * H, *rr = rp + row * H, *gr = gp + row * H;
          DropoutFactors factors(dropout, row_dropout_first(row, H));
          const Vec m(mp[row]), r(sp[row]);
          for_each_vec(H, [&](int64_t j, int64_t n) {
            Vec s = load(xr + j, n);
            if (pp) s = s + load(pp + j, n);
            if (dropout.on()) {
              const Vec k = factors.at(j);
              k.store(keep.data() + j, n);
              s = s * k;
            }
            ((s + load(rr + j, n) - m) * r).store(xhat.data() + j, n);
            load(gr + j, n).store(gy.data() + j, n);
          });
          layernorm_grad_row(xhat.data(), gy.data(), wp, sp[row], H, dh.data(), acc, acc + H);
          float* dbias_acc = acc + 2 * H;
          for_each_vec(H, [&](int64_t j, int64_t n) {
            const Vec d = Vec::loadu(dh.data() + j, n);
            store(d, drp + row * H + j, n);
            const Vec dxv = dropout.on() ? d * Vec::loadu(keep.data() + j, n) : d;
            store(dxv, dxp + row * H + j, n);
            if (pp) (Vec::loadu(dbias_acc + j, n) + dxv).store(dbias_acc + j, n);
          });
        }
      }
    });
    sum_chunks<scalar_t>(partial, chunks, 3, H,
                         {dweight.mutable_data_ptr<scalar_t>(), dln_bias.mutable_data_ptr<scalar_t>(),
                          pp ? dbias.mutable_data_ptr<scalar_t>() : nullptr});
  });
  return {dx, dres, dbias, dweight, dln_bias};
}

namespace {

// The embedding tables' ids as checked int64 vectors (as embed_layernorm checks them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> checked_ids(const at::Tensor& input_ids, const at::Tensor& position_ids,
                                                           const at::Tensor& token_type_ids, int64_t nw, int64_t np,
                                                           int64_t nt) {
  auto ids = input_ids.to(at::kLong).contiguous();
  auto pos = position_ids.to(at::kLong).contiguous();
  auto tts = token_type_ids.to(at::kLong).contiguous();
  const int64_t *ip = ids.const_data_ptr<int64_t>(), *pp = pos.const_data_ptr<int64_t>(),
                *tp = tts.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < nw, "fastbert: input id ", ip[i], " is outside [0, ", nw, ")");
    TORCH_CHECK(pp[i] >= 0 && pp[i] < np, "fastbert: position id ", pp[i], " is outside [0, ", np, ")");
    TORCH_CHECK(tp[i] >= 0 && tp[i] < nt, "fastbert: token type id ", tp[i], " is outside [0, ", nt, ")");
  }
  return {ids, pos, tts};
}

// fastbert.reference.table_grad: the rows of dh [T, E] (fp32) summed per id, the padding_idx
// row zero, in the table's dtype. Each id's row sums its tokens in token order, the columns
// split between threads: deterministic and independent of the thread count. (index_put_ with
// accumulate, which the reference uses, did not give the same bits twice on CPU with torch 2.13.)
at::Tensor table_grad(const at::Tensor& ids, const at::Tensor& dh, const at::Tensor& table, int64_t padding_idx) {
  const int64_t rows = table.size(0), T = dh.size(0), E = dh.size(1);
  auto out = at::zeros({rows, E}, dh.options());
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  const float* src = dh.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const int64_t strips = (E + 4 * kVecSize - 1) / (4 * kVecSize);
  at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * 4 * kVecSize, c1 = std::min(E, end * 4 * kVecSize);
    for (int64_t t = 0; t < T; ++t) {
      const float* s = src + t * E;
      float* d = dst + ip[t] * E;
      for_each_vec(c1 - c0, [&](int64_t j, int64_t n) {
        (Vec::loadu(d + c0 + j, n) + Vec::loadu(s + c0 + j, n)).store(d + c0 + j, n);
      });
    }
  });
  if (padding_idx >= 0 && padding_idx < rows) out[padding_idx].zero_();
  return out.to(table.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_layernorm_train(
    const at::Tensor& input_ids, const at::Tensor& position_ids, const at::Tensor& token_type_ids,
    const at::Tensor& word_embeddings, const at::Tensor& position_embeddings,
    const at::Tensor& token_type_embeddings, const at::Tensor& weight, const at::Tensor& ln_bias, double eps,
    double dropout_p, const std::optional<at::Tensor>& seed, int64_t word_padding_idx, int64_t position_padding_idx) {
  const Dropout dropout = dropout_arg(dropout_p, seed);
  const auto& words = word_embeddings;
  check_embed_args(input_ids, position_ids, token_type_ids, words, position_embeddings, token_type_embeddings, weight,
                   ln_bias);
  const int64_t H = words.size(1), T = input_ids.numel();
  auto wc = words.contiguous(), pc = position_embeddings.contiguous(), tc = token_type_embeddings.contiguous();
  auto [ids, pos, tts] = checked_ids(input_ids, position_ids, token_type_ids, wc.size(0), pc.size(0), tc.size(0));
  auto gc = weight.contiguous(), bc = ln_bias.contiguous();
  auto out = at::empty({T, H}, words.options());
  auto mean = at::empty({T}, words.options().dtype(at::kFloat)), rstd = at::empty({T}, words.options().dtype(at::kFloat));
  if (T == 0 || H == 0) return {out, mean, rstd};
  const int64_t *ip = ids.const_data_ptr<int64_t>(), *pp = pos.const_data_ptr<int64_t>(),
                *tp = tts.const_data_ptr<int64_t>();
  float *mp = mean.mutable_data_ptr<float>(), *sp = rstd.mutable_data_ptr<float>();
  dispatch_float(words.scalar_type(), "embed_layernorm_train", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t *wp = wc.const_data_ptr<scalar_t>(), *pe = pc.const_data_ptr<scalar_t>(),
                   *te = tc.const_data_ptr<scalar_t>(), *gp = gc.const_data_ptr<scalar_t>(),
                   *bp = bc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H), [&](int64_t begin, int64_t end) {
      std::vector<float> h(H);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t *wr = wp + ip[t] * H, *pr = pe + pp[t] * H, *tr = te + tp[t] * H;
        const auto stats = fill_row(h.data(), H, [&](int64_t j, int64_t n) {
          return load(wr + j, n) + load(tr + j, n) + load(pr + j, n);
        });
        normalize_row(h.data(), stats, gp, bp, op + t * H, H, static_cast<float>(eps), dropout,
                      row_dropout_first(t, H));
        mp[t] = stats.first;
        sp[t] = rstd_of(stats, static_cast<float>(eps));
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embed_layernorm_backward(
    const at::Tensor& grad, const at::Tensor& input_ids, const at::Tensor& position_ids,
    const at::Tensor& token_type_ids, const at::Tensor& word_embeddings, const at::Tensor& position_embeddings,
    const at::Tensor& token_type_embeddings, const at::Tensor& weight, const at::Tensor& ln_bias,
    const at::Tensor& mean, const at::Tensor& rstd, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed, int64_t word_padding_idx, int64_t position_padding_idx) {
  const Dropout dropout = dropout_arg(dropout_p, seed);
  const auto& words = word_embeddings;
  check_embed_args(input_ids, position_ids, token_type_ids, words, position_embeddings, token_type_embeddings, weight,
                   ln_bias);
  const int64_t H = words.size(1), T = input_ids.numel();
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == T && grad.size(1) == H && grad.scalar_type() == words.scalar_type(),
              "fastbert: embed_layernorm_backward needs grad [", T, ", ", H, "] ", words.scalar_type(), ", got ",
              grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == T &&
                  rstd.numel() == T,
              "fastbert: mean and rstd must be float32 [", T, "]");
  auto wc = words.contiguous(), pc = position_embeddings.contiguous(), tc = token_type_embeddings.contiguous();
  auto [ids, pos, tts] = checked_ids(input_ids, position_ids, token_type_ids, wc.size(0), pc.size(0), tc.size(0));
  auto gc = grad.contiguous(), wtc = weight.contiguous(), mc = mean.contiguous(), sc = rstd.contiguous();
  auto dh = at::empty({T, H}, words.options().dtype(at::kFloat));
  auto dweight = at::empty({H}, weight.options()), dln_bias = at::empty({H}, weight.options());
  if (T > 0 && H > 0) {
    const int64_t chunks = (T + kSumRows - 1) / kSumRows;
    std::vector<float> partial(chunks * 2 * H);
    const int64_t *ip = ids.const_data_ptr<int64_t>(), *pp = pos.const_data_ptr<int64_t>(),
                  *tp = tts.const_data_ptr<int64_t>();
    const float *mp = mc.const_data_ptr<float>(), *sp = sc.const_data_ptr<float>();
    float* dhp = dh.mutable_data_ptr<float>();
    dispatch_float(words.scalar_type(), "embed_layernorm_backward", [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t *wp = wc.const_data_ptr<scalar_t>(), *pe = pc.const_data_ptr<scalar_t>(),
                     *te = tc.const_data_ptr<scalar_t>(), *gp = gc.const_data_ptr<scalar_t>(),
                     *gamma = wtc.const_data_ptr<scalar_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> xhat(H), gy(H);
        for (int64_t c = begin; c < end; ++c) {
          float* acc = partial.data() + c * 2 * H;
          std::fill(acc, acc + 2 * H, 0.f);
          for (int64_t t = c * kSumRows; t < std::min(T, (c + 1) * kSumRows); ++t) {
            const scalar_t *wr = wp + ip[t] * H, *pr = pe + pp[t] * H, *tr = te + tp[t] * H, *gr = gp + t * H;
            DropoutFactors keep(dropout, row_dropout_first(t, H));
            const Vec m(mp[t]), r(sp[t]);
            for_each_vec(H, [&](int64_t j, int64_t n) {
              const Vec h = load(wr + j, n) + load(tr + j, n) + load(pr + j, n);
              ((h - m) * r).store(xhat.data() + j, n);
              Vec g = load(gr + j, n);
              if (dropout.on()) g = g * keep.at(j);
              g.store(gy.data() + j, n);
            });
            layernorm_grad_row(xhat.data(), gy.data(), gamma, sp[t], H, dhp + t * H, acc, acc + H);
          }
        }
      });
      sum_chunks<scalar_t>(partial, chunks, 2, H,
                           {dweight.mutable_data_ptr<scalar_t>(), dln_bias.mutable_data_ptr<scalar_t>()});
    });
  } else {
    dweight.zero_();
    dln_bias.zero_();
  }
  return {table_grad(ids, dh, wc, word_padding_idx), table_grad(pos, dh, pc, position_padding_idx),
          table_grad(tts, dh, tc, -1), dweight, dln_bias};
}

}  // namespace fastbert::cpu
