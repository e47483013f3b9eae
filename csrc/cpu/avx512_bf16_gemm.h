// bfloat16 skinny GEMMs on AVX512_BF16 (vdpbf16ps), for CPUs without AMX (see SkinnyKernels in ../lora.h).
#pragma once

#include "../lora.h"

namespace d9d {

// Whether the kernels run here: an x86-64 CPU with AVX512_BF16 under ATen's AVX512 capability (so
// ATEN_CPU_CAPABILITY=avx2 or default turns them off, with ATen's AVX-512 kernels). Decided once per process.
bool avx512_bf16_available();

// The kernels (bfloat16 x, float32 sums); call only where avx512_bf16_available().
extern const SkinnyKernels kAvx512Bf16SkinnyKernels;

// The functions between the two are compiled for AVX-512 with AVX512_BF16 (GCC 10 or Clang 9 and later), to run only
// where avx512_bf16_available().
#if defined(__clang__)
#define D9D_AVX512_BF16_TARGET_BEGIN                                                                       \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma\"))), \
          apply_to = function)")
#define D9D_AVX512_BF16_TARGET_END _Pragma("clang attribute pop")
#else
#define D9D_AVX512_BF16_TARGET_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma\")")
#define D9D_AVX512_BF16_TARGET_END _Pragma("GCC pop_options")
#endif

}  // namespace d9d
