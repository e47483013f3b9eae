// The bodies of the VecKernels (vec_kernels.h), written once over at::vec::Vectorized<float>. Included only by the
// capability/*.cpp files, each of which defines CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and the matching
// CPU_CAPABILITY_* macro first, as ATen's per-capability builds of aten/src/ATen/native/cpu/ do: Vectorized<float>
// is then an AVX-512, AVX2, NEON (aarch64's default) or plain-array vector. Everything here lives in a namespace
// named after the capability, so the builds never share a symbol.
//
// The skinny GEMMs of the LoRA backward multiply a block of rows by a panel of r columns (padded to kPanel = 16), or
// reduce over the rows into such a panel. BLAS libraries run these shapes well below the core's FMA rate; holding a
// few rows of the panel product in registers and broadcasting the other operand runs them near it.
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<name>) before including vec_kernels_impl.h"
#endif

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec_kernels.h"

#define D9D_STRINGIFY_(name) #name
#define D9D_STRINGIFY(name) D9D_STRINGIFY_(name)

namespace d9d::cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kVecs = static_cast<int>(kPanel) / Vec::size();  // vectors per panel row
static_assert(kVecs >= 1 && kVecs * Vec::size() == kPanel, "a panel must be a whole number of vectors");

// Blocking per register file, so that accumulators, a panel row and a broadcast stay in registers:
//   panel_mm:          kMmRows * kVecs accumulators + kVecs panel vectors + 1 broadcast;
//   panel_accumulate:  kAccCols * kVecs accumulators + kVecs panel vectors + 1 broadcast;
//   fold_rows:         kFoldRows * kFoldVecs accumulators + kFoldVecs rows of A + 1 broadcast;
//   panel_mm_accumulate: kFuseRows * kVecs accumulators + as many held vectors of h + kVecs panel vectors + 2 kVecs
//                      partial sums + 1 broadcast (0: too few registers for it to pay; the two passes run instead).
// About 8 independent accumulators cover the FMA latency at two FMAs per cycle.
#if defined(CPU_CAPABILITY_AVX512)  // 32 registers of 16 floats
constexpr int kMmRows = 8, kAccCols = 16, kFoldRows = 4, kFoldVecs = 4, kFuseRows = 8;
#elif defined(CPU_CAPABILITY_AVX2)  // 16 registers of 8 floats
constexpr int kMmRows = 4, kAccCols = 6, kFoldRows = 4, kFoldVecs = 2, kFuseRows = 0;
#elif defined(__aarch64__)  // NEON: 32 registers of 4 floats
constexpr int kMmRows = 4, kAccCols = 6, kFoldRows = 4, kFoldVecs = 4, kFuseRows = 0;
#else  // plain arrays of 8 floats, which the compiler maps onto 16 SSE registers of 4
constexpr int kMmRows = 2, kAccCols = 2, kFoldRows = 2, kFoldVecs = 1, kFuseRows = 0;
#endif
static_assert(kBlockRowMultiple % kMmRows == 0 && (kFuseRows == 0 || kBlockRowMultiple % kFuseRows == 0),
              "blocks of rows must hold whole register tiles");

// Rows [i, n) left after the full tiles of R rows: at most one tile each of R / 2, R / 4, ..., 1 rows (R a power of
// two), so that a few leftover rows still run several accumulators rather than one row at a time.
template <int R, typename Tile>
inline void tail_tiles(int64_t i, int64_t n, const Tile& tile) {
  static_assert(R > 0 && (R & (R - 1)) == 0, "tiles of a power of two rows");
  if constexpr (R > 1) {
    constexpr int half = R / 2;
    if (i + half <= n) {
      tile(std::integral_constant<int, half>{}, i);
      i += half;
    }
    tail_tiles<half>(i, n, tile);
  }
}

// tile(rows, i) over rows [0, n): full tiles of R rows, then tail_tiles.
template <int R, typename Tile>
inline void row_tiles(int64_t n, const Tile& tile) {
  int64_t i = 0;
  for (; i + R <= n; i += R) {
    tile(std::integral_constant<int, R>{}, i);
  }
  tail_tiles<R>(i, n, tile);
}

// The epilogue of an expand's tile: out = scale * sums + bias (bias kPanel floats, or nullptr for none).
struct ScaleBias {
  float scale = 1.0f;
  const float* bias = nullptr;
};

// out[i, :kPanel] = sum_k p[i, k] q[k, :kPanel] for the R rows i starting at p (times and plus `epilogue`).
template <int R>
inline void rows_times_panel(const float* p, int64_t ldp, int64_t depth, const float* q, int64_t ldq, float* out,
                             int64_t ldo, Prefetch& ahead, const ScaleBias& epilogue = {}) {
  Vec acc[R][kVecs];
  for (int row = 0; row < R; ++row) {
    for (int v = 0; v < kVecs; ++v) {
      acc[row][v] = Vec(0.0f);
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    ahead.step();
    Vec qk[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      qk[v] = Vec::loadu(q + k * ldq + v * Vec::size());
    }
    for (int row = 0; row < R; ++row) {
      const Vec pk(p[row * ldp + k]);
      for (int v = 0; v < kVecs; ++v) {
        acc[row][v] = at::vec::fmadd(pk, qk[v], acc[row][v]);
      }
    }
  }
  if (epilogue.scale != 1.0f || epilogue.bias != nullptr) {
    const Vec scale(epilogue.scale);
    for (int v = 0; v < kVecs; ++v) {
      const Vec bias = epilogue.bias != nullptr ? Vec::loadu(epilogue.bias + v * Vec::size()) : Vec(0.0f);
      for (int row = 0; row < R; ++row) {
        acc[row][v] = at::vec::fmadd(acc[row][v], scale, bias);
      }
    }
  }
  for (int row = 0; row < R; ++row) {
    for (int v = 0; v < kVecs; ++v) {
      acc[row][v].store(out + row * ldo + v * Vec::size());
    }
  }
}

// acc[k, :kPanel] += sum_i p[i, k] q[i, :kPanel] for the J columns k starting at p, over `rows` rows (G of them when
// G > 0, a compile-time count that the compiler unrolls).
template <int J, int G>
inline void columns_times_panel(const float* p, int64_t ldp, int64_t rows, const float* q, int64_t ldq, float* acc,
                                int64_t lda, Prefetch& ahead) {
  Vec sums[J][kVecs];
  for (int col = 0; col < J; ++col) {
    for (int v = 0; v < kVecs; ++v) {
      sums[col][v] = Vec::loadu(acc + col * lda + v * Vec::size());
    }
  }
  const int64_t count = G > 0 ? G : rows;
#pragma GCC unroll 8
  for (int64_t i = 0; i < count; ++i) {
    ahead.step();
    Vec qi[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      qi[v] = Vec::loadu(q + i * ldq + v * Vec::size());
    }
    const float* pi = p + i * ldp;
    for (int col = 0; col < J; ++col) {
      const Vec pk(pi[col]);
      for (int v = 0; v < kVecs; ++v) {
        sums[col][v] = at::vec::fmadd(pk, qi[v], sums[col][v]);
      }
    }
  }
  for (int col = 0; col < J; ++col) {
    for (int v = 0; v < kVecs; ++v) {
      sums[col][v].store(acc + col * lda + v * Vec::size());
    }
  }
}

void panel_mm(const float* p, int64_t ldp, int64_t n, int64_t depth, const float* q, int64_t rp, float* out,
              int64_t ldo, Prefetch ahead) {
  ahead.pace((n + kMmRows - 1) / kMmRows * depth * (rp / kPanel));
  for (int64_t c = 0; c < rp; c += kPanel) {
    const auto tile = [&](auto rows, int64_t i) {
      rows_times_panel<decltype(rows)::value>(p + i * ldp, ldp, depth, q + c, rp, out + i * ldo + c, ldo, ahead);
    };
    row_tiles<kMmRows>(n, tile);
  }
}

// The panels of q walk down all rows of p in turn, as in panel_mm: a panel (depth x kPanel floats) and p's block stay
// in L1. A last panel that width cuts short goes through a buffer of whole panel rows. On the Zen 4 of BENCHMARKS.md
// (one thread) it ran the LoRA term's blocks (16 to 128 rows of r = 16, 1024 and 2816 wide) 1.6 to 2x as fast as
// MKL's calls, at about one AVX-512 FMA per cycle.
void panel_expand(const float* p, int64_t ldp, int64_t n, int64_t depth, const float* panels, int64_t width,
                  float scale, const float* bias, float* out, int64_t ldo) {
  Prefetch none;
  float short_bias[kPanel];
  float short_rows[kMmRows * kPanel];
  for (int64_t c = 0; c < width; c += kPanel) {
    const float* panel = panels + c * depth;
    const int64_t columns = std::min<int64_t>(kPanel, width - c);
    const float* panel_bias = bias == nullptr ? nullptr : bias + c;
    if (columns < kPanel && bias != nullptr) {
      std::fill(short_bias, short_bias + kPanel, 0.0f);
      std::copy(bias + c, bias + width, short_bias);
      panel_bias = short_bias;
    }
    row_tiles<kMmRows>(n, [&](auto rows, int64_t i) {
      constexpr int R = decltype(rows)::value;
      if (columns == kPanel) {
        rows_times_panel<R>(p + i * ldp, ldp, depth, panel, kPanel, out + i * ldo + c, ldo, none, {scale, panel_bias});
        return;
      }
      rows_times_panel<R>(p + i * ldp, ldp, depth, panel, kPanel, short_rows, kPanel, none, {scale, panel_bias});
      for (int row = 0; row < R; ++row) {
        std::copy(short_rows + row * kPanel, short_rows + row * kPanel + columns, out + (i + row) * ldo + c);
      }
    });
  }
}

// panel_accumulate takes the columns in chunks of kAccChunk, whose sums (kAccChunk x kPanel floats, 16 KiB) stay in
// L1, and within a chunk the rows kAccRows at a time: a tile of kAccCols columns keeps its sums in registers over
// kAccRows rows, loading and storing them once, so that fewer rows per tile spend more of the load ports on the
// sums. On the AVX-512 Xeon of BENCHMARKS.md, 32 rows ran the backward's dB pass 1.4x faster than 8 in the AVX512
// build and 1.15x in the AVX2 one (on the same CPU), and 64 no faster; NEON and the plain build take the same count,
// unmeasured.
constexpr int64_t kAccRows = 32;
constexpr int64_t kAccChunk = kAccCols * (256 / kAccCols);

// Columns [k0, k1) of acc += p^T q for the rows of p and q given (G of them when G > 0).
template <int G>
inline void accumulate_rows(const float* p, int64_t ldp, int64_t rows, int64_t k0, int64_t k1, const float* q,
                            int64_t rp, float* acc, Prefetch& ahead) {
  int64_t k = k0;
  for (; k + kAccCols <= k1; k += kAccCols) {
    columns_times_panel<kAccCols, G>(p + k, ldp, rows, q, rp, acc + k * rp, rp, ahead);
  }
  for (; k < k1; ++k) {
    columns_times_panel<1, G>(p + k, ldp, rows, q, rp, acc + k * rp, rp, ahead);
  }
}

void panel_accumulate(const float* p, int64_t ldp, int64_t n, int64_t depth, const float* q, int64_t rp,
                      float* acc, Prefetch ahead) {
  ahead.pace(n * ((depth + kAccCols - 1) / kAccCols) * (rp / kPanel));
  for (int64_t c = 0; c < rp; c += kPanel) {
    for (int64_t k0 = 0; k0 < depth; k0 += kAccChunk) {
      const int64_t k1 = std::min(depth, k0 + kAccChunk);
      int64_t i = 0;
      for (; i + kAccRows <= n; i += kAccRows) {
        accumulate_rows<kAccRows>(p + i * ldp, ldp, kAccRows, k0, k1, q + i * rp + c, rp, acc + c, ahead);
      }
      if (i < n) {
        accumulate_rows<0>(p + i * ldp, ldp, n - i, k0, k1, q + i * rp + c, rp, acc + c, ahead);
      }
    }
  }
}

// The register type under Vec, for arrays of vectors that must stay in registers: GCC keeps some arrays of the
// Vectorized class in memory (such as the two in the loop below), storing them on every iteration.
#if defined(CPU_CAPABILITY_AVX512)
using RawVec = __m512;
#else
using RawVec = Vec;  // unused: only the AVX512 build fuses
#endif

// For the R rows i starting at p and the columns k in [k0, k1): out[i, :kPanel] += sum_k p[i, k] q[k, :kPanel] (from
// zero when k0 == 0) and acc[k, :kPanel] += sum_i p[i, k] h[i, :kPanel]. Each element of p is broadcast once for both
// products, which panel_mm and panel_accumulate would broadcast once each; acc[k] is summed in two halves (even and
// odd rows) to halve its chain of dependent FMAs. For builds whose vector is a whole panel row (kVecs == 1): the
// rows' sums and h's rows take 2 R registers.
template <int R>
inline void rows_times_panel_and_back(const float* p, int64_t ldp, int64_t k0, int64_t k1, const float* q,
                                      int64_t ldq, float* out, int64_t ldo, const float* h, int64_t ldh, float* acc,
                                      int64_t lda, Prefetch& ahead) {
  static_assert(R > 0 && kVecs == 1, "one vector per panel row");
  RawVec sums[R];
  RawVec held[R];
  for (int row = 0; row < R; ++row) {
    sums[row] = k0 == 0 ? Vec(0.0f) : Vec::loadu(out + row * ldo);
    held[row] = Vec::loadu(h + row * ldh);
  }
  for (int64_t k = k0; k < k1; ++k) {
    ahead.step();
    const Vec qk = Vec::loadu(q + k * ldq);
    Vec even = Vec::loadu(acc + k * lda);
    Vec odd(0.0f);
    for (int row = 0; row < R; ++row) {
      const Vec pk(p[row * ldp + k]);
      sums[row] = at::vec::fmadd(pk, qk, Vec(sums[row]));
      if (row % 2 == 0) {
        even = at::vec::fmadd(pk, Vec(held[row]), even);
      } else {
        odd = at::vec::fmadd(pk, Vec(held[row]), odd);
      }
    }
    (even + odd).store(acc + k * lda);
  }
  for (int row = 0; row < R; ++row) {
    Vec(sums[row]).store(out + row * ldo);
  }
}

// panel_mm and panel_accumulate in one pass over p, in chunks of kAccChunk columns as in panel_accumulate (out holds
// the partial sums between chunks). Instantiated only for builds with kFuseRows > 0.
template <int kRows>
void panel_mm_accumulate(const float* p, int64_t ldp, int64_t n, int64_t depth, const float* q, int64_t rp,
                         float* out, int64_t ldo, const float* h, float* acc, Prefetch ahead) {
  ahead.pace((n + kRows - 1) / kRows * depth * (rp / kPanel));
  for (int64_t c = 0; c < rp; c += kPanel) {
    for (int64_t k0 = 0; k0 < depth; k0 += kAccChunk) {
      const int64_t k1 = std::min(depth, k0 + kAccChunk);
      const auto tile = [&](auto rows, int64_t i) {
        rows_times_panel_and_back<decltype(rows)::value>(p + i * ldp, ldp, k0, k1, q + c, rp, out + i * ldo + c, ldo,
                                                         h + i * rp + c, rp, acc + c, rp, ahead);
      };
      row_tiles<kRows>(n, tile);
    }
  }
}

using PanelMmAccumulate = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                                   const float*, float*, Prefetch);

constexpr PanelMmAccumulate fused_pass() {
  if constexpr (kFuseRows > 0) {
    return &panel_mm_accumulate<kFuseRows>;
  } else {
    return nullptr;
  }
}

// out[o, j] = weight[o, j] + sum_k sB[o, k] A[k, j] for the R rows o starting at `weight` / `sB` / `out`, and the
// U vectors of columns starting at j (U = 0: the scalar tail of `count` columns).
template <int R, int U>
inline void fold_tile(const float* weight, const float* sB, const float* A, int64_t r, int64_t in, int64_t j,
                      float* out) {
  Vec acc[R][U];
  for (int row = 0; row < R; ++row) {
    for (int u = 0; u < U; ++u) {
      acc[row][u] = Vec::loadu(weight + row * in + j + u * Vec::size());
    }
  }
  for (int64_t k = 0; k < r; ++k) {
    Vec a[U];
    for (int u = 0; u < U; ++u) {
      a[u] = Vec::loadu(A + k * in + j + u * Vec::size());
    }
    for (int row = 0; row < R; ++row) {
      const Vec b(sB[row * r + k]);
      for (int u = 0; u < U; ++u) {
        acc[row][u] = at::vec::fmadd(b, a[u], acc[row][u]);
      }
    }
  }
  for (int row = 0; row < R; ++row) {
    for (int u = 0; u < U; ++u) {
      acc[row][u].store(out + row * in + j + u * Vec::size());
    }
  }
}

template <int R>
inline void fold_row_group(const float* weight, const float* sB, const float* A, int64_t r, int64_t in, float* out) {
  int64_t j = 0;
  for (; j + kFoldVecs * Vec::size() <= in; j += kFoldVecs * Vec::size()) {
    fold_tile<R, kFoldVecs>(weight, sB, A, r, in, j, out);
  }
  for (; j + Vec::size() <= in; j += Vec::size()) {
    fold_tile<R, 1>(weight, sB, A, r, in, j, out);
  }
  for (; j < in; ++j) {  // fewer columns than a vector
    for (int row = 0; row < R; ++row) {
      float sum = weight[row * in + j];
      for (int64_t k = 0; k < r; ++k) {
        sum += sB[row * r + k] * A[k * in + j];
      }
      out[row * in + j] = sum;
    }
  }
}

void fold_rows(const float* weight, const float* sB, const float* A, int64_t r, int64_t in, int64_t begin,
               int64_t end, float* out) {
  int64_t o = begin;
  for (; o + kFoldRows <= end; o += kFoldRows) {
    fold_row_group<kFoldRows>(weight + o * in, sB + o * r, A, r, in, out + o * in);
  }
  for (; o < end; ++o) {
    fold_row_group<1>(weight + o * in, sB + o * r, A, r, in, out + o * in);
  }
}

// Philox4x32-10's multipliers and key increments (as in at::philox_engine).
constexpr uint32_t kMulA = 0xD2511F53;
constexpr uint32_t kMulB = 0xCD9E8D57;
constexpr uint32_t kKeyA = 0x9E3779B9;
constexpr uint32_t kKeyB = 0xBB67AE85;

// Philox4x32-10, lane-parallel over groups so that the compiler vectorizes it for builds without a hand-written
// version below (it does so poorly on x86: the 32 x 32 -> 64-bit products do not map onto 32-bit lanes).
inline void philox_batch_portable(uint64_t seed, int64_t row, int64_t group0, int64_t count,
                                  uint32_t* __restrict__ words) {
  const uint32_t key0 = static_cast<uint32_t>(seed);
  const uint32_t key1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t row_lo = static_cast<uint32_t>(static_cast<uint64_t>(row));
  const uint32_t row_hi = static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32);
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t group = static_cast<uint64_t>(group0 + j);
    uint32_t c0 = static_cast<uint32_t>(group);
    uint32_t c1 = static_cast<uint32_t>(group >> 32);
    uint32_t c2 = row_lo;
    uint32_t c3 = row_hi;
    uint32_t k0 = key0;
    uint32_t k1 = key1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(kMulA) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kMulB) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    words[4 * j] = c0;
    words[4 * j + 1] = c1;
    words[4 * j + 2] = c2;
    words[4 * j + 3] = c3;
  }
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Philox on x86 vectors of 32-bit lanes, one group per lane. The unsigned multiply of even lanes (vpmuludq) gives the
// 64-bit products of the even lanes, and of the odd lanes after a shuffle; their halves are shuffled back into 32-bit
// lanes. On the Xeon of BENCHMARKS.md this runs 2.7x (AVX-512) and 2.2x (AVX2) faster than philox_batch_portable.
namespace philox {
#if defined(CPU_CAPABILITY_AVX512)
using Lanes = __m512i;
constexpr int64_t kLanes = 16;
inline Lanes splat(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
inline Lanes first_lanes(uint32_t v) {
  return _mm512_add_epi32(splat(v), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}
inline Lanes xor3(Lanes a, Lanes b, Lanes c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
// The high and low words of a * k, lane by lane.
inline void multiply(Lanes a, Lanes k, Lanes& hi, Lanes& lo) {
  const Lanes even = _mm512_mul_epu32(a, k);                                      // 64-bit lane i: a[2i] k
  const Lanes odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), k);  // 64-bit lane i: a[2i + 1] k
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
}
inline Lanes unpacklo32(Lanes a, Lanes b) { return _mm512_unpacklo_epi32(a, b); }
inline Lanes unpackhi32(Lanes a, Lanes b) { return _mm512_unpackhi_epi32(a, b); }
inline Lanes unpacklo64(Lanes a, Lanes b) { return _mm512_unpacklo_epi64(a, b); }
inline Lanes unpackhi64(Lanes a, Lanes b) { return _mm512_unpackhi_epi64(a, b); }
template <int I>
inline __m128i chunk(Lanes v) {
  return _mm512_extracti32x4_epi32(v, I);
}
#else
using Lanes = __m256i;
constexpr int64_t kLanes = 8;
inline Lanes splat(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline Lanes first_lanes(uint32_t v) { return _mm256_add_epi32(splat(v), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
inline Lanes xor3(Lanes a, Lanes b, Lanes c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
inline void multiply(Lanes a, Lanes k, Lanes& hi, Lanes& lo) {
  const Lanes even = _mm256_mul_epu32(a, k);
  const Lanes odd = _mm256_mul_epu32(_mm256_shuffle_epi32(a, 0xF5), k);
  hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, 0xA0), 0xAA);
}
inline Lanes unpacklo32(Lanes a, Lanes b) { return _mm256_unpacklo_epi32(a, b); }
inline Lanes unpackhi32(Lanes a, Lanes b) { return _mm256_unpackhi_epi32(a, b); }
inline Lanes unpacklo64(Lanes a, Lanes b) { return _mm256_unpacklo_epi64(a, b); }
inline Lanes unpackhi64(Lanes a, Lanes b) { return _mm256_unpackhi_epi64(a, b); }
template <int I>
inline __m128i chunk(Lanes v) {
  return _mm256_extracti128_si256(v, I);
}
#endif

// Stores chunk I of the groups (4 groups of 4 words) in group-major order, from vectors q whose chunk I holds group
// 4 I + q.
template <int I>
inline void store_chunk(const Lanes (&groups)[4], uint32_t* words) {
  for (int q = 0; q < 4; ++q) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(words + 4 * (4 * I + q)), chunk<I>(groups[q]));
  }
}

// words[4 j + w] = word w of group j, from the words' lanes c0..c3: a 4 x 4 transpose within each 128-bit chunk.
inline void store_groups(Lanes c0, Lanes c1, Lanes c2, Lanes c3, uint32_t* words) {
  const Lanes t0 = unpacklo32(c0, c1), t1 = unpackhi32(c0, c1);
  const Lanes t2 = unpacklo32(c2, c3), t3 = unpackhi32(c2, c3);
  const Lanes groups[4] = {unpacklo64(t0, t2), unpackhi64(t0, t2), unpacklo64(t1, t3), unpackhi64(t1, t3)};
  store_chunk<0>(groups, words);
  store_chunk<1>(groups, words);
#if defined(CPU_CAPABILITY_AVX512)
  store_chunk<2>(groups, words);
  store_chunk<3>(groups, words);
#endif
}
}  // namespace philox

void philox_batch(uint64_t seed, int64_t row, int64_t group0, int64_t count, uint32_t* __restrict__ words) {
  using philox::Lanes;
  using philox::splat;
  constexpr int64_t kLanes = philox::kLanes;
  const uint64_t first = static_cast<uint64_t>(group0);
  // The lanes share the counter's high word; a batch whose groups cross a multiple of 2^32 (never, in practice)
  // takes the portable loop.
  if ((first >> 32) != ((first + static_cast<uint64_t>(count)) >> 32)) {
    philox_batch_portable(seed, row, group0, count, words);
    return;
  }
  uint32_t key0[10];
  uint32_t key1[10];
  for (int round = 0; round < 10; ++round) {
    key0[round] = static_cast<uint32_t>(seed) + static_cast<uint32_t>(round) * kKeyA;
    key1[round] = static_cast<uint32_t>(seed >> 32) + static_cast<uint32_t>(round) * kKeyB;
  }
  const Lanes mul_a = splat(kMulA);
  const Lanes mul_b = splat(kMulB);
  const Lanes high_word = splat(static_cast<uint32_t>(first >> 32));
  const Lanes row_lo = splat(static_cast<uint32_t>(static_cast<uint64_t>(row)));
  const Lanes row_hi = splat(static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32));
  const int64_t full = count / kLanes * kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    Lanes c0 = philox::first_lanes(static_cast<uint32_t>(first + static_cast<uint64_t>(j)));
    Lanes c1 = high_word;
    Lanes c2 = row_lo;
    Lanes c3 = row_hi;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      Lanes hi0, lo0, hi1, lo1;
      philox::multiply(c0, mul_a, hi0, lo0);
      philox::multiply(c2, mul_b, hi1, lo1);
      c0 = philox::xor3(hi1, c1, splat(key0[round]));
      c2 = philox::xor3(hi0, c3, splat(key1[round]));
      c1 = lo1;
      c3 = lo0;
    }
    philox::store_groups(c0, c1, c2, c3, words + 4 * j);
  }
  if (full < count) {
    philox_batch_portable(seed, row, group0 + full, count - full, words + 4 * full);
  }
}
#else
void philox_batch(uint64_t seed, int64_t row, int64_t group0, int64_t count, uint32_t* __restrict__ words) {
  philox_batch_portable(seed, row, group0, count, words);
}
#endif

// bfloat16 to float32 and back exactly as c10::BFloat16 converts (round to nearest even, NaN to 0x7FC0), but on the
// bits without a branch, so that the compiler vectorizes the loops below; float32 passes through.
inline float widen(float value) { return value; }
inline float widen(c10::BFloat16 value) { return c10::bit_cast<float>(static_cast<uint32_t>(value.x) << 16); }

template <typename T>
inline T narrow(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else {
    const uint32_t bits = c10::bit_cast<uint32_t>(value);
    const uint32_t rounded = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16;
    const bool nan = (bits & 0x7FFFFFFF) > 0x7F800000;
    return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0 : rounded), c10::BFloat16::from_bits());
  }
}

// Plain loops over 16-bit draws, which the compiler vectorizes for this build (in float32 arithmetic for bfloat16).
template <typename T>
void dropout_span(const T* __restrict__ x, T* __restrict__ out, const uint16_t* __restrict__ draws, int64_t n,
                  uint32_t threshold, float scale) {
  for (int64_t c = 0; c < n; ++c) {
    out[c] = narrow<T>(widen(x[c]) * (draws[c] >= threshold ? scale : 0.0f));
  }
}

template <typename T>
void dropout_backward_span(const T* __restrict__ x, T* __restrict__ out, T* __restrict__ grad,
                           const uint16_t* __restrict__ draws, int64_t n, uint32_t threshold, float scale) {
  for (int64_t c = 0; c < n; ++c) {
    const float keep = draws[c] >= threshold ? scale : 0.0f;
    out[c] = narrow<T>(widen(x[c]) * keep);
    grad[c] = narrow<T>(widen(grad[c]) * keep);
  }
}

void keep_bits(const uint16_t* __restrict__ draws, int64_t n, uint32_t threshold, uint8_t* __restrict__ bits) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if (threshold <= 0xFFFF) {  // 65536 (p within 2^-17 of 1) keeps nothing, which the loop below says
    const __m512i level = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(threshold)));
    for (; c + 32 <= n; c += 32) {
      const __mmask32 keep = _mm512_cmpge_epu16_mask(_mm512_loadu_si512(draws + c), level);
      std::memcpy(bits + c / 8, &keep, sizeof(keep));  // little-endian: column c + i is bit i
    }
  }
#endif
  for (; c < n; c += 8) {
    uint8_t byte = 0;
    for (int64_t i = 0; i < 8; ++i) {
      byte |= static_cast<uint8_t>(draws[c + i] >= threshold) << i;
    }
    bits[c / 8] = byte;
  }
}

}  // namespace

// Constant-initialized (function addresses only): no code of this build runs before the dispatch picks it.
extern const VecKernels kVecKernels{D9D_STRINGIFY(CPU_CAPABILITY),
                                    panel_mm,
                                    panel_accumulate,
                                    fused_pass(),
                                    fold_rows,
                                    philox_batch,
                                    dropout_span<float>,
                                    dropout_backward_span<float>,
                                    dropout_span<c10::BFloat16>,
                                    dropout_backward_span<c10::BFloat16>,
                                    keep_bits,
                                    panel_expand};

}  // namespace CPU_CAPABILITY
}  // namespace d9d::cpu
