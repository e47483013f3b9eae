// The CPU's skinny GEMMs and fold for the LoRA ops (see SkinnyKernels in ../lora.h).
#pragma once

#include "../lora.h"

namespace d9d {

// float32 kernels on the vectorized build of the running CPU (AVX-512, AVX2, NEON); `supports` is false for other
// dtypes and for x86's plain DEFAULT build, and the ops then use ATen's GEMMs.
extern const SkinnyKernels kCpuSkinnyKernels;

}  // namespace d9d
