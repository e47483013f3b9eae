// The AVX2 build of the vectorized CPU kernels (x86-64 only), with the instruction sets of ATen's own AVX2 build. The
// target is switched in the source rather than by per-file flags, so setup.py and CMake compile every file under
// csrc/ alike (see vec_kernels_prelude.h for what stays on the baseline target).
#include "../vec_kernels.h"

#ifdef D9D_X86_CAPABILITIES
#include "../vec_kernels_prelude.h"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
// GCC does not apply the target to lambdas in ATen's vector headers (unused here) and warns about their ABI.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx2,fma,f16c")
#endif
// The C++ front end preprocesses before the pragma takes effect, so the instruction-set macros that headers test
// (sleef.h declares its AVX2 / AVX-512 functions under them) are defined here by hand.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "../vec_kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
