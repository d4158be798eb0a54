// bias + GELU in place over a GEMM's output on CUDA (the GEMM itself is cuBLAS, via ATen).
//
// Elementwise and memory-bound: a grid-stride loop over 16-byte vectors when the row length
// allows it, scalars otherwise. erf form with erff; tanh form as x * sigmoid(2u) =
// x / (1 + exp(-2u)), one exponential and no cancellation for negative x.
#include "common.cuh"

namespace fastbert::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;  // the grid-stride loop covers the rest

template <bool kTanh>
__device__ __forceinline__ float gelu(float x) {
  if constexpr (kTanh) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.f + __expf(-2.f * u));
  } else {
    return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
  }
}

template <typename T, int kVec, bool kTanh>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_kernel(T* __restrict__ y, const T* __restrict__ bias, int64_t vectors, int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors; i += stride) {
    const int64_t element = i * kVec;
    float v[kVec], b[kVec];
    load_float<T, kVec>(y + element, v);
    load_float<T, kVec>(bias + element % cols, b);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = gelu<kTanh>(v[k] + b[k]);
    store_float<T, kVec>(y + element, v);
  }
}

template <typename T, int kVec>
void launch(T* y, const T* bias, int64_t rows, int64_t cols, bool tanh, cudaStream_t stream) {
  const int64_t vectors = rows * cols / kVec;
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(vectors, kThreads), kMaxBlocks)));
  if (tanh) {
    bias_gelu_kernel<T, kVec, true><<<grid, kThreads, 0, stream>>>(y, bias, vectors, cols);
  } else {
    bias_gelu_kernel<T, kVec, false><<<grid, kThreads, 0, stream>>>(y, bias, vectors, cols);
  }
}

}  // namespace

void bias_gelu(void* y, const void* bias, int64_t rows, int64_t cols, bool tanh, DType dtype,
               cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    T* yp = static_cast<T*>(y);
    const T* bp = static_cast<const T*>(bias);
    if (cols % kVec == 0 && aligned16(yp) && aligned16(bp)) {
      launch<T, kVec>(yp, bp, rows, cols, tanh, stream);
    } else {
      launch<T, 1>(yp, bp, rows, cols, tanh, stream);
    }
  });
}

}  // namespace fastbert::cuda
