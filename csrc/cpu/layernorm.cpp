// add+LayerNorm and embeddings+LayerNorm on CPU.
//
// One pass per row over the inputs: the pre-norm row h goes to an fp32 scratch row that stays
// in L1 while its mean and variance are summed up, then the output is written once from it.
// Rows are split across threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <utility>
#include <vector>

#include "../checks.h"
#include "ops.h"
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

// out = (h - mean) * rstd * gamma + beta for one row in fp32.
template <typename T>
inline void normalize_row(const float* h, std::pair<float, float> stats, const T* gamma,
                          const T* beta, T* out, int64_t H, float eps) {
  const Vec mean(stats.first), rstd(1.f / std::sqrt(stats.second + eps));
  for_each_vec(H, [&](int64_t j, int64_t n) {
    Vec y = (Vec::loadu(h + j, n) - mean) * rstd;
    store(at::vec::fmadd(y, load(gamma + j, n), load(beta + j, n)), out + j, n);
  });
}

int64_t row_grain(int64_t H) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / (4 * H)); }

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

}  // namespace fastbert::cpu
