// bfloat16 skinny GEMMs on Intel AMX (see SkinnyKernels in ../lora.h).
#pragma once

#include "../lora.h"

namespace d9d {

// Whether the bfloat16 kernels run here: an x86-64 CPU with AMX-TILE and AMX-BF16 whose OS grants this process the
// tile state, under ATen's AVX512 capability (so ATEN_CPU_CAPABILITY=avx2 or default turns them off, with ATen's
// AVX-512 kernels; oneDNN follows ONEDNN_MAX_CPU_ISA instead). Decided once per process.
bool amx_bf16_available();

// The kernels (bfloat16 x, float32 sums); call only where amx_bf16_available().
extern const SkinnyKernels kAmxSkinnyKernels;

}  // namespace d9d
