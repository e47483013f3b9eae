// Headers that the per-capability builds include before switching the compiler's target (capability/avx2.cpp,
// capability/avx512.cpp). Their inline functions are then compiled for the baseline CPU in every build, so a copy
// that the linker keeps from an AVX-512 build can never run on a CPU without AVX-512. Only Vectorized and our kernels,
// which live in namespaces named after the capability, are compiled for the target.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ostream>
#include <type_traits>
