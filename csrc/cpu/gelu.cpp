// bias + GELU applied in place to a GEMM's output, and linear+bias+GELU built on it.
//
// The GEMM stays with ATen (MKL / oneDNN). The epilogue reads and writes each element of the
// [T, F] product once, in fp32 vectors: GELU(y + b) with erf (exact) or tanh (HF gelu_new).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "gelu.h"
#include "ops.h"
#include "vec.h"

namespace fastbert::cpu {
namespace {

template <typename T, Gelu kind>
void bias_gelu_rows(T* y, const T* bias, int64_t rows, int64_t F) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (4 * F));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = y + r * F;
      for_each_vec(F, [&](int64_t j, int64_t n) {
        store(gelu<kind>(load(row + j, n) + load(bias + j, n)), row + j, n);
      });
    }
  });
}

}  // namespace

void bias_gelu_(const at::Tensor& y, const at::Tensor& bias, std::string_view approximate) {
  const Gelu kind = parse_gelu(approximate);
  TORCH_CHECK(y.dim() >= 1 && y.is_contiguous(), "fastbert: bias_gelu_ needs a contiguous tensor, got sizes ",
              y.sizes(), " strides ", y.strides());
  const int64_t F = y.size(-1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == F && bias.scalar_type() == y.scalar_type(),
              "fastbert: bias must be [", F, "] ", y.scalar_type(), ", got ", bias.sizes(), " ",
              bias.scalar_type());
  const int64_t rows = F ? y.numel() / F : 0;
  auto bc = bias.contiguous();
  dispatch_float(y.scalar_type(), "bias_gelu_", [&](auto tag) {
    using T = decltype(tag);
    T* yp = y.mutable_data_ptr<T>();
    const T* bp = bc.const_data_ptr<T>();
    if (kind == Gelu::kErf) {
      bias_gelu_rows<T, Gelu::kErf>(yp, bp, rows, F);
    } else {
      bias_gelu_rows<T, Gelu::kTanh>(yp, bp, rows, F);
    }
  });
}

}  // namespace fastbert::cpu
