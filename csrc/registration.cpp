// fastbert._C: registers the extension's ops with the PyTorch dispatcher, and exposes the same
// functions to Python directly.
//
// The public ops (fastbert::attention, ...) are Python custom ops defined in fastbert/ops.py;
// the extension adds its own ops to the same namespace under ext_* names, each with a CPU
// kernel (csrc/cpu/) and, when built with CUDA, a CUDA kernel (csrc/cuda/). Fake (meta)
// implementations are not needed here: fastbert.ops calls these from inside its own custom
// ops, which carry the fakes. Importing the Python module fastbert._C loads this library,
// which runs the registrations below.
//
// The module's submodules `cpu` and `cuda` hold the kernels as plain functions. A call through
// the dispatcher from Python boxes every argument (several microseconds per call, more than a
// short batch's kernel); these skip it, and with it autograd, so fastbert.extension uses them
// only while gradients are off.
#include <torch/extension.h>
#include <torch/library.h>

#include <string_view>

#include "cpu/ops.h"
#ifdef FASTBERT_WITH_CUDA
#include "cuda/binding.h"
#endif

namespace {

// GELU(x Wᵀ + b): the GEMM stays with ATen (MKL / oneDNN on CPU, cuBLAS on CUDA), then the
// device's fused bias+GELU pass runs in place over its output.
template <void (*BiasGelu)(const at::Tensor&, const at::Tensor&, std::string_view)>
at::Tensor linear_gelu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       std::string_view approximate) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1),
              "fastbert: linear_gelu needs x [..., K] and weight [F, K], got ", x.sizes(), " and ",
              weight.sizes());
  auto y = at::matmul(x, weight.t());
  BiasGelu(y, bias, approximate);
  return y;
}

}  // namespace

#ifndef FASTBERT_CPU_ISA
#define FASTBERT_CPU_ISA "default"
#endif

TORCH_LIBRARY_FRAGMENT(fastbert, m) {
  m.def("ext_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, "
        "bool causal, Tensor? bias, Tensor? rel_bias=None, Tensor? positions=None) -> Tensor");
  m.def("ext_linear_gelu(Tensor x, Tensor weight, Tensor bias, str approximate) -> Tensor");
  m.def("ext_bias_gelu_(Tensor(a!) y, Tensor bias, str approximate) -> ()");
  m.def("ext_add_layernorm(Tensor x, Tensor residual, Tensor? bias, Tensor weight, Tensor ln_bias, "
        "float eps) -> Tensor");
  m.def("ext_embed_layernorm(Tensor input_ids, Tensor position_ids, Tensor token_type_ids, "
        "Tensor word_embeddings, Tensor position_embeddings, Tensor token_type_embeddings, "
        "Tensor weight, Tensor ln_bias, float eps) -> Tensor");
  m.def("ext_unpad(Tensor x, Tensor indices) -> Tensor");
  m.def("ext_pad(Tensor x, Tensor indices, int batch, int seqlen) -> Tensor");
  // Training (CPU kernels only): forwards that also return what their backward needs, and the backwards.
  m.def("ext_attention_train(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, "
        "bool causal, Tensor? bias, Tensor? rel_bias, Tensor? positions, float dropout_p, Tensor? seed) "
        "-> (Tensor, Tensor)");
  m.def("ext_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, int max_seqlen, float scale, bool causal, Tensor? bias, Tensor? rel_bias, "
        "Tensor? positions, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("ext_gelu(Tensor pre, str approximate) -> Tensor");
  m.def("ext_linear_gelu_train(Tensor x, Tensor weight, Tensor bias, str approximate) -> (Tensor, Tensor)");
  m.def("ext_linear_gelu_backward(Tensor grad, Tensor x, Tensor weight, Tensor pre, str approximate) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ext_add_layernorm_train(Tensor x, Tensor residual, Tensor? bias, Tensor weight, Tensor ln_bias, "
        "float eps, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  m.def("ext_add_layernorm_backward(Tensor grad, Tensor x, Tensor residual, Tensor? bias, Tensor weight, "
        "Tensor ln_bias, Tensor mean, Tensor rstd, float eps, float dropout_p, Tensor? seed) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ext_embed_layernorm_train(Tensor input_ids, Tensor position_ids, Tensor token_type_ids, "
        "Tensor word_embeddings, Tensor position_embeddings, Tensor token_type_embeddings, Tensor weight, "
        "Tensor ln_bias, float eps, float dropout_p, Tensor? seed, int word_padding_idx, "
        "int position_padding_idx) -> (Tensor, Tensor, Tensor)");
  m.def("ext_embed_layernorm_backward(Tensor grad, Tensor input_ids, Tensor position_ids, Tensor token_type_ids, "
        "Tensor word_embeddings, Tensor position_embeddings, Tensor token_type_embeddings, Tensor weight, "
        "Tensor ln_bias, Tensor mean, Tensor rstd, float eps, float dropout_p, Tensor? seed, "
        "int word_padding_idx, int position_padding_idx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ext_philox_uniform(Tensor seed, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("ext_attention", &fastbert::cpu::attention);
  m.impl("ext_linear_gelu", &linear_gelu<fastbert::cpu::bias_gelu_>);
  m.impl("ext_bias_gelu_", &fastbert::cpu::bias_gelu_);
  m.impl("ext_add_layernorm", &fastbert::cpu::add_layernorm);
  m.impl("ext_embed_layernorm", &fastbert::cpu::embed_layernorm);
  m.impl("ext_unpad", &fastbert::cpu::unpad);
  m.impl("ext_pad", &fastbert::cpu::pad);
  m.impl("ext_attention_train", &fastbert::cpu::attention_train);
  m.impl("ext_attention_backward", &fastbert::cpu::attention_backward);
  m.impl("ext_gelu", &fastbert::cpu::gelu);
  m.impl("ext_linear_gelu_train", &fastbert::cpu::linear_gelu_train);
  m.impl("ext_linear_gelu_backward", &fastbert::cpu::linear_gelu_backward);
  m.impl("ext_add_layernorm_train", &fastbert::cpu::add_layernorm_train);
  m.impl("ext_add_layernorm_backward", &fastbert::cpu::add_layernorm_backward);
  m.impl("ext_embed_layernorm_train", &fastbert::cpu::embed_layernorm_train);
  m.impl("ext_embed_layernorm_backward", &fastbert::cpu::embed_layernorm_backward);
  m.impl("ext_philox_uniform", &fastbert::cpu::philox_uniform);
}

#ifdef FASTBERT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("ext_linear_gelu", &linear_gelu<fastbert::cuda::bias_gelu_>);
  m.impl("ext_bias_gelu_", &fastbert::cuda::bias_gelu_);
  m.impl("ext_add_layernorm", &fastbert::cuda::add_layernorm);
  m.impl("ext_embed_layernorm", &fastbert::cuda::embed_layernorm);
  m.impl("ext_unpad", &fastbert::cuda::unpad);
  m.impl("ext_pad", &fastbert::cuda::pad);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastbert's compiled ops (registered under torch.ops.fastbert.ext_*), and the same kernels "
            "as plain functions in the submodules cpu and cuda";
#ifdef FASTBERT_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.attr("CPU_ISA") = FASTBERT_CPU_ISA;

  auto cpu = m.def_submodule("cpu", "CPU kernels, called without the dispatcher");
  cpu.def("attention", &fastbert::cpu::attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens"),
          py::arg("max_seqlen"), py::arg("scale"), py::arg("causal"), py::arg("bias"),
          py::arg("rel_bias") = py::none(), py::arg("positions") = py::none());
  cpu.def("linear_gelu", &linear_gelu<fastbert::cpu::bias_gelu_>);
  cpu.def("bias_gelu_", &fastbert::cpu::bias_gelu_);
  cpu.def("add_layernorm", &fastbert::cpu::add_layernorm);
  cpu.def("embed_layernorm", &fastbert::cpu::embed_layernorm);
  cpu.def("unpad", &fastbert::cpu::unpad);
  cpu.def("pad", &fastbert::cpu::pad);
  // Only for calls with gradients off (a packed weight is not part of autograd's graph), so
  // these have no dispatcher registration.
  cpu.attr("PANEL_WIDTH") = fastbert::cpu::panel_width();
  cpu.def("pack_panels", &fastbert::cpu::pack_panels);
  cpu.def("panel_linear", &fastbert::cpu::panel_linear);
  // Training kernels (CPU only).
  cpu.def("attention_train", &fastbert::cpu::attention_train);
  cpu.def("attention_backward", &fastbert::cpu::attention_backward);
  cpu.def("gelu", &fastbert::cpu::gelu);
  cpu.def("linear_gelu_train", &fastbert::cpu::linear_gelu_train);
  cpu.def("linear_gelu_backward", &fastbert::cpu::linear_gelu_backward);
  cpu.def("add_layernorm_train", &fastbert::cpu::add_layernorm_train);
  cpu.def("add_layernorm_backward", &fastbert::cpu::add_layernorm_backward);
  cpu.def("embed_layernorm_train", &fastbert::cpu::embed_layernorm_train);
  cpu.def("embed_layernorm_backward", &fastbert::cpu::embed_layernorm_backward);
  cpu.def("philox_uniform", &fastbert::cpu::philox_uniform);
#ifdef FASTBERT_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA kernels, called without the dispatcher");
  cuda.def("linear_gelu", &linear_gelu<fastbert::cuda::bias_gelu_>);
  cuda.def("bias_gelu_", &fastbert::cuda::bias_gelu_);
  cuda.def("add_layernorm", &fastbert::cuda::add_layernorm);
  cuda.def("embed_layernorm", &fastbert::cuda::embed_layernorm);
  cuda.def("unpad", &fastbert::cuda::unpad);
  cuda.def("pad", &fastbert::cuda::pad);
#endif
}
