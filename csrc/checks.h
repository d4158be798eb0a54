// Argument checks shared by the CPU kernels (csrc/cpu/) and the CUDA binding (csrc/cuda/), so
// both backends refuse the same malformed input with the same message.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastbert {

// A 1D parameter vector of length n in the dtype of `like` (LayerNorm weight, a bias).
inline void check_vector(const at::Tensor& t, const at::Tensor& like, int64_t n, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == like.scalar_type(), "fastbert: ",
              name, " must be [", n, "] ", like.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type());
}

// add_layernorm: x and residual of one shape and dtype, [H] parameters; returns H.
inline int64_t check_add_layernorm_args(const at::Tensor& x, const at::Tensor& residual,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& weight,
                                        const at::Tensor& ln_bias) {
  TORCH_CHECK(x.dim() >= 1 && x.sizes() == residual.sizes(),
              "fastbert: add_layernorm needs x and residual of one shape, got ", x.sizes(), " and ",
              residual.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "fastbert: residual has dtype ",
              residual.scalar_type(), " but x has ", x.scalar_type());
  const int64_t H = x.size(-1);
  check_vector(weight, x, H, "weight");
  check_vector(ln_bias, x, H, "ln_bias");
  if (bias) check_vector(*bias, x, H, "bias");
  return H;
}

// Token indices (pad/unpad) as a contiguous int64 vector.
inline at::Tensor long_indices(const at::Tensor& indices) {
  TORCH_CHECK(indices.dim() == 1 && (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt),
              "fastbert: indices must be a 1D int64 or int32 tensor, got ", indices.sizes(), " ",
              indices.scalar_type());
  return indices.to(at::kLong).contiguous();
}

// embed_layernorm: three [T] id vectors, [n, H] tables of one dtype, [H] LayerNorm parameters.
inline void check_embed_args(const at::Tensor& input_ids, const at::Tensor& position_ids,
                             const at::Tensor& token_type_ids, const at::Tensor& words,
                             const at::Tensor& position_embeddings, const at::Tensor& token_type_embeddings,
                             const at::Tensor& weight, const at::Tensor& ln_bias) {
  TORCH_CHECK(words.dim() == 2, "fastbert: word_embeddings must be 2D, got ", words.sizes());
  const int64_t H = words.size(1), T = input_ids.numel();
  for (const auto* t : {&input_ids, &position_ids, &token_type_ids}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == T, "fastbert: embed_layernorm needs ids of shape [",
                T, "], got ", t->sizes());
  }
  for (const auto* t : {&position_embeddings, &token_type_embeddings}) {
    TORCH_CHECK(t->dim() == 2 && t->size(1) == H && t->scalar_type() == words.scalar_type(),
                "fastbert: embedding tables must be [n, ", H, "] ", words.scalar_type(), ", got ",
                t->sizes(), " ", t->scalar_type());
  }
  check_vector(weight, words, H, "weight");
  check_vector(ln_bias, words, H, "ln_bias");
}

}  // namespace fastbert
