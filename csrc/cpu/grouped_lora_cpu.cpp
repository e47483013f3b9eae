// The CPU registrations of the grouped LoRA ops; their dropout passes are the 2-D ops' (dropout_rows.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../dropout_rows.h"
#include "../grouped_lora.h"

namespace d9d {
namespace {

// Blocks of 512 KiB of float32: a block of x and one of dy fit a core's L2 cache together; the GEMMs of a block
// run on all threads (MKL), the mask passes in parallel over rows.
constexpr GroupedKernels kCpuKernels{dropout_rows_cpu, dropout_rows_backward_cpu, 1 << 17};

at::Tensor grouped_lora_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                    const at::Tensor& lora_B, const at::Tensor& offsets, double scale, double dropout,
                                    const at::Tensor& seed) {
  return grouped_lora_forward(kCpuKernels, x, weight, lora_A, lora_B, offsets, scale, dropout, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& offsets, double scale, double dropout, const at::Tensor& seed,
    bool weight_grad) {
  return grouped_lora_backward(kCpuKernels, grad, x, weight, lora_A, lora_B, offsets, scale, dropout, seed,
                               weight_grad);
}

void grouped_lora_merge_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scale) {
  grouped_lora_merge(weight, lora_A, lora_B, scale);
}

}  // namespace
}  // namespace d9d

TORCH_LIBRARY_IMPL(d9d, CPU, m) {
  m.impl("grouped_lora_forward", &d9d::grouped_lora_forward_cpu);
  m.impl("grouped_lora_backward", &d9d::grouped_lora_backward_cpu);
  m.impl("grouped_lora_merge_", &d9d::grouped_lora_merge_cpu);
}
