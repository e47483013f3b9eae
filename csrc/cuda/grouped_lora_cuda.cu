// The CUDA registrations of the grouped LoRA ops; their dropout passes are the 2-D ops' (dropout_rows.h). The GEMMs
// and the op logic are shared with the CPU build (grouped_lora.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../dropout_rows.h"
#include "../grouped_lora.h"

namespace d9d {
namespace {

// Blocks of 16 Mi elements: large enough that the per-block GEMMs fill the GPU, small next to x itself.
constexpr GroupedKernels kCudaKernels{dropout_rows_cuda, dropout_rows_backward_cuda, 1 << 24};

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor (another argument sent the call to the CUDA "
              "kernel), got ", name, " on ", t.device());
}

at::Tensor grouped_lora_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, const at::Tensor& offsets, double scale,
                                     double dropout, const at::Tensor& seed) {
  check_cuda("grouped_lora_forward", "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  return grouped_lora_forward(kCudaKernels, x, weight, lora_A, lora_B, offsets, scale, dropout, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& offsets, double scale, double dropout, const at::Tensor& seed,
    bool weight_grad) {
  check_cuda("grouped_lora_backward", "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  return grouped_lora_backward(kCudaKernels, grad, x, weight, lora_A, lora_B, offsets, scale, dropout, seed,
                               weight_grad);
}

void grouped_lora_merge_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                             double scale) {
  check_cuda("grouped_lora_merge_", "weight", weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  grouped_lora_merge(weight, lora_A, lora_B, scale);
}

}  // namespace
}  // namespace d9d

TORCH_LIBRARY_IMPL(d9d, CUDA, m) {
  m.impl("grouped_lora_forward", &d9d::grouped_lora_forward_cuda);
  m.impl("grouped_lora_backward", &d9d::grouped_lora_backward_cuda);
  m.impl("grouped_lora_merge_", &d9d::grouped_lora_merge_cuda);
}
