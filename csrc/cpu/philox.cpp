// philox_uniform: the Philox stream of philox.h as a tensor op, so the tests can hold it to
// fastbert.reference.philox_uniform bit for bit (runs of kPhiloxDraw consecutive counters from a
// multiple of 4 go through the vector code every kernel uses, the rest through the scalar code).
#include <ATen/ATen.h>

#include "ops.h"
#include "philox.h"

namespace fastbert::cpu {

at::Tensor philox_uniform(const at::Tensor& seed, const at::Tensor& offsets_in) {
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                    "fastbert: seed must be an int64 tensor of one element");
  TORCH_CHECK_TYPE(offsets_in.scalar_type() == at::kLong, "fastbert: offsets must be int64, got ",
                   offsets_in.scalar_type());
  const Philox philox(seed.item<int64_t>());
  auto offsets = offsets_in.contiguous();
  auto out = at::empty(offsets.sizes(), offsets.options().dtype(at::kFloat));
  const auto* o = reinterpret_cast<const uint64_t*>(offsets.const_data_ptr<int64_t>());
  float* u = out.mutable_data_ptr<float>();
  const int64_t n = offsets.numel();
  int64_t i = 0;
  while (i < n) {
    bool run = i + kPhiloxDraw <= n && o[i] % 4 == 0;
    for (int64_t j = 1; run && j < kPhiloxDraw; ++j) run = o[i + j] == o[i] + j;
    if (run) {
      Vec drawn[4];
      philox.uniforms(o[i], drawn);
      for (int v = 0; v < 4; ++v) drawn[v].store(u + i + v * kVecSize);
      i += kPhiloxDraw;
    } else {
      u[i] = philox.uniform(o[i]);
      ++i;
    }
  }
  return out;
}

}  // namespace fastbert::cpu
