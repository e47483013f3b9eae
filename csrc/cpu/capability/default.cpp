// The DEFAULT build of the vectorized CPU kernels: the compiler's baseline target (SSE2 on x86-64, NEON on aarch64,
// where ATen's Vectorized<float> is a NEON vector).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "../vec_kernels_impl.h"
