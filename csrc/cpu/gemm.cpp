// fp32 GEMMs with few rows (a short query, a small batch): y = x Wᵀ + b, optionally GELU'd.
//
// With few rows a GEMM reads every weight once and does little with it, so what decides its
// speed is how steadily the weight streams in from memory. MKL and oneDNN stay well below that
// at 16-32 rows (benchmarks/NOTES.md). Here the weight is packed once into panels of kVecSize
// output columns, [N / kVecSize, K, kVecSize], so each panel is one contiguous stream the
// hardware prefetcher follows; a thread takes kPanels panels at a time and keeps a
// kRows x kPanels tile of accumulators in registers while it walks K, broadcasting one x value
// per row and step. Bias (and GELU) are applied to the tile before it is stored: one pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string_view>

#include "gelu.h"
#include "ops.h"
#include "vec.h"

namespace fastbert::cpu {
namespace {

// 3 panels x 8 rows = 24 accumulators of the 32 AVX-512 registers (measured best of the tiles
// tried at 16-64 rows); with 16 registers (AVX2), 3 x 4.
constexpr int kPanels = 3;
constexpr int kRows = kVecSize == 16 ? 8 : 4;

enum class Epilogue { kNone, kGeluErf, kGeluTanh };

template <Epilogue e>
inline Vec finish(Vec v) {
  if constexpr (e == Epilogue::kGeluErf) return gelu<Gelu::kErf>(v);
  if constexpr (e == Epilogue::kGeluTanh) return gelu<Gelu::kTanh>(v);
  return v;
}

// y[R, P * kVecSize] = x[R, K] · (P panels)ᵀ + bias, then the epilogue.
template <int R, int P, Epilogue e>
void tile(const float* x, int64_t K, const float* panels, const float* bias, float* y, int64_t ldy) {
  Vec acc[R][P];
  for (int p = 0; p < P; ++p) {
    const Vec b = bias ? Vec::loadu(bias + p * kVecSize) : Vec(0.f);
    for (int r = 0; r < R; ++r) acc[r][p] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec w[P];
    for (int p = 0; p < P; ++p) w[p] = Vec::loadu(panels + (p * K + k) * kVecSize);
    for (int r = 0; r < R; ++r) {
      const Vec a(x[r * K + k]);
      for (int p = 0; p < P; ++p) acc[r][p] = at::vec::fmadd(a, w[p], acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) finish<e>(acc[r][p]).store(y + r * ldy + p * kVecSize);
  }
}

// The tile for `rows` (1..kRows) rows: a compile-time row count keeps the accumulators in registers.
template <int P, Epilogue e, int R = kRows>
void rows_tile(int64_t rows, const float* x, int64_t K, const float* panels, const float* bias, float* y,
               int64_t ldy) {
  if constexpr (R > 0) {
    if (rows == R) return tile<R, P, e>(x, K, panels, bias, y, ldy);
    return rows_tile<P, e, R - 1>(rows, x, K, panels, bias, y, ldy);
  }
}

template <int P, Epilogue e>
void panel_group(const float* x, int64_t M, int64_t K, const float* panels, const float* bias, float* y,
                 int64_t N) {
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    rows_tile<P, e>(std::min<int64_t>(kRows, M - r0), x + r0 * K, K, panels, bias, y + r0 * N, N);
  }
}

template <Epilogue e>
void gemm(const float* x, int64_t M, int64_t K, const float* panels, int64_t num_panels, const float* bias,
          float* y) {
  const int64_t N = num_panels * kVecSize;
  const int64_t groups = (num_panels + kPanels - 1) / kPanels;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t p0 = g * kPanels, count = std::min<int64_t>(kPanels, num_panels - p0);
      const float* w = panels + p0 * K * kVecSize;
      const float* b = bias ? bias + p0 * kVecSize : nullptr;
      float* out = y + p0 * kVecSize;
      if (count == 3) {
        panel_group<3, e>(x, M, K, w, b, out, N);
      } else if (count == 2) {
        panel_group<2, e>(x, M, K, w, b, out, N);
      } else {
        panel_group<1, e>(x, M, K, w, b, out, N);
      }
    }
  });
}

}  // namespace

int64_t panel_width() { return kVecSize; }

at::Tensor pack_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat,
              "fastbert: pack_panels needs a 2D float32 weight [N, K], got ", weight.sizes(), " ",
              weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kVecSize == 0, "fastbert: pack_panels needs N (", N, ") to be a multiple of ", kVecSize);
  return weight.reshape({N / kVecSize, kVecSize, K}).transpose(1, 2).contiguous();
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                        std::optional<std::string_view> gelu_approximate) {
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kVecSize && panels.scalar_type() == at::kFloat &&
                  panels.is_contiguous(),
              "fastbert: panels must come from pack_panels ([N / ", kVecSize, ", K, ", kVecSize,
              "] float32, contiguous), got ", panels.sizes(), " ", panels.scalar_type());
  const int64_t K = panels.size(1), N = panels.size(0) * kVecSize;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat,
              "fastbert: x must be [rows, ", K, "] float32 to match the panels, got ", x.sizes(), " ",
              x.scalar_type());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat,
                "fastbert: bias must be [", N, "] float32, got ", bias->sizes(), " ", bias->scalar_type());
  }
  const Epilogue e = !gelu_approximate ? Epilogue::kNone
                     : parse_gelu(*gelu_approximate) == Gelu::kErf ? Epilogue::kGeluErf
                                                                   : Epilogue::kGeluTanh;
  const auto xc = x.contiguous();
  const auto bc = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  auto y = at::empty({x.size(0), N}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* bp = bc ? bc->const_data_ptr<float>() : nullptr;
  const float* wp = panels.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t M = x.size(0), P = panels.size(0);
  switch (e) {
    case Epilogue::kNone: gemm<Epilogue::kNone>(xp, M, K, wp, P, bp, yp); break;
    case Epilogue::kGeluErf: gemm<Epilogue::kGeluErf>(xp, M, K, wp, P, bp, yp); break;
    case Epilogue::kGeluTanh: gemm<Epilogue::kGeluTanh>(xp, M, K, wp, P, bp, yp); break;
  }
  return y;
}

}  // namespace fastbert::cpu
