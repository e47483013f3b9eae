// CPU kernels: the dropout mask passes (parallel over rows with at::parallel_for) and the CPU registrations.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "../dropout_mask.h"
#include "../dropout_rows.h"
#include "../lora.h"
#include "skinny_gemm.h"
#include "vec_kernels.h"

namespace d9d {
namespace {

// Groups of 8 columns whose mask bits are drawn in one batch (2048 columns, 4 KiB of bits on the stack).
constexpr int64_t kBatchGroups = 256;

// Calls body(row, col0, n, draws) for blocks of up to 2048 columns of rows [0, rows), in parallel over rows;
// draws[c] is the 16-bit draw of column col0 + c (see dropout_mask.h: in little-endian order, the 16-bit halves of
// the Philox words of consecutive groups line up with consecutive columns).
template <typename Body>
void for_each_block(int64_t rows, int64_t cols, int64_t row0, uint64_t seed, const Body& body) {
  const int64_t groups = (cols + kMaskGroup - 1) / kMaskGroup;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  const cpu::VecKernels& kernels = cpu::vec_kernels();
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[4 * kBatchGroups];
    const auto* draws = reinterpret_cast<const uint16_t*>(words);
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t group0 = 0; group0 < groups; group0 += kBatchGroups) {
        const int64_t count = std::min(kBatchGroups, groups - group0);
        kernels.philox_batch(seed, row0 + row, group0, count, words);
        const int64_t col0 = group0 * kMaskGroup;
        body(row, col0, std::min(count * kMaskGroup, cols - col0), draws);
      }
    }
  });
}

// out[c] = x[c] * keep * scale for one span of a row, where keep = (draws[c] >= threshold).
template <typename scalar_t, typename acc_t>
void dropout_span(const scalar_t* x, scalar_t* out, const uint16_t* draws, int64_t n, uint32_t threshold,
                  acc_t scale) {
  for (int64_t c = 0; c < n; ++c) {
    out[c] = static_cast<scalar_t>(static_cast<acc_t>(x[c]) * (draws[c] >= threshold ? scale : acc_t(0)));
  }
}

// The same and grad[c] *= keep * scale, in one pass.
template <typename scalar_t, typename acc_t>
void dropout_backward_span(const scalar_t* x, scalar_t* out, scalar_t* grad, const uint16_t* draws, int64_t n,
                           uint32_t threshold, acc_t scale) {
  for (int64_t c = 0; c < n; ++c) {
    const acc_t keep = draws[c] >= threshold ? scale : acc_t(0);
    out[c] = static_cast<scalar_t>(static_cast<acc_t>(x[c]) * keep);
    grad[c] = static_cast<scalar_t>(static_cast<acc_t>(grad[c]) * keep);
  }
}

// float32 and bfloat16 overloads of the two, on the vectorized build of the running CPU.
void dropout_span(const float* x, float* out, const uint16_t* draws, int64_t n, uint32_t threshold, float scale) {
  cpu::vec_kernels().dropout_span(x, out, draws, n, threshold, scale);
}

void dropout_backward_span(const float* x, float* out, float* grad, const uint16_t* draws, int64_t n,
                           uint32_t threshold, float scale) {
  cpu::vec_kernels().dropout_backward_span(x, out, grad, draws, n, threshold, scale);
}

void dropout_span(const c10::BFloat16* x, c10::BFloat16* out, const uint16_t* draws, int64_t n, uint32_t threshold,
                  float scale) {
  cpu::vec_kernels().dropout_span_bf16(x, out, draws, n, threshold, scale);
}

void dropout_backward_span(const c10::BFloat16* x, c10::BFloat16* out, c10::BFloat16* grad, const uint16_t* draws,
                           int64_t n, uint32_t threshold, float scale) {
  cpu::vec_kernels().dropout_backward_span_bf16(x, out, grad, draws, n, threshold, scale);
}

}  // namespace

// The CPU has no caching allocator: a fresh weight-sized tensor per call would fault in every page of it again (on
// the benchmark's 16 MiB weight, as long as the fold itself). Like MKL's packing buffers, the scratch is kept per
// thread and per dtype, grown to the largest weight so far.
at::Tensor cpu_weight_scratch(const at::Tensor& weight) {
  thread_local std::array<at::Tensor, static_cast<size_t>(at::ScalarType::NumOptions)> scratch;
  at::Tensor& buffer = scratch[static_cast<size_t>(weight.scalar_type())];
  if (!buffer.defined() || buffer.numel() < weight.numel()) {
    buffer = at::Tensor();  // free the old one first
    // A normal tensor even when this call runs under inference mode: an inference tensor could not be written by
    // later calls outside it.
    const c10::InferenceMode normal_tensors(false);
    buffer = at::empty({weight.numel()}, weight.options());
  }
  return buffer.narrow(0, 0, weight.numel()).view(weight.sizes());
}

namespace {

// out = x * keep * scale, and with `bits` (cols / 8 bytes a row, cols a multiple of 8) keep as bits too.
void drop_rows(const at::Tensor& x, const at::Tensor& out, uint8_t* bits, int64_t row0, const DropoutSpec& spec) {
  const int64_t cols = x.size(1);
  const cpu::VecKernels& vec = cpu::vec_kernels();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(spec.scale);
    const uint32_t threshold = spec.threshold;
    for_each_block(x.size(0), cols, row0, spec.seed, [&](int64_t row, int64_t col0, int64_t n, const uint16_t* draws) {
      dropout_span(src + row * cols + col0, dst + row * cols + col0, draws, n, threshold, scale);
      if (bits != nullptr) {
        vec.keep_bits(draws, n, threshold, bits + (row * cols + col0) / 8);  // col0: a multiple of 8 columns
      }
    });
  });
}

}  // namespace

void dropout_rows_cpu(const at::Tensor& x, const at::Tensor& out, int64_t row0, const DropoutSpec& spec) {
  drop_rows(x, out, /*bits=*/nullptr, row0, spec);
}

void dropout_rows_backward_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad, int64_t row0,
                               const DropoutSpec& spec) {
  const int64_t cols = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_rows_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    scalar_t* grad_data = grad.mutable_data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(spec.scale);
    const uint32_t threshold = spec.threshold;
    for_each_block(x.size(0), cols, row0, spec.seed, [&](int64_t row, int64_t col0, int64_t n, const uint16_t* draws) {
      const scalar_t* s = src + row * cols + col0;
      scalar_t* d = dst + row * cols + col0;
      scalar_t* g = grad_data + row * cols + col0;
      dropout_backward_span(s, d, g, draws, n, threshold, scale);
    });
  });
}

namespace {

void mask_rows_cpu(const at::Tensor& mask, const DropoutSpec& spec) {
  const int64_t cols = mask.size(1);
  bool* dst = mask.mutable_data_ptr<bool>();
  const uint32_t threshold = spec.threshold;
  for_each_block(mask.size(0), cols, 0, spec.seed, [&](int64_t row, int64_t col0, int64_t n, const uint16_t* draws) {
    bool* d = dst + row * cols + col0;
    for (int64_t c = 0; c < n; ++c) {
      d[c] = draws[c] >= threshold;
    }
  });
}

void dropout_rows_keep_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& keep, int64_t row0,
                           const DropoutSpec& spec) {
  const int64_t cols = x.size(1);
  TORCH_INTERNAL_ASSERT(cols % 8 == 0 && keep.scalar_type() == at::kByte && keep.is_contiguous() &&
                        keep.size(0) == x.size(0) && keep.size(1) == cols / 8);
  drop_rows(x, out, keep.mutable_data_ptr<uint8_t>(), row0, spec);
}

// One parallel region for all blocks: each thread runs its share of blocks with single-threaded GEMMs (MKL and
// oneDNN do not nest inside a parallel region), which keeps a block in that core's cache and avoids a fork/join per
// block.
void for_each_block_cpu(int64_t rows, int64_t step, BlockBody body) {
  const int64_t blocks = (rows + step - 1) / step;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // OpenMP workers do not inherit the caller's dispatch state: skip autograd as the calling kernel does.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t worker = at::get_thread_num();
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row0 = block * step;
      body(row0, std::min(step, rows - row0), worker);
    }
  });
}

int64_t max_workers_cpu() {
  return at::get_num_threads();
}

// Blocks of 512 KiB of float32: a block of x and one of dy fit a core's L2 cache together (the skinny kernels take
// smaller ones; see skinny_gemm.cpp). bfloat16 blocks hold 4x the elements, 1 MiB: each of its library GEMMs (oneDNN
// on AMX) costs more per call than MKL's float32 one, and the larger blocks ran the bfloat16 LoRA step with dropout
// 9-18% (forward) and 15-27% (backward) faster on the AVX-512 Xeon of BENCHMARKS.md; float32 did not change.
constexpr DeviceKernels kCpuKernels{dropout_rows_cpu,
                                    dropout_rows_backward_cpu,
                                    mask_rows_cpu,
                                    dropout_rows_keep_cpu,
                                    1 << 17,
                                    /*bf16=*/1 << 19,
                                    for_each_block_cpu,
                                    max_workers_cpu,
                                    cpu_skinny_kernels_for,
                                    cpu_weight_scratch,
                                    /*whole_products=*/true};

at::Tensor lora_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout,
                            const at::Tensor& seed) {
  return lora_forward(kCpuKernels, x, weight, bias, lora_A, lora_B, scale, dropout, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                 const at::Tensor& weight, const at::Tensor& lora_A,
                                                                 const at::Tensor& lora_B, double scale, double dropout,
                                                                 const at::Tensor& seed, bool need_grad_x) {
  return lora_backward(kCpuKernels, grad_y, x, weight, lora_A, lora_B, scale, dropout, seed, need_grad_x);
}

at::Tensor dora_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const at::Tensor& factor, double scale) {
  return dora_forward(kCpuKernels, x, weight, bias, lora_A, lora_B, factor, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& factor, double scale, bool need_grad_x) {
  return dora_backward(kCpuKernels, grad_y, x, y, weight, bias, lora_A, lora_B, factor, scale, need_grad_x);
}

at::Tensor dropout_mask_cpu(const at::Tensor& x, double dropout, const at::Tensor& seed) {
  return dropout_mask(kCpuKernels, x, dropout, seed);
}

}  // namespace
}  // namespace d9d

TORCH_LIBRARY_IMPL(d9d, CPU, m) {
  m.impl("lora_forward", &d9d::lora_forward_cpu);
  m.impl("lora_backward", &d9d::lora_backward_cpu);
  m.impl("dropout_mask", &d9d::dropout_mask_cpu);
  m.impl("dora_forward", &d9d::dora_forward_cpu);
  m.impl("dora_backward", &d9d::dora_backward_cpu);
}
