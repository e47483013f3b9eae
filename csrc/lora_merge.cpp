// The merge op W += s B A: pure ATen, so one CompositeExplicitAutograd kernel serves every device. merge_peft calls
// it on local shards; a direct call on DTensors goes through the sharding rule in d9d/ops/sharding.py.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "lora.h"

namespace d9d {
namespace {

void lora_merge_(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  constexpr const char* op = "lora_merge_";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be out x in (2D), got ", weight.sizes());
  TORCH_CHECK(is_supported_dtype(weight.scalar_type()), op,
              ": weight must be float32, bfloat16, float16 or float64, got ", weight.scalar_type());
  check_adapters(op, lora_A, lora_B, weight.size(1), weight.size(0), "weight.size(1)");
  TORCH_CHECK(lora_A.device() == weight.device(), op, ": lora_A must be on weight's device ", weight.device(),
              ", got ", lora_A.device());
  TORCH_CHECK(lora_B.device() == weight.device(), op, ": lora_B must be on weight's device ", weight.device(),
              ", got ", lora_B.device());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  // Casting the small adapters is cheap; the product goes straight into weight (beta = 1), with no out x in temporary.
  const at::ScalarType dtype = weight.scalar_type();
  const_cast<at::Tensor&>(weight).addmm_(lora_B.to(dtype), lora_A.to(dtype), /*beta=*/1, /*alpha=*/scale);
}

}  // namespace
}  // namespace d9d

TORCH_LIBRARY_IMPL(d9d, CompositeExplicitAutograd, m) {
  m.impl("lora_merge_", &d9d::lora_merge_);
}
