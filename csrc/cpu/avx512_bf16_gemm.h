// bfloat16 skinny GEMMs on AVX512_BF16 (vdpbf16ps), for CPUs without AMX (see SkinnyKernels in ../lora.h).
#pragma once

#include "../lora.h"

namespace d9d {

// Whether the kernels run here: an x86-64 CPU with AVX512_BF16 under ATen's AVX512 capability (so
// ATEN_CPU_CAPABILITY=avx2 or default turns them off, with ATen's AVX-512 kernels). Decided once per process.
bool avx512_bf16_available();

// The kernels (bfloat16 x, float32 sums); call only where avx512_bf16_available().
extern const SkinnyKernels kAvx512Bf16SkinnyKernels;

}  // namespace d9d
