// The CPU's skinny GEMMs for the LoRA backward (see SkinnyKernels in ../lora.h).
#pragma once

#include "../lora.h"

namespace d9d {

// AVX-512 float32 kernels; `supports` is false on other CPUs and dtypes, and the backward then uses ATen's GEMMs.
extern const SkinnyKernels kCpuSkinnyKernels;

}  // namespace d9d
