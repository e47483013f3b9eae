// CUDA kernels of the grouped LoRA ops: the dropout passes over a block of rows (one thread per 8-column group,
// grid-stride, keyed by the row of the whole input as in dropout_mask.h) and the CUDA registrations. The GEMMs and
// the op logic are shared with the CPU build (grouped_lora.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../dropout_mask.h"
#include "../grouped_lora.h"

namespace d9d {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t work) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
}

template <typename scalar_t, bool kBackward>
__global__ void grouped_dropout_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                            scalar_t* __restrict__ grad, int64_t rows, int64_t cols, int64_t row0,
                                            uint64_t seed, uint32_t threshold, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (cols + kMaskGroup - 1) / kMaskGroup;
  const int64_t total = rows * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total; index += stride) {
    const int64_t row = index / groups;
    const int64_t group = index - row * groups;
    const MaskBits bits = mask_bits(seed, row0 + row, group);
    const int64_t col0 = group * kMaskGroup;
    const int64_t n = cols - col0 < kMaskGroup ? cols - col0 : kMaskGroup;
    const int64_t offset = row * cols + col0;
#pragma unroll
    for (int lane = 0; lane < kMaskGroup; ++lane) {
      if (lane < n) {
        const acc_t keep = bits.keep(lane, threshold) ? static_cast<acc_t>(scale) : acc_t(0);
        out[offset + lane] = static_cast<scalar_t>(static_cast<acc_t>(x[offset + lane]) * keep);
        if constexpr (kBackward) {
          grad[offset + lane] = static_cast<scalar_t>(static_cast<acc_t>(grad[offset + lane]) * keep);
        }
      }
    }
  }
}

template <bool kBackward>
void launch_dropout_rows(const at::Tensor& x, const at::Tensor& out, const at::Tensor* grad, int64_t row0,
                         const DropoutSpec& spec) {
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  const int64_t work = rows * ((cols + kMaskGroup - 1) / kMaskGroup);
  if (work == 0) {
    return;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_lora_dropout_rows_cuda", [&] {
    grouped_dropout_rows_kernel<scalar_t, kBackward><<<grid_for(work), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        kBackward ? grad->mutable_data_ptr<scalar_t>() : nullptr, rows, cols, row0, spec.seed, spec.threshold,
        spec.scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dropout_rows_cuda(const at::Tensor& x, const at::Tensor& out, int64_t row0, const DropoutSpec& spec) {
  launch_dropout_rows<false>(x, out, nullptr, row0, spec);
}

void dropout_rows_backward_cuda(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad, int64_t row0,
                                const DropoutSpec& spec) {
  launch_dropout_rows<true>(x, out, &grad, row0, spec);
}

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
