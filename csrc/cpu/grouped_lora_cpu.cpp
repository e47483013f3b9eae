// CPU kernels of the grouped LoRA ops: the dropout passes over a block of rows (parallel over rows, one Philox call
// per 8 columns, keyed by the row of the whole input as in dropout_mask.h) and the CPU registrations.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../dropout_mask.h"
#include "../grouped_lora.h"

namespace d9d {
namespace {

// out = x * keep * scale, and with kBackward grad *= keep * scale, for rows [0, x.size(0)) of a block whose first
// row is row0 of the op's input.
template <bool kBackward>
void dropout_rows(const at::Tensor& x, const at::Tensor& out, const at::Tensor* grad, int64_t row0,
                  const DropoutSpec& spec) {
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  const int64_t groups = (cols + kMaskGroup - 1) / kMaskGroup;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_lora_dropout_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    scalar_t* grad_data = kBackward ? grad->mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t scale = static_cast<acc_t>(spec.scale);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t group = 0; group < groups; ++group) {
          const MaskBits bits = mask_bits(spec.seed, row0 + row, group);
          const int64_t col0 = group * kMaskGroup;
          const int64_t n = std::min(kMaskGroup, cols - col0);
          const int64_t offset = row * cols + col0;
          for (int64_t lane = 0; lane < n; ++lane) {
            const acc_t keep = bits.keep(static_cast<int>(lane), spec.threshold) ? scale : acc_t(0);
            dst[offset + lane] = static_cast<scalar_t>(static_cast<acc_t>(src[offset + lane]) * keep);
            if constexpr (kBackward) {
              grad_data[offset + lane] = static_cast<scalar_t>(static_cast<acc_t>(grad_data[offset + lane]) * keep);
            }
          }
        }
      }
    });
  });
}

void dropout_rows_cpu(const at::Tensor& x, const at::Tensor& out, int64_t row0, const DropoutSpec& spec) {
  dropout_rows<false>(x, out, nullptr, row0, spec);
}

void dropout_rows_backward_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad, int64_t row0,
                               const DropoutSpec& spec) {
  dropout_rows<true>(x, out, &grad, row0, spec);
}

// Blocks of 512 KiB of float32: a block of x and one of dy fit a core's L2 cache together; the GEMMs of a block
// run on all threads (MKL), the mask pass in parallel over rows.
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
