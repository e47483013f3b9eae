// CUDA kernels: the dropout mask passes (one thread per 8-column group, grid-stride) and the CUDA registrations.
// The GEMMs and the op logic are shared with the CPU build (lora.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../dropout_mask.h"
#include "../dropout_rows.h"
#include "../lora.h"

namespace d9d {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t work) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
}

template <typename scalar_t, bool kBackward>
__global__ void dropout_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
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

__global__ void mask_rows_kernel(bool* __restrict__ mask, int64_t rows, int64_t cols, uint64_t seed,
                                 uint32_t threshold) {
  const int64_t groups = (cols + kMaskGroup - 1) / kMaskGroup;
  const int64_t total = rows * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total; index += stride) {
    const int64_t row = index / groups;
    const int64_t group = index - row * groups;
    const MaskBits bits = mask_bits(seed, row, group);
    const int64_t col0 = group * kMaskGroup;
    for (int lane = 0; lane < kMaskGroup && col0 + lane < cols; ++lane) {
      mask[row * cols + col0 + lane] = bits.keep(lane, threshold);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_rows_cuda", [&] {
    dropout_rows_kernel<scalar_t, kBackward><<<grid_for(work), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        kBackward ? grad->mutable_data_ptr<scalar_t>() : nullptr, rows, cols, row0, spec.seed, spec.threshold,
        spec.scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void dropout_rows_cuda(const at::Tensor& x, const at::Tensor& out, int64_t row0, const DropoutSpec& spec) {
  launch_dropout_rows<false>(x, out, nullptr, row0, spec);
}

void dropout_rows_backward_cuda(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad, int64_t row0,
                                const DropoutSpec& spec) {
  launch_dropout_rows<true>(x, out, &grad, row0, spec);
}

namespace {

void mask_rows_cuda(const at::Tensor& mask, const DropoutSpec& spec) {
  const int64_t rows = mask.size(0);
  const int64_t cols = mask.size(1);
  const int64_t work = rows * ((cols + kMaskGroup - 1) / kMaskGroup);
  if (work == 0) {
    return;
  }
  mask_rows_kernel<<<grid_for(work), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.mutable_data_ptr<bool>(), rows, cols, spec.seed, spec.threshold);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The blocks run one after the other on the current stream; each one's GEMMs and kernels fill the GPU.
void for_each_block_cuda(int64_t rows, int64_t step, BlockBody body) {
  for (int64_t row0 = 0; row0 < rows; row0 += step) {
    body(row0, std::min(step, rows - row0), 0);
  }
}

int64_t max_workers_cuda() {
  return 1;
}

// The caching allocator already recycles weight-sized blocks.
at::Tensor fold_scratch_cuda(const at::Tensor& weight) {
  return at::empty(weight.sizes(), weight.options());
}

// Blocks of 16 Mi elements: large enough that the per-block GEMMs fill the GPU, small next to x itself.
constexpr DeviceKernels kCudaKernels{dropout_rows_cuda,
                                     dropout_rows_backward_cuda,
                                     mask_rows_cuda,
                                     /*dropout_rows_keep=*/nullptr,
                                     1 << 24,
                                     /*bf16=*/1 << 24,
                                     for_each_block_cuda,
                                     max_workers_cuda,
                                     nullptr,
                                     fold_scratch_cuda,
                                     /*whole_products=*/false};

at::Tensor lora_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout,
                             const at::Tensor& seed) {
  TORCH_CHECK(x.is_cuda(), "lora_forward: x must be a CUDA tensor (another argument sent the call to the "
              "CUDA kernel), got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_forward(kCudaKernels, x, weight, bias, lora_A, lora_B, scale, dropout, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& weight, const at::Tensor& lora_A,
                                                                  const at::Tensor& lora_B, double scale,
                                                                  double dropout, const at::Tensor& seed,
                                                                  bool need_grad_x) {
  TORCH_CHECK(x.is_cuda(), "lora_backward: x must be a CUDA tensor (another argument sent the call to the "
              "CUDA kernel), got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_backward(kCudaKernels, grad_y, x, weight, lora_A, lora_B, scale, dropout, seed, need_grad_x);
}

at::Tensor dora_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, const at::Tensor& factor, double scale) {
  TORCH_CHECK(x.is_cuda(), "dora_forward: x must be a CUDA tensor (another argument sent the call to the "
              "CUDA kernel), got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return dora_forward(kCudaKernels, x, weight, bias, lora_A, lora_B, factor, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& factor, double scale, bool need_grad_x) {
  TORCH_CHECK(x.is_cuda(), "dora_backward: x must be a CUDA tensor (another argument sent the call to the "
              "CUDA kernel), got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return dora_backward(kCudaKernels, grad_y, x, y, weight, bias, lora_A, lora_B, factor, scale, need_grad_x);
}

at::Tensor dropout_mask_cuda(const at::Tensor& x, double dropout, const at::Tensor& seed) {
  TORCH_CHECK(x.is_cuda(), "dropout_mask: x must be a CUDA tensor (another argument sent the call to the "
              "CUDA kernel), got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return dropout_mask(kCudaKernels, x, dropout, seed);
}

}  // namespace
}  // namespace d9d

TORCH_LIBRARY_IMPL(d9d, CUDA, m) {
  m.impl("lora_forward", &d9d::lora_forward_cuda);
  m.impl("lora_backward", &d9d::lora_backward_cuda);
  m.impl("dropout_mask", &d9d::dropout_mask_cuda);
  m.impl("dora_forward", &d9d::dora_forward_cuda);
  m.impl("dora_backward", &d9d::dora_backward_cuda);
}
