// The base GEMM of the bfloat16 LoRA ops on AVX512_BF16 CPUs without AMX (SkinnyKernels::accumulate_base).
#pragma once

#include <ATen/core/Tensor.h>

namespace d9d {

// out (m x n, bfloat16) += a (m x k) op(weight), with op(weight) = weight^T (weight n x k) if `transposed`, else weight
// (k x n), the sum rounded to bfloat16 once, on oneDNN's brgemm micro-kernel (ATen's cpublas::brgemm). Returns false,
// having touched nothing, where it does not take these operands or cannot run here: then ATen's addmm_ runs.
bool bf16_accumulate_base(const at::Tensor& a, const at::Tensor& weight, bool transposed, const at::Tensor& out);

}  // namespace d9d
