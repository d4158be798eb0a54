// CPU implementations of fastbert's extension ops (registered in csrc/registration.cpp).
//
// Semantics and shapes are those of the references in fastbert/reference.py. Inputs may be
// fp32, bf16 or fp16; every kernel computes in fp32 and writes the input dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace fastbert::cpu {

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, bool causal,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_bias,
                     const std::optional<at::Tensor>& positions);

void bias_gelu_(const at::Tensor& y, const at::Tensor& bias, std::string_view approximate);

// fp32 GEMMs of few rows on a weight packed into panels (gemm.cpp): pack_panels(W [N, K]) once,
// then panel_linear(x, panels, b, gelu) = x Wᵀ + b, GELU'd when gelu_approximate is given.
int64_t panel_width();
at::Tensor pack_panels(const at::Tensor& weight);
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                        std::optional<std::string_view> gelu_approximate);

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

// ----------------------------------------------------------------------------- training
// The forwards that also return what their backward needs, and the backwards, as
// fastbert.reference's functions of the same names. Dropout draws its mask from Philox
// (philox.h) for `seed`, an int64 tensor of one element read on the host.

std::tuple<at::Tensor, at::Tensor> attention_train(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double scale, bool causal, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_bias,
    const std::optional<at::Tensor>& positions, double dropout_p, const std::optional<at::Tensor>& seed);

std::tuple<at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, bool causal,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_bias,
    const std::optional<at::Tensor>& positions, double dropout_p, const std::optional<at::Tensor>& seed);

// GELU(pre) (a new tensor), the second half of linear_gelu_train after any GEMM.
at::Tensor gelu(const at::Tensor& pre, std::string_view approximate);

std::tuple<at::Tensor, at::Tensor> linear_gelu_train(const at::Tensor& x, const at::Tensor& weight,
                                                     const at::Tensor& bias, std::string_view approximate);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& pre,
                                                                    std::string_view approximate);

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_train(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& bias, const at::Tensor& weight,
    const at::Tensor& ln_bias, double eps, double dropout_p, const std::optional<at::Tensor>& seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& bias,
    const at::Tensor& weight, const at::Tensor& ln_bias, const at::Tensor& mean, const at::Tensor& rstd, double eps,
    double dropout_p, const std::optional<at::Tensor>& seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_layernorm_train(
    const at::Tensor& input_ids, const at::Tensor& position_ids, const at::Tensor& token_type_ids,
    const at::Tensor& word_embeddings, const at::Tensor& position_embeddings,
    const at::Tensor& token_type_embeddings, const at::Tensor& weight, const at::Tensor& ln_bias, double eps,
    double dropout_p, const std::optional<at::Tensor>& seed, int64_t word_padding_idx, int64_t position_padding_idx);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embed_layernorm_backward(
    const at::Tensor& grad, const at::Tensor& input_ids, const at::Tensor& position_ids,
    const at::Tensor& token_type_ids, const at::Tensor& word_embeddings, const at::Tensor& position_embeddings,
    const at::Tensor& token_type_embeddings, const at::Tensor& weight, const at::Tensor& ln_bias,
    const at::Tensor& mean, const at::Tensor& rstd, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed, int64_t word_padding_idx, int64_t position_padding_idx);

// Philox uniforms (philox.h) of int64 `offsets` for an int64 [1] `seed`, as
// fastbert.reference.philox_uniform: for tests (runs of kPhiloxDraw consecutive offsets from a
// multiple of 4 run the vector code).
at::Tensor philox_uniform(const at::Tensor& seed, const at::Tensor& offsets);

}  // namespace fastbert::cpu
