// The tensor-level calls of the bfloat16 skinny kernels (amx_gemm.cpp, avx512_bf16_gemm.cpp): each family's raw
// kernels on bfloat16 arrays, behind one check of the operands as the LoRA ops pass them (see SkinnyKernels in
// ../lora.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace d9d {

// out (n x rp, rows ldo apart) = p (n x depth, rows ldp apart) q (depth x rp, contiguous), rp % 16 == 0.
using Bf16MmKernel = void (*)(const uint16_t* p, int64_t ldp, int64_t n, int64_t depth, const uint16_t* q,
                              int64_t rp, uint16_t* out, int64_t ldo);
// acc (rp x depth, float32, contiguous) += q^T p for p (n x depth, rows ldp apart) and q (n x rp, contiguous),
// rp % 16 == 0.
using Bf16AccumulateKernel = void (*)(const uint16_t* p, int64_t ldp, int64_t n, int64_t depth, const uint16_t* q,
                                      int64_t rp, float* acc);

// q (width x r, rows ldq apart, r even) interleaved by pairs of columns into packed: depth / 2 rows of width_pad
// 32-bit pairs (q[j][2i], q[j][2i + 1]), zero beyond r and width.
using InterleaveRowsKernel = void (*)(const uint16_t* q, int64_t ldq, int64_t width, int64_t r, int64_t depth,
                                      int64_t width_pad, uint32_t* packed);
// out (n x width, rows ldo apart) = scale p q^T + bias for p (n x depth, rows ldp apart; depth even) and q packed by
// an InterleaveRowsKernel (width_pad columns, a multiple of 32); bias float32 (width) or nullptr.
using Bf16ExpandKernel = void (*)(const uint16_t* p, int64_t ldp, int64_t n, int64_t depth, const uint32_t* packed,
                                  int64_t width, int64_t width_pad, float scale, const float* bias, uint16_t* out,
                                  int64_t ldo);

// t's data as bfloat16 bits.
inline const uint16_t* bf16_data(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); }

// SkinnyKernels::mm on `kernel`, after checking p (a block of rows, columns contiguous), q and out; `what` names the
// kernel in the error, which is a bug (these are internal calls).
void call_bf16_mm(const char* what, Bf16MmKernel kernel, const at::Tensor& p, const at::Tensor& q,
                  const at::Tensor& out);

// SkinnyKernels::accumulate with transposed sums (acc is rp x depth) on `kernel`, after the same checks.
void call_bf16_accumulate(const char* what, Bf16AccumulateKernel kernel, const at::Tensor& p, const at::Tensor& q,
                          const at::Tensor& acc);

// SkinnyKernels::pack_expand on `kernel`: q (width x r, r <= depth) as an int32 tensor of depth / 2 rows of width_pad
// pairs, for depths that are even, positive and at most max_depth.
at::Tensor pack_bf16_expand(const char* what, InterleaveRowsKernel kernel, const at::Tensor& q, int64_t depth,
                            int64_t max_depth);

// SkinnyKernels::expand on `kernel`, after checking p, packed (from pack_bf16_expand), bias and out.
void call_bf16_expand(const char* what, Bf16ExpandKernel kernel, const at::Tensor& p, const at::Tensor& packed,
                      double scale, const at::Tensor& bias, const at::Tensor& out);

}  // namespace d9d
