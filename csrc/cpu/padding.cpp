// pad / unpad on CPU: row gathers and scatters by flat token index, any dtype (rows are bytes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../checks.h"
#include "ops.h"

namespace fastbert::cpu {
namespace {

int64_t grain_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE * 4 / std::max<int64_t>(row_bytes, 1));
}

}  // namespace

at::Tensor unpad(const at::Tensor& x, const at::Tensor& indices) {
  TORCH_CHECK(x.dim() >= 2, "fastbert: unpad needs x of shape [batch, seq, ...], got ", x.sizes());
  auto idx = long_indices(indices);
  auto xc = x.contiguous();
  std::vector<int64_t> shape{idx.numel()};
  shape.insert(shape.end(), x.sizes().begin() + 2, x.sizes().end());
  auto out = at::empty(shape, x.options());
  const int64_t rows = x.size(0) * x.size(1), T = idx.numel();
  const int64_t row_bytes = rows ? xc.nbytes() / rows : 0;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ip[t] >= 0 && ip[t] < rows, "fastbert: index ", ip[t], " is outside [0, ", rows, ")");
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, T, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) std::memcpy(dst + t * row_bytes, src + ip[t] * row_bytes, row_bytes);
  });
  return out;
}

at::Tensor pad(const at::Tensor& x, const at::Tensor& indices, int64_t batch, int64_t seqlen) {
  TORCH_CHECK(x.dim() >= 1, "fastbert: pad needs x of shape [tokens, ...], got ", x.sizes());
  auto idx = long_indices(indices);
  TORCH_CHECK(idx.numel() == x.size(0), "fastbert: pad has ", x.size(0), " tokens but ",
              idx.numel(), " indices");
  TORCH_CHECK(batch >= 0 && seqlen >= 0, "fastbert: pad needs batch, seqlen >= 0");
  auto xc = x.contiguous();
  std::vector<int64_t> shape{batch, seqlen};
  shape.insert(shape.end(), x.sizes().begin() + 1, x.sizes().end());
  auto out = at::empty(shape, x.options());
  const int64_t rows = batch * seqlen, T = idx.numel();
  const int64_t row_bytes = T ? xc.nbytes() / T : (rows ? out.nbytes() / rows : 0);
  // Source token of every output row (-1: padding), so each output row is written once.
  std::vector<int64_t> source(rows, -1);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(ip[t] >= 0 && ip[t] < rows, "fastbert: index ", ip[t], " is outside [0, ", rows, ")");
    source[ip[t]] = t;
  }
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, rows, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (source[r] >= 0) {
        std::memcpy(dst + r * row_bytes, src + source[r] * row_bytes, row_bytes);
      } else {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      }
    }
  });
  return out;
}

}  // namespace fastbert::cpu
