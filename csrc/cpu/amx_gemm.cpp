// The bfloat16 skinny products of the LoRA ops on Intel AMX (kAmxSkinnyKernels, see amx_gemm.h).
//
// oneDNN runs these N x r shapes on AMX too, but at a fraction of its rate on the base GEMMs: on the Xeon of
// BENCHMARKS.md, 45 to 130 G multiply-adds/s against about 900 G, and the reductions over rows (dA, dB) slowest.
// Here a block of rows meets its panel in the tile registers straight from memory or after one repacking in cache.
// The products' reductions, the slowest part, ran 1.5 to 2.1x faster (the backward without dx, 2048 rows, r = 16).
//
// One tdpbf16ps multiplies a 16 x 32 tile of bfloat16 by a 32 x 16 one, the second stored as pairs of rows
// interleaved ("VNNI": row i holds (b[2i][j], b[2i+1][j]) for j < 16), into a 16 x 16 tile of float32 sums.
//   mm:         out = p q: tiles of p's rows as they are, q (depth x rp, small) interleaved once per call.
//   accumulate: acc^T += q^T p, with q^T (rp x n, small) as the first operand and p interleaved in cache, 32 rows
//               by 16 columns at a time. The sums are rp x depth (SkinnyKernels::transposed_sums), so their tiles
//               load and store as they are.
//   expand:     out = scale p q^T + bias, the LoRA term (y from xa, dx's part from g): p's rows (depth <= 32) as
//               they are, q interleaved once per op; scale and bias applied in float32 before the one rounding.
#include "amx_gemm.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_operands.h"
#include "vec_kernels.h"

// The AMX intrinsics and target need GCC 11 or Clang 12 (Clang also defines __GNUC__, as 4).
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define D9D_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace d9d {

#ifdef D9D_AMX
namespace {

// Whether the CPU has AMX-TILE and AMX-BF16, the OS saves the tile state (XCR0 bits 17 and 18), and Linux lets this
// process use it (arch_prctl ARCH_REQ_XCOMP_PERM; oneDNN asks the same, and asking twice is harmless).
bool cpu_and_os_grant_amx() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0 || (ecx & (1u << 27)) == 0) {  // OSXSAVE
    return false;
  }
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0 || (edx & (1u << 24)) == 0 || (edx & (1u << 22)) == 0) {
    return false;  // AMX-TILE, AMX-BF16
  }
  uint32_t xcr0_low = 0, xcr0_high = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  if (((xcr0_low >> 17) & 3u) != 3u) {
    return false;
  }
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace

bool amx_bf16_available() {
  static const bool available =
      std::strcmp(cpu::vec_kernels().capability, "AVX512") == 0 && cpu_and_os_grant_amx();
  return available;
}

namespace {

// The kernels below are compiled for AVX-512 and AMX and run only where amx_bf16_available().
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,amx-tile,amx-bf16"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,amx-tile,amx-bf16")
#endif

constexpr int64_t kTile = 16;   // rows of every tile, and float32 columns of a sums tile
constexpr int64_t kDepth = 32;  // bfloat16 columns of a first-operand tile: the depth of one tdpbf16ps

// Palette 1 with all eight tiles 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Loads the configuration for this thread's tile work and releases the tiles at the end of the scope (an OpenMP
// worker's tile state is its own; released, it costs nothing on a context switch).
class Tiles {
 public:
  Tiles() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

#include "bf16_pairs.h"

// The first `rows` rows of a 32 x 32 float32 sums buffer, columns [0, cols), rounded to bfloat16 into out.
void store_rows_bf16(const float* sums, int64_t rows, int64_t cols, uint16_t* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; j += kTile) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * ldo + j), to_bf16(_mm512_loadu_ps(sums + i * 32 + j)));
    }
  }
}

// out (n x rp, rows ldo apart) = p (n x depth, rows ldp apart) q (depth x rp, contiguous), rp % 16 == 0.
// Tiles: sums 0-3 (two rows of tiles by up to two columns), p 4-5, q 6-7; 32 rows and 32 columns at a time.
void amx_mm(const uint16_t* p, int64_t ldp, int64_t n, int64_t depth, const uint16_t* q, int64_t rp, uint16_t* out,
            int64_t ldo) {
  const int64_t depth_pad = round_up(std::max<int64_t>(depth, 1), kDepth);
  thread_local std::vector<uint16_t> packed_q;
  thread_local std::vector<uint16_t> padded_rows;
  packed_q.resize(depth_pad * rp);
  interleave_panel(q, depth, rp, depth_pad, packed_q.data());
  const uint16_t* qv = packed_q.data();
  alignas(64) float sums[32 * 32];
  const Tiles tiles;
  for (int64_t row0 = 0; row0 < n; row0 += 32) {
    const int64_t m = std::min<int64_t>(32, n - row0);
    const uint16_t* rows = p + row0 * ldp;
    int64_t ld = ldp;
    if (m < 32 || depth % kDepth != 0) {
      // A tile reads 32 columns of 32 rows: copy a partial block into zeros rather than read past p.
      padded_rows.assign(32 * depth_pad, 0);
      for (int64_t i = 0; i < m; ++i) {
        std::memcpy(padded_rows.data() + i * depth_pad, rows + i * ldp, depth * sizeof(uint16_t));
      }
      rows = padded_rows.data();
      ld = depth_pad;
    }
    const int64_t p_stride = ld * 2;
    const int64_t q_stride = rp * 4;
    for (int64_t col0 = 0; col0 < rp; col0 += 32) {
      const bool two = rp - col0 > kTile;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < depth_pad; k += kDepth) {
        _tile_loadd(4, rows + k, p_stride);
        _tile_loadd(5, rows + kTile * ld + k, p_stride);
        _tile_loadd(6, qv + k * rp + 2 * col0, q_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
          _tile_loadd(7, qv + k * rp + 2 * (col0 + kTile), q_stride);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, sums, 32 * 4);
      _tile_stored(1, sums + kTile * 32, 32 * 4);
      if (two) {
        _tile_stored(2, sums + kTile, 32 * 4);
        _tile_stored(3, sums + kTile * 32 + kTile, 32 * 4);
      }
      store_rows_bf16(sums, m, two ? 32 : kTile, out + row0 * ldo + col0, ldo);
    }
  }
}

// acc (rp x depth, float32, contiguous) += q^T p for p (n x depth, rows ldp apart) and q (n x rp, contiguous),
// rp % 16 == 0. Tiles: sums 0-3 (up to two rows of tiles by two columns), q^T 4-5, p 6-7; 32 columns of p at a time,
// over all rows, 32 rows per step.
void amx_accumulate(const uint16_t* p, int64_t ldp, int64_t n, int64_t depth, const uint16_t* q, int64_t rp,
                    float* acc) {
  const int64_t n_pad = round_up(std::max<int64_t>(n, 1), kDepth);
  // q^T, zero beyond n: columns j and j + 1 of 16 rows come in one 32-bit gather, and split into their halves.
  thread_local std::vector<uint16_t> q_t;
  q_t.resize(rp * n_pad);
  const __m512i lanes = row_offsets(rp * 2);
  for (int64_t i = 0; i < n_pad; i += kTile) {
    const int64_t rows = std::clamp<int64_t>(n - i, 0, kTile);
    const __mmask16 valid = first_lanes(rows);
    for (int64_t j = 0; j < rp; j += 2) {
      const __m512i zero = _mm512_setzero_si512();
      const __m512i words = rows > 0 ? _mm512_mask_i32gather_epi32(zero, valid, lanes, q + i * rp + j, 1) : zero;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q_t.data() + j * n_pad + i), _mm512_cvtepi32_epi16(words));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q_t.data() + (j + 1) * n_pad + i),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(words, 16)));
    }
  }
  alignas(64) uint16_t packed[2][2][kTile * 32];  // two slots of two 16 x 32 tiles of p, interleaved
  const Tiles tiles;
  const int64_t acc_stride = depth * 4;
  for (int64_t row_of_acc = 0; row_of_acc < rp; row_of_acc += 32) {
    const bool two_rows = rp - row_of_acc > kTile;
    const uint16_t* qt = q_t.data() + row_of_acc * n_pad;
    float* sums = acc + row_of_acc * depth;
    for (int64_t col0 = 0; col0 < depth; col0 += 32) {
      const int64_t cols = std::min<int64_t>(32, depth - col0);
      // The sums of a partial tile go through a buffer: a tile of acc would reach past its columns.
      alignas(64) float partial[32 * 32];
      float* target = cols == 32 ? sums + col0 : partial;
      const int64_t target_stride = cols == 32 ? acc_stride : 32 * 4;
      if (cols < 32) {
        std::fill(partial, partial + 32 * 32, 0.0f);
        for (int64_t i = 0; i < (two_rows ? 32 : kTile); ++i) {
          std::memcpy(partial + i * 32, sums + i * depth + col0, cols * sizeof(float));
        }
      }
      _tile_loadd(0, target, target_stride);
      _tile_loadd(1, target + kTile, target_stride);
      if (two_rows) {
        _tile_loadd(2, target + kTile * (target_stride / 4), target_stride);
        _tile_loadd(3, target + kTile * (target_stride / 4) + kTile, target_stride);
      }
      const __mmask16 low = first_lanes(cols);
      const __mmask16 high = first_lanes(cols - kTile);
      // Rows [row0, row0 + 32) interleaved into packed[slot]: two tiles of 16 pairs of rows by 16 columns.
      const auto pack = [&](int64_t row0, int slot) {
        for (int64_t pair = 0; pair < kTile; ++pair) {
          const int64_t a_row = row0 + 2 * pair;
          const uint16_t* a = p + a_row * ldp + col0;
          const uint16_t* b = a + ldp;
          const bool has_a = a_row < n;
          const bool has_b = a_row + 1 < n;
          const __m256i a0 = has_a ? _mm256_maskz_loadu_epi16(low, a) : _mm256_setzero_si256();
          const __m256i b0 = has_b ? _mm256_maskz_loadu_epi16(low, b) : _mm256_setzero_si256();
          const __m256i a1 = has_a ? _mm256_maskz_loadu_epi16(high, a + kTile) : _mm256_setzero_si256();
          const __m256i b1 = has_b ? _mm256_maskz_loadu_epi16(high, b + kTile) : _mm256_setzero_si256();
          _mm512_store_si512(packed[slot][0] + pair * 32, interleave(a0, b0));
          _mm512_store_si512(packed[slot][1] + pair * 32, interleave(a1, b1));
        }
      };
      // A tile load waits for the stores to the memory it reads: the next rows are packed into the other slot
      // before the tiles load this one.
      pack(0, 0);
      for (int64_t row0 = 0, slot = 0; row0 < n; row0 += 32, slot ^= 1) {
        if (row0 + 32 < n) {
          pack(row0 + 32, slot ^ 1);
        }
        _tile_loadd(4, qt + row0, n_pad * 2);
        _tile_loadd(6, packed[slot][0], 64);
        _tile_loadd(7, packed[slot][1], 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two_rows) {
          _tile_loadd(5, qt + kTile * n_pad + row0, n_pad * 2);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, target, target_stride);
      _tile_stored(1, target + kTile, target_stride);
      if (two_rows) {
        _tile_stored(2, target + kTile * (target_stride / 4), target_stride);
        _tile_stored(3, target + kTile * (target_stride / 4) + kTile, target_stride);
      }
      if (cols < 32) {
        for (int64_t i = 0; i < (two_rows ? 32 : kTile); ++i) {
          std::memcpy(sums + i * depth + col0, partial + i * 32, cols * sizeof(float));
        }
      }
    }
  }
}

// out (n x width, rows ldo apart) = scale p q^T + bias for p (n x depth, rows ldp apart; depth even, at most 32) and
// q interleaved by interleave_rows (width_pad columns, a multiple of 32); bias float32 (width) or nullptr.
// Tiles: sums 0-3 (32 rows by 32 columns), p 4-5 (16 rows of depth), q 6-7 (depth / 2 rows).
void amx_expand(const uint16_t* p, int64_t ldp, int64_t n, int64_t depth, const uint32_t* packed, int64_t width,
                int64_t width_pad, float scale, const float* bias, uint16_t* out, int64_t ldo) {
  TileConfig config;
  config.colsb[4] = config.colsb[5] = static_cast<uint16_t>(depth * 2);
  config.rows[6] = config.rows[7] = static_cast<uint8_t>(depth / 2);
  _tile_loadconfig(&config);
  alignas(64) float sums[32 * 32];
  alignas(64) uint16_t tail[32 * 32];
  const __m512 scales = _mm512_set1_ps(scale);
  for (int64_t row0 = 0; row0 < n; row0 += 32) {
    const int64_t m = std::min<int64_t>(32, n - row0);
    const uint16_t* rows = p + row0 * ldp;
    int64_t ld = ldp;
    if (m < 32) {  // a tile reads 32 rows: copy the last ones into zeros rather than read past p
      std::fill(tail, tail + 32 * 32, uint16_t{0});
      for (int64_t i = 0; i < m; ++i) {
        std::memcpy(tail + i * 32, rows + i * ldp, depth * sizeof(uint16_t));
      }
      rows = tail;
      ld = 32;
    }
    _tile_loadd(4, rows, ld * 2);
    _tile_loadd(5, rows + kTile * ld, ld * 2);
    for (int64_t col0 = 0; col0 < width; col0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      _tile_loadd(6, packed + col0, width_pad * 4);
      _tile_loadd(7, packed + col0 + kTile, width_pad * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
      _tile_stored(0, sums, 32 * 4);
      _tile_stored(1, sums + kTile * 32, 32 * 4);
      _tile_stored(2, sums + kTile, 32 * 4);
      _tile_stored(3, sums + kTile * 32 + kTile, 32 * 4);
      for (int64_t half = 0; half < 32 && col0 + half < width; half += kTile) {
        const int64_t cols = std::min<int64_t>(kTile, width - col0 - half);
        const __mmask16 valid = first_lanes(cols);
        const __m512 shift = bias != nullptr ? _mm512_maskz_loadu_ps(valid, bias + col0 + half) : _mm512_setzero_ps();
        for (int64_t i = 0; i < m; ++i) {
          const __m512 v = _mm512_fmadd_ps(_mm512_load_ps(sums + i * 32 + half), scales, shift);
          _mm256_mask_storeu_epi16(out + (row0 + i) * ldo + col0 + half, valid, to_bf16(v));
        }
      }
    }
  }
  _tile_release();
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// `ahead` is not used: prefetching the next block slowed these kernels down (by 5 to 10% in the backward without dx).
void mm(const at::Tensor& p, const at::Tensor& q, const at::Tensor& out, MemorySpan /*ahead*/) {
  call_bf16_mm("amx mm", amx_mm, p, q, out);
}

void accumulate(const at::Tensor& p, const at::Tensor& q, const at::Tensor& acc, MemorySpan /*ahead*/) {
  call_bf16_accumulate("amx accumulate", amx_accumulate, p, q, acc);
}

// The depths that expand takes: p's columns, even, positive and at most one tile deep.
constexpr int64_t kMaxExpandDepth = 32;

at::Tensor pack_expand(const at::Tensor& q, int64_t depth) {
  return pack_bf16_expand("amx pack_expand", interleave_rows, q, depth, kMaxExpandDepth);
}

void expand(const at::Tensor& p, const at::Tensor& packed, double scale, const at::Tensor& bias,
            const at::Tensor& out) {
  call_bf16_expand("amx expand", amx_expand, p, packed, scale, bias, out);
}

// Both read p, which the block loop keeps in cache between the two.
void mm_accumulate(const at::Tensor& p, const at::Tensor& q, const at::Tensor& out, const at::Tensor& h,
                   const at::Tensor& acc, MemorySpan ahead) {
  mm(p, q, out, ahead);
  accumulate(p, h, acc, {});
}

}  // namespace

// Blocks of 512 KiB of bfloat16: a block of x and one of dy together take half of a core's L2 (the Xeon of
// BENCHMARKS.md has 2 MiB), and each call interleaves its panel once. Without dropout the backward takes these
// kernels from one block per worker (1024 x 1024 on that Xeon, 2 threads: even with oneDNN at 128 rows, 7% faster at
// 512). The forward without dropout computes xa in one oneDNN GEMM, which runs it as fast, and writes its LoRA term
// with expand where r is even (r odd: oneDNN, as xa has no zero column to pair the last one with).
const SkinnyKernels kAmxSkinnyKernels{kTile,
                                      1 << 18,
                                      32,
                                      /*min_blocks_per_worker=*/1,
                                      /*forward_without_dropout=*/false,
                                      /*transposed_sums=*/true,
                                      mm,
                                      accumulate,
                                      mm_accumulate,
                                      kMaxExpandDepth,
                                      pack_expand,
                                      expand,
                                      /*fold=*/nullptr,
                                      /*accumulate_base=*/nullptr,
                                      /*base_takes_term=*/nullptr,
                                      /*base_with_term=*/nullptr};

#else  // not x86-64 Linux with GCC 11 or Clang 12 and later

bool amx_bf16_available() { return false; }

const SkinnyKernels kAmxSkinnyKernels{16,      1 << 18, 32,      1,       false,  true,   nullptr, nullptr,
                                      nullptr, 0,       nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};

#endif

}  // namespace d9d
