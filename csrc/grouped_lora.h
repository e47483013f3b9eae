// Grouped (per-expert) LoRA for Mixture-of-Experts weights: rows [offsets[e-1], offsets[e]) of x go to expert e,
// which applies W_e + s B_e A_e. The GEMMs go through ATen (MKL / cuBLAS), one expert and one block of rows at a
// time; the dropout passes are device-specific and come in through `GroupedKernels`.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#include "lora.h"

namespace d9d {

// What differs between devices. x, out and grad are 2-D row-major contiguous blocks of rows; `row0` is the row of x
// (the whole input of the op) where the block starts, so that element (row, col) is kept iff the 2-D ops'
// dropout_mask keeps it (dropout_mask.h).
struct GroupedKernels {
  // out = x * keep * scale.
  void (*dropout_rows)(const at::Tensor& x, const at::Tensor& out, int64_t row0, const DropoutSpec& spec);
  // out = x * keep * scale and grad *= keep * scale, in one pass over the mask.
  void (*dropout_rows_backward)(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad, int64_t row0,
                                const DropoutSpec& spec);
  // Rows are processed in blocks of about this many elements of the widest operand, so that a block of x (or dy)
  // is still in cache when the second LoRA GEMM reads it, and the dropped-out copy of x exists for one block only.
  int64_t block_elements;
};

// y (rows x out) with y_e = x_e W_e^T + s dropout(x_e) A_e^T B_e^T; rows past offsets[E-1] get zeros.
at::Tensor grouped_lora_forward(const GroupedKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets,
                                double scale, double dropout, const at::Tensor& seed);

// (grad_x, grad_weight, grad_A, grad_B); grad_weight is an empty tensor unless weight_grad. dropout(x_e) A_e^T is
// recomputed block by block and the mask regenerated, never stored.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward(
    const GroupedKernels& kernels, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets, double scale, double dropout,
    const at::Tensor& seed, bool weight_grad);

// W_e += s B_e A_e in place for every expert, accumulating into W_e (no E x out x in temporary).
void grouped_lora_merge(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

}  // namespace d9d
