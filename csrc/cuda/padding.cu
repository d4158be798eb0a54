// pad / unpad on CUDA: row gathers and scatters by flat token index, rows moved as the widest
// words (16, 8, 4 or 1 bytes) that their size and alignment allow.
#include "common.cuh"

namespace fastbert::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;

dim3 grid_for(int64_t work) { return dim3(static_cast<unsigned>(std::min(ceil_div(work, kThreads), kMaxBlocks))); }

template <typename Word>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const Word* __restrict__ src, const int64_t* __restrict__ indices,
                  Word* __restrict__ dst, int64_t tokens, int64_t words_per_row) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < tokens * words_per_row; i += stride) {
    const int64_t t = i / words_per_row, w = i % words_per_row;
    dst[i] = src[indices[t] * words_per_row + w];
  }
}

__global__ void __launch_bounds__(kThreads)
    source_kernel(const int64_t* __restrict__ indices, int64_t* __restrict__ source, int64_t tokens) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens; t += stride) {
    source[indices[t]] = t;
  }
}

template <typename Word>
__global__ void __launch_bounds__(kThreads)
    pad_kernel(const Word* __restrict__ src, const int64_t* __restrict__ source,
               Word* __restrict__ dst, int64_t rows, int64_t words_per_row) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * words_per_row; i += stride) {
    const int64_t r = i / words_per_row, w = i % words_per_row;
    const int64_t s = source[r];
    dst[i] = s >= 0 ? src[s * words_per_row + w] : Word{};
  }
}

// Calls f(Word{}) with the widest word that divides row_bytes and the pointers' alignment.
template <typename F>
void by_word(int64_t row_bytes, const void* a, const void* b, F f) {
  const auto fits = [&](int64_t size) {
    return row_bytes % size == 0 && reinterpret_cast<uintptr_t>(a) % size == 0 &&
           reinterpret_cast<uintptr_t>(b) % size == 0;
  };
  if (fits(16)) return f(uint4{});
  if (fits(8)) return f(uint2{});
  if (fits(4)) return f(uint32_t{});
  f(uint8_t{});
}

}  // namespace

void gather_rows(const void* src, const int64_t* indices, void* dst, int64_t tokens,
                 int64_t row_bytes, cudaStream_t stream) {
  if (tokens == 0 || row_bytes == 0) return;
  by_word(row_bytes, src, dst, [&](auto tag) {
    using Word = decltype(tag);
    const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
    gather_kernel<Word><<<grid_for(tokens * words), kThreads, 0, stream>>>(
        static_cast<const Word*>(src), indices, static_cast<Word*>(dst), tokens, words);
  });
}

void pad_rows(const void* src, const int64_t* indices, void* dst, int64_t* source, int64_t tokens,
              int64_t rows, int64_t row_bytes, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return;
  cudaMemsetAsync(source, 0xff, rows * sizeof(int64_t), stream);  // all -1: padding
  if (tokens > 0) source_kernel<<<grid_for(tokens), kThreads, 0, stream>>>(indices, source, tokens);
  by_word(row_bytes, src, dst, [&](auto tag) {
    using Word = decltype(tag);
    const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
    pad_kernel<Word><<<grid_for(rows * words), kThreads, 0, stream>>>(
        static_cast<const Word*>(src), source, static_cast<Word*>(dst), rows, words);
  });
}

}  // namespace fastbert::cuda
