// Picks the build of the vectorized kernels for the running CPU, from ATen's own choice of capability.
#include <ATen/Version.h>

#include <string>

#include "vec_kernels.h"

namespace d9d::cpu {

const VecKernels& vec_kernels() {
  // at::get_cpu_capability() honours ATEN_CPU_CAPABILITY, so one variable switches ATen's kernels and ours alike.
  static const VecKernels& kernels = []() -> const VecKernels& {
    const std::string capability = at::get_cpu_capability();
#ifdef D9D_X86_CAPABILITIES
    if (capability == "AVX512") {
      return AVX512::kVecKernels;
    }
    if (capability == "AVX2") {
      return AVX2::kVecKernels;
    }
#endif
    return DEFAULT::kVecKernels;  // also aarch64 (NEON), whatever its SVE level
  }();
  return kernels;
}

}  // namespace d9d::cpu
