// Launchers of fastbert's CUDA kernels: raw device pointers and a stream, no torch types, so
// the .cu files compile with nvcc alone. csrc/cuda/binding.cpp is the torch-facing side.
//
// Every launcher computes in fp32 and reads/writes `dtype` data; pointers are device pointers
// to contiguous row-major arrays. Launch errors are reported by the caller (cudaGetLastError).
// Ids and indices are not range-checked on the GPU (that would cost a sync): callers check them
// (fastbert's encoder validates ids before the forward; the CPU kernels check their own).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastbert::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// out[r] = LayerNorm(x[r] + residual[r] + bias) * weight + ln_bias for rows x hidden; bias may be null.
void add_layernorm(const void* x, const void* residual, const void* bias, const void* weight,
                   const void* ln_bias, void* out, int64_t rows, int64_t hidden, float eps,
                   DType dtype, cudaStream_t stream);

// out[t] = LayerNorm(word[ids[t]] + token_type[type_ids[t]] + position[pos_ids[t]]) * weight + ln_bias.
// The ids are those of the valid tokens only (the encoder gathers them first), so only
// real tokens are embedded.
void embed_layernorm(const int64_t* input_ids, const int64_t* position_ids,
                     const int64_t* token_type_ids, const void* word,
                     const void* position, const void* token_type, const void* weight,
                     const void* ln_bias, void* out, int64_t tokens, int64_t hidden, float eps,
                     DType dtype, cudaStream_t stream);

// y = GELU(y + bias) in place over rows x cols; erf GELU, or the tanh form if `tanh`.
void bias_gelu(void* y, const void* bias, int64_t rows, int64_t cols, bool tanh, DType dtype,
               cudaStream_t stream);

// dst[t] = src[indices[t]] for rows of row_bytes bytes (unpad).
void gather_rows(const void* src, const int64_t* indices, void* dst, int64_t tokens,
                 int64_t row_bytes, cudaStream_t stream);

// dst[r] = src[t] where indices[t] == r, zeros elsewhere, for `rows` output rows (pad).
// `source` is scratch for `rows` int64 values.
void pad_rows(const void* src, const int64_t* indices, void* dst, int64_t* source, int64_t tokens,
              int64_t rows, int64_t row_bytes, cudaStream_t stream);

}  // namespace fastbert::cuda
