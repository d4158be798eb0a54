// add+LayerNorm and embeddings(+unpad)+LayerNorm on CUDA.
//
// Rows whose length is a multiple of a 16-byte vector (fp32: 4, fp16/bf16: 8 elements) run
// one warp per row: each lane loads 16-byte vectors, keeps the row in registers (up to
// kMaxIters vectors per lane, so hidden <= 32 * 8 * vector), and the statistics are two warp
// reductions (mean, then variance about the mean from registers: no cancellation). Other rows
// (odd sizes, misaligned pointers, hidden beyond the register budget) run one block per row
// with scalar loads, re-reading the inputs for each of the three passes (L1/L2 hits).
//
// The loaders below produce the pre-norm row h: x + residual (+ bias), or word + token type
// + position embeddings gathered by id.
#include "common.cuh"

namespace fastbert::cuda {
namespace {

constexpr int kWarpRowsPerBlock = 4;  // 128 threads
constexpr int kMaxIters = 8;
constexpr int kBlockThreads = 256;

template <typename T>
struct AddRow {
  const T *x, *residual, *bias;
  int64_t hidden;

  template <int kVec>
  __device__ __forceinline__ void load(int64_t row, int64_t col, float (&h)[kVec]) const {
    float r[kVec];
    load_float<T, kVec>(x + row * hidden + col, h);
    load_float<T, kVec>(residual + row * hidden + col, r);
#pragma unroll
    for (int i = 0; i < kVec; ++i) h[i] += r[i];
    if (bias != nullptr) {
      load_float<T, kVec>(bias + col, r);
#pragma unroll
      for (int i = 0; i < kVec; ++i) h[i] += r[i];
    }
  }
};

template <typename T>
struct EmbedRow {
  const int64_t *input_ids, *position_ids, *token_type_ids;
  const T *word, *position, *token_type;
  int64_t hidden;

  template <int kVec>
  __device__ __forceinline__ void load(int64_t token, int64_t col, float (&h)[kVec]) const {
    float p[kVec], t[kVec];
    load_float<T, kVec>(word + input_ids[token] * hidden + col, h);
    load_float<T, kVec>(token_type + token_type_ids[token] * hidden + col, t);
    load_float<T, kVec>(position + position_ids[token] * hidden + col, p);
#pragma unroll
    for (int i = 0; i < kVec; ++i) h[i] = (h[i] + t[i]) + p[i];
  }
};

template <typename T, int kVec, int kIters, typename Row>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32)
    layernorm_warp_kernel(Row src, const T* __restrict__ weight, const T* __restrict__ ln_bias,
                          T* __restrict__ out, int64_t rows, int hidden, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  float h[kIters][kVec];
  float sum = 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < hidden) {
      src.template load<kVec>(row, col, h[it]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum += h[it][i];
    }
  }
  const float mean = warp_sum(sum) / hidden;
  float sq = 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if ((it * 32 + lane) * kVec < hidden) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) sq += (h[it][i] - mean) * (h[it][i] - mean);
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) / hidden + eps);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < hidden) {
      float g[kVec], b[kVec], y[kVec];
      load_float<T, kVec>(weight + col, g);
      load_float<T, kVec>(ln_bias + col, b);
#pragma unroll
      for (int i = 0; i < kVec; ++i) y[i] = (h[it][i] - mean) * rstd * g[i] + b[i];
      store_float<T, kVec>(out + row * hidden + col, y);
    }
  }
}

template <typename T, typename Row>
__global__ void __launch_bounds__(kBlockThreads)
    layernorm_block_kernel(Row src, const T* __restrict__ weight, const T* __restrict__ ln_bias,
                           T* __restrict__ out, int hidden, float eps) {
  __shared__ float shared[kBlockThreads / 32];
  const int64_t row = blockIdx.x;
  float sum = 0.f;
  for (int col = threadIdx.x; col < hidden; col += blockDim.x) {
    float h[1];
    src.template load<1>(row, col, h);
    sum += h[0];
  }
  const float mean = block_sum(sum, shared) / hidden;
  float sq = 0.f;
  for (int col = threadIdx.x; col < hidden; col += blockDim.x) {
    float h[1];
    src.template load<1>(row, col, h);
    sq += (h[0] - mean) * (h[0] - mean);
  }
  const float rstd = rsqrtf(block_sum(sq, shared) / hidden + eps);
  for (int col = threadIdx.x; col < hidden; col += blockDim.x) {
    float h[1];
    src.template load<1>(row, col, h);
    out[row * hidden + col] = from_float<T>((h[0] - mean) * rstd * to_float(weight[col]) + to_float(ln_bias[col]));
  }
}

template <typename T, int kVec, int kIters, typename Row>
void launch_warp(const Row& src, const T* weight, const T* ln_bias, T* out, int64_t rows,
                 int64_t hidden, float eps, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kWarpRowsPerBlock)));
  layernorm_warp_kernel<T, kVec, kIters><<<grid, kWarpRowsPerBlock * 32, 0, stream>>>(
      src, weight, ln_bias, out, rows, static_cast<int>(hidden), eps);
}

// Picks the warp kernel when every row is whole 16-byte vectors that fit the register budget.
template <typename T, typename Row>
void launch(const Row& src, bool vectorizable, const T* weight, const T* ln_bias, T* out,
            int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t iters = ceil_div(hidden, 32 * kVec);
  vectorizable = vectorizable && hidden % kVec == 0 && aligned16(weight) && aligned16(ln_bias) &&
                 aligned16(out);
  if (vectorizable && iters <= 1) return launch_warp<T, kVec, 1>(src, weight, ln_bias, out, rows, hidden, eps, stream);
  if (vectorizable && iters <= 2) return launch_warp<T, kVec, 2>(src, weight, ln_bias, out, rows, hidden, eps, stream);
  if (vectorizable && iters <= 4) return launch_warp<T, kVec, 4>(src, weight, ln_bias, out, rows, hidden, eps, stream);
  if (vectorizable && iters <= kMaxIters) {
    return launch_warp<T, kVec, kMaxIters>(src, weight, ln_bias, out, rows, hidden, eps, stream);
  }
  layernorm_block_kernel<T><<<static_cast<unsigned>(rows), kBlockThreads, 0, stream>>>(
      src, weight, ln_bias, out, static_cast<int>(hidden), eps);
}

}  // namespace

void add_layernorm(const void* x, const void* residual, const void* bias, const void* weight,
                   const void* ln_bias, void* out, int64_t rows, int64_t hidden, float eps,
                   DType dtype, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const AddRow<T> src{static_cast<const T*>(x), static_cast<const T*>(residual),
                        static_cast<const T*>(bias), hidden};
    const bool vectorizable = aligned16(x) && aligned16(residual) && (bias == nullptr || aligned16(bias));
    launch<T>(src, vectorizable, static_cast<const T*>(weight), static_cast<const T*>(ln_bias),
              static_cast<T*>(out), rows, hidden, eps, stream);
  });
}

void embed_layernorm(const int64_t* input_ids, const int64_t* position_ids,
                     const int64_t* token_type_ids, const void* word,
                     const void* position, const void* token_type, const void* weight,
                     const void* ln_bias, void* out, int64_t tokens, int64_t hidden, float eps,
                     DType dtype, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const EmbedRow<T> src{input_ids, position_ids, token_type_ids,
                          static_cast<const T*>(word), static_cast<const T*>(position),
                          static_cast<const T*>(token_type), hidden};
    const bool vectorizable = aligned16(word) && aligned16(position) && aligned16(token_type);
    launch<T>(src, vectorizable, static_cast<const T*>(weight), static_cast<const T*>(ln_bias),
              static_cast<T*>(out), tokens, hidden, eps, stream);
  });
}

}  // namespace fastbert::cuda
