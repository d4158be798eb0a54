// bias + GELU applied in place to a GEMM's output, and linear+bias+GELU built on it.
//
// The GEMM stays with ATen (MKL / oneDNN). The epilogue reads and writes each element of the
// [T, F] product once, in fp32 vectors: GELU(y + b) with erf (exact) or tanh (HF gelu_new).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

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

// out = GELU(pre) over n elements.
template <typename T, Gelu kind>
void gelu_rows(const T* pre, T* out, int64_t n) {
  constexpr int64_t kChunk = 4096;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
    const int64_t stop = std::min(n, end * kChunk);
    for (int64_t j0 = begin * kChunk; j0 < stop; j0 += kChunk) {
      const int64_t len = std::min(kChunk, stop - j0);
      for_each_vec(len, [&](int64_t j, int64_t m) { store(gelu<kind>(load(pre + j0 + j, m)), out + j0 + j, m); });
    }
  });
}

// Rows per chunk of the bias gradient's column sums: fixed, so the sums (each chunk's in row
// order, then the chunks' in chunk order) do not depend on the thread count.
constexpr int64_t kSumRows = 32;

// dpre = grad * GELU'(pre) for [rows, F], and dbias = its column sums.
template <typename T, Gelu kind>
void gelu_backward_rows(const T* grad, const T* pre, T* dpre, T* dbias, int64_t rows, int64_t F) {
  const int64_t chunks = (rows + kSumRows - 1) / kSumRows;
  std::vector<float> partial(chunks * F);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* acc = partial.data() + c * F;
      std::fill(acc, acc + F, 0.f);
      for (int64_t r = c * kSumRows; r < std::min(rows, (c + 1) * kSumRows); ++r) {
        const T *g = grad + r * F, *x = pre + r * F;
        T* d = dpre + r * F;
        for_each_vec(F, [&](int64_t j, int64_t n) {
          const Vec v = load(g + j, n) * gelu_grad<kind>(load(x + j, n));
          store(v, d + j, n);
          (Vec::loadu(acc + j, n) + v).store(acc + j, n);
        });
      }
    }
  });
  at::parallel_for(0, F, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> total(end - begin, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* acc = partial.data() + c * F + begin;
      for (int64_t j = 0; j < end - begin; ++j) total[j] += acc[j];
    }
    for (int64_t j = 0; j < end - begin; ++j) dbias[begin + j] = static_cast<T>(total[j]);
  });
}

}  // namespace

at::Tensor gelu(const at::Tensor& pre_in, std::string_view approximate) {
  const Gelu kind = parse_gelu(approximate);
  auto pre = pre_in.contiguous();
  auto out = at::empty_like(pre);
  dispatch_float(pre.scalar_type(), "gelu", [&](auto tag) {
    using T = decltype(tag);
    if (kind == Gelu::kErf) {
      gelu_rows<T, Gelu::kErf>(pre.const_data_ptr<T>(), out.mutable_data_ptr<T>(), pre.numel());
    } else {
      gelu_rows<T, Gelu::kTanh>(pre.const_data_ptr<T>(), out.mutable_data_ptr<T>(), pre.numel());
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_train(const at::Tensor& x, const at::Tensor& weight,
                                                     const at::Tensor& bias, std::string_view approximate) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1),
              "fastbert: linear_gelu needs x [..., K] and weight [F, K], got ", x.sizes(), " and ", weight.sizes());
  auto pre = at::linear(x, weight, bias);
  return {fastbert::cpu::gelu(pre, approximate), pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                    const at::Tensor& weight, const at::Tensor& pre_in,
                                                                    std::string_view approximate) {
  const Gelu kind = parse_gelu(approximate);
  TORCH_CHECK(weight.dim() == 2 && x_in.dim() >= 1 && x_in.size(-1) == weight.size(1),
              "fastbert: linear_gelu_backward needs x [..., K] and weight [F, K], got ", x_in.sizes(), " and ",
              weight.sizes());
  const int64_t F = weight.size(0), K = weight.size(1);
  TORCH_CHECK(pre_in.dim() == x_in.dim() && pre_in.size(-1) == F && grad_in.sizes() == pre_in.sizes() &&
                  pre_in.numel() / std::max<int64_t>(F, 1) == x_in.numel() / std::max<int64_t>(K, 1),
              "fastbert: linear_gelu_backward needs grad and pre [..., ", F, "] matching x, got ", grad_in.sizes(),
              " and ", pre_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type() && pre_in.scalar_type() == x_in.scalar_type() &&
                  weight.scalar_type() == x_in.scalar_type(),
              "fastbert: linear_gelu_backward needs grad, x, weight and pre of one dtype");
  auto pre = pre_in.reshape({-1, F}).contiguous();
  auto grad = grad_in.reshape({-1, F}).contiguous();
  auto x = x_in.reshape({-1, K});
  const int64_t rows = pre.size(0);
  auto dpre = at::empty_like(pre);
  auto dbias = at::empty({F}, pre.options());
  dispatch_float(pre.scalar_type(), "linear_gelu_backward", [&](auto tag) {
    using T = decltype(tag);
    const T *g = grad.const_data_ptr<T>(), *p = pre.const_data_ptr<T>();
    T *d = dpre.mutable_data_ptr<T>(), *db = dbias.mutable_data_ptr<T>();
    if (kind == Gelu::kErf) {
      gelu_backward_rows<T, Gelu::kErf>(g, p, d, db, rows, F);
    } else {
      gelu_backward_rows<T, Gelu::kTanh>(g, p, d, db, rows, F);
    }
  });
  auto dx = at::mm(dpre, weight).view(x_in.sizes());
  auto dweight = at::mm(dpre.t(), x);
  return {dx, dweight, dbias};
}

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
