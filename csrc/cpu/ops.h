// CPU implementations of fastbert's extension ops (registered in csrc/registration.cpp).
//
// Semantics and shapes are those of the references in fastbert/reference.py. Inputs may be
// fp32, bf16 or fp16; every kernel computes in fp32 and writes the input dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace fastbert::cpu {

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, bool causal,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_bias,
                     const std::optional<at::Tensor>& positions);

void bias_gelu_(const at::Tensor& y, const at::Tensor& bias, std::string_view approximate);

at::Tensor add_layernorm(const at::Tensor& x, const at::Tensor& residual,
                         const std::optional<at::Tensor>& bias, const at::Tensor& weight,
                         const at::Tensor& ln_bias, double eps);

at::Tensor embed_layernorm(const at::Tensor& input_ids, const at::Tensor& position_ids,
                           const at::Tensor& token_type_ids, const at::Tensor& word_embeddings,
                           const at::Tensor& position_embeddings,
                           const at::Tensor& token_type_embeddings, const at::Tensor& weight,
                           const at::Tensor& ln_bias, double eps);

at::Tensor unpad(const at::Tensor& x, const at::Tensor& indices);

at::Tensor pad(const at::Tensor& x, const at::Tensor& indices, int64_t batch, int64_t seqlen);

}  // namespace fastbert::cpu
