// The CPU's skinny GEMMs and fold for the LoRA ops (see SkinnyKernels in ../lora.h).
#pragma once

#include "../lora.h"

namespace d9d {

// The skinny kernels for CPU tensors like x, or nullptr (ATen's GEMMs run instead): for float32 the vectorized build
// of the running CPU (AVX-512, AVX2, NEON; not x86's plain DEFAULT build), for bfloat16 AMX where it runs
// (amx_gemm.h), else AVX512_BF16 where that runs (avx512_bf16_gemm.h).
const SkinnyKernels* cpu_skinny_kernels_for(const at::Tensor& x);

// What runs the bfloat16 products in this process: "AMX", "AVX512_BF16" or "ATen". The environment variable
// D9D_CPU_BF16_KERNELS (amx, avx512_bf16 or aten, any case) caps it, as ONEDNN_MAX_CPU_ISA caps oneDNN, so that tests
// reach each kernel family on a CPU that runs more than one; unset, the best one here runs. Decided once per process.
const char* cpu_bf16_kernels();

// Scratch of weight's shape and dtype, kept per thread and dtype and valid until the next call on this thread (the
// float32 fold's folded weight, the bfloat16 base GEMM's packed weight; see lora_cpu.cpp).
at::Tensor cpu_weight_scratch(const at::Tensor& weight);

}  // namespace d9d
