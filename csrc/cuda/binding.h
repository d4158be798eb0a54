// CUDA implementations of fastbert's extension ops (registered in csrc/registration.cpp).
// Torch-facing wrappers around the raw launchers of kernels.h; same semantics as csrc/cpu/ops.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace fastbert::cuda {

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

}  // namespace fastbert::cuda
