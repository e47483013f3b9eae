// The base GEMM of the bfloat16 LoRA ops where the AVX512_BF16 kernels run (SkinnyKernels::accumulate_base and
// base_with_term).
#pragma once

#include <ATen/core/Tensor.h>

namespace d9d {

// out (m x n, bfloat16) += a (m x k) op(weight), with op(weight) = weight^T (weight n x k) if `transposed`, else weight
// (k x n), the sum rounded to bfloat16 once, on oneDNN's brgemm micro-kernel (ATen's cpublas::brgemm). Returns false,
// having touched nothing, where it does not take these operands or cannot run here: then ATen's addmm_ runs.
bool bf16_accumulate_base(const at::Tensor& a, const at::Tensor& weight, bool transposed, const at::Tensor& out);

// Whether bf16_base_with_term takes these operands, with a term of `depth` columns: as bf16_accumulate_base would,
// and depth even. Asked before the term is computed, so that the caller writes it where this path reads it.
bool bf16_base_takes_term(const at::Tensor& a, const at::Tensor& weight, bool transposed, int64_t depth);

// out (m x n, bfloat16) = a op(weight) + t op(term_weight) (+ bias), the LoRA term (t m x depth, term_weight in
// weight's layout: n x depth if `transposed`, else depth x n) as extra depth of the same brgemm sums, with bias float32
// (n) or undefined; out's contents are ignored, and the sum is rounded once. With `keep` defined (m x n / 8 uint8: bit
// c % 8 of byte c / 8 of a row keeps column c), the term is keep * keep_scale * t op(term_weight) (dx's LoRA part
// under dropout): summed first, masked in the tile's float32 sums, and the base GEMM adds onto it, still rounded
// once. Only where bf16_base_takes_term said so.
void bf16_base_with_term(const at::Tensor& a, const at::Tensor& weight, bool transposed, const at::Tensor& t,
                         const at::Tensor& term_weight, const at::Tensor& bias, const at::Tensor& keep,
                         double keep_scale, const at::Tensor& out);

// Whether bf16_accumulate_base runs here at all (for operands it takes): AVX512_BF16 under ATen's AVX512 capability,
// oneDNN enabled (torch.backends.mkldnn), and ATen's brgemm present and agreeing with a float64 reference on small
// operands of both layouts of W, checked once per process. The term as extra depth has its own such check, which
// bf16_base_takes_term asks too. Neither a nor t may overlap out.
bool bf16_base_gemm_runs();

}  // namespace d9d
