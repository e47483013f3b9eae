// The dropout passes over a block of rows, defined once per device (cpu/lora_cpu.cpp, cuda/lora_cuda.cu) and shared
// by the 2-D and the grouped ops. x, out and grad are 2-D and row-major contiguous; row0 is the row of the op's whole
// input that the block starts at, which keys the mask (dropout_mask.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "lora.h"

namespace d9d {

// out = x * keep * scale.
void dropout_rows_cpu(const at::Tensor& x, const at::Tensor& out, int64_t row0, const DropoutSpec& spec);
// The same, and grad *= keep * scale, in one pass over the mask.
void dropout_rows_backward_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad, int64_t row0,
                               const DropoutSpec& spec);

void dropout_rows_cuda(const at::Tensor& x, const at::Tensor& out, int64_t row0, const DropoutSpec& spec);
void dropout_rows_backward_cuda(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad, int64_t row0,
                                const DropoutSpec& spec);

}  // namespace d9d
