// The CPU's skinny GEMMs and fold for the LoRA ops (see SkinnyKernels in ../lora.h).
#pragma once

#include "../lora.h"

namespace d9d {

// The skinny kernels for CPU tensors like x, or nullptr (ATen's GEMMs run instead): for float32 the vectorized build
// of the running CPU (AVX-512, AVX2, NEON; not x86's plain DEFAULT build), for bfloat16 AMX where it runs
// (amx_gemm.h).
const SkinnyKernels* cpu_skinny_kernels_for(const at::Tensor& x);

}  // namespace d9d
