// The torch side of the CUDA kernels: checks, contiguity, output allocation, device guard and
// the current stream, then one call into the raw launchers of kernels.h.
#include "binding.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace fastbert::cuda {
namespace {

DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastbert: ", what, " supports float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(std::initializer_list<const at::Tensor*> tensors, const at::Tensor& like) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device() == like.device(), "fastbert: every tensor must be on ", like.device(),
                ", got one on ", t->device());
  }
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace

void bias_gelu_(const at::Tensor& y, const at::Tensor& bias, std::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "fastbert: approximate must be 'none' or 'tanh', got '", approximate, "'");
  TORCH_CHECK(y.dim() >= 1 && y.is_contiguous(), "fastbert: bias_gelu_ needs a contiguous tensor");
  const int64_t cols = y.size(-1);
  check_vector(bias, y, cols, "bias");
  check_cuda({&bias}, y);
  const c10::cuda::CUDAGuard guard(y.device());
  auto bc = bias.contiguous();
  bias_gelu(y.data_ptr(), bc.const_data_ptr(), cols ? y.numel() / cols : 0, cols,
            approximate == "tanh", dtype_of(y, "bias_gelu_"), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor add_layernorm(const at::Tensor& x, const at::Tensor& residual,
                         const std::optional<at::Tensor>& bias, const at::Tensor& weight,
                         const at::Tensor& ln_bias, double eps) {
  const int64_t H = check_add_layernorm_args(x, residual, bias, weight, ln_bias);
  check_cuda({&residual, &weight, &ln_bias}, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous(), bc = ln_bias.contiguous();
  auto pre = bias ? bias->contiguous() : at::Tensor();
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  add_layernorm(xc.const_data_ptr(), rc.const_data_ptr(), pre.defined() ? pre.const_data_ptr() : nullptr,
                wc.const_data_ptr(), bc.const_data_ptr(), out.data_ptr(), H ? x.numel() / H : 0, H,
                static_cast<float>(eps), dtype_of(x, "add_layernorm"), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor embed_layernorm(const at::Tensor& input_ids, const at::Tensor& position_ids,
                           const at::Tensor& token_type_ids, const at::Tensor& word_embeddings,
                           const at::Tensor& position_embeddings,
                           const at::Tensor& token_type_embeddings, const at::Tensor& weight,
                           const at::Tensor& ln_bias, double eps) {
  const auto& words = word_embeddings;
  check_embed_args(input_ids, position_ids, token_type_ids, words, position_embeddings,
                   token_type_embeddings, weight, ln_bias);
  const int64_t H = words.size(1), T = input_ids.numel();
  check_cuda({&input_ids, &position_ids, &token_type_ids, &position_embeddings, &token_type_embeddings,
              &weight, &ln_bias}, words);
  const c10::cuda::CUDAGuard guard(words.device());
  auto ids = input_ids.to(at::kLong).contiguous(), pos = position_ids.to(at::kLong).contiguous();
  auto tts = token_type_ids.to(at::kLong).contiguous();
  auto wc = words.contiguous(), pc = position_embeddings.contiguous(), tc = token_type_embeddings.contiguous();
  auto gc = weight.contiguous(), bc = ln_bias.contiguous();
  auto out = at::empty({T, H}, words.options());
  embed_layernorm(ids.const_data_ptr<int64_t>(), pos.const_data_ptr<int64_t>(), tts.const_data_ptr<int64_t>(),
                  wc.const_data_ptr(), pc.const_data_ptr(), tc.const_data_ptr(),
                  gc.const_data_ptr(), bc.const_data_ptr(), out.data_ptr(), T, H,
                  static_cast<float>(eps), dtype_of(words, "embed_layernorm"), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpad(const at::Tensor& x, const at::Tensor& indices) {
  TORCH_CHECK(x.dim() >= 2, "fastbert: unpad needs x of shape [batch, seq, ...], got ", x.sizes());
  check_cuda({&indices}, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto idx = long_indices(indices);
  auto xc = x.contiguous();
  std::vector<int64_t> shape{idx.numel()};
  shape.insert(shape.end(), x.sizes().begin() + 2, x.sizes().end());
  auto out = at::empty(shape, x.options());
  const int64_t rows = x.size(0) * x.size(1);
  gather_rows(xc.const_data_ptr(), idx.const_data_ptr<int64_t>(), out.data_ptr(), idx.numel(),
              rows ? static_cast<int64_t>(xc.nbytes()) / rows : 0, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor pad(const at::Tensor& x, const at::Tensor& indices, int64_t batch, int64_t seqlen) {
  TORCH_CHECK(x.dim() >= 1, "fastbert: pad needs x of shape [tokens, ...], got ", x.sizes());
  TORCH_CHECK(indices.numel() == x.size(0), "fastbert: pad has ", x.size(0), " tokens but ",
              indices.numel(), " indices");
  check_cuda({&indices}, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto idx = long_indices(indices);
  auto xc = x.contiguous();
  std::vector<int64_t> shape{batch, seqlen};
  shape.insert(shape.end(), x.sizes().begin() + 1, x.sizes().end());
  auto out = at::empty(shape, x.options());
  const int64_t rows = batch * seqlen;
  auto source = at::empty({rows}, idx.options());
  pad_rows(xc.const_data_ptr(), idx.const_data_ptr<int64_t>(), out.data_ptr(),
           source.mutable_data_ptr<int64_t>(), idx.numel(), rows,
           rows ? static_cast<int64_t>(out.nbytes()) / rows : 0, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace fastbert::cuda
