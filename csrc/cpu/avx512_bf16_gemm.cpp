// The bfloat16 skinny products of the LoRA ops on AVX512_BF16 (kAvx512Bf16SkinnyKernels, see avx512_bf16_gemm.h),
// for CPUs that have it but no AMX (AMD Zen 4 and later, Intel Cooper Lake).
//
// oneDNN runs these N x r shapes at 40 to 65% of its rate on the base GEMMs there (on the Zen 4 of BENCHMARKS.md,
// one thread: 36 to 64 G multiply-adds/s against 97). One vdpbf16ps multiplies 16 pairs of bfloat16 by one pair
// broadcast from the other operand and adds them to 16 float32 sums:
//   mm:         out = p q: a pair of p's columns broadcast per row, 16 rows at a time (16 sums in registers), each
//               pair of q's rows (depth x rp, small) interleaved in registers.
//   accumulate: acc^T += q^T p, with pairs of p's rows interleaved in registers, 16 columns at a time, and q's pairs
//               broadcast from an interleaved copy (n x rp, small). The sums are rp x depth
//               (SkinnyKernels::transposed_sums), 16 rows of them in registers over all of p's rows.
//   expand:     the LoRA term (y = s xa B^T from xa, dx's part g A from g), a pair of p's columns broadcast per row
//               and 32 columns, 8 rows at a time (16 sums in registers), q's pairs packed once per call.
// Over all rows in one call (without dropout) oneDNN runs the LoRA term about as fast: that shape is bound by
// vdpbf16ps's throughput there (2 threads: 164 against 216 G multiply-adds/s on the base GEMMs). The op's blocks of
// rows (with dropout, and dx's part in the backward) call it once per block, where oneDNN's per-call costs add up:
// expand took 1 to 2 ms off a 1024 x 2816 layer's forward + backward at dropout 0.05 (2048 rows, r = 8 to 64).
#include "avx512_bf16_gemm.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_base_gemm.h"
#include "bf16_operands.h"
#include "vec_kernels.h"

// The AVX512_BF16 intrinsics and target need GCC 10 or Clang 9 (Clang also defines __GNUC__, as 4).
#if defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define D9D_AVX512_BF16 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace d9d {

#ifdef D9D_AVX512_BF16
namespace {

// Whether CPUID leaf 7, subleaf 1, reports AVX512_BF16 (EAX bit 5).
bool cpu_has_avx512_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0 || eax < 1) {  // eax: the highest subleaf
    return false;
  }
  __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx);
  return (eax & (1u << 5)) != 0;
}

}  // namespace

bool avx512_bf16_available() {
  static const bool available =
      std::strcmp(cpu::vec_kernels().capability, "AVX512") == 0 && cpu_has_avx512_bf16();
  return available;
}

namespace {

D9D_AVX512_BF16_TARGET_BEGIN

#include "bf16_pairs.h"

// Rows of p per register tile of mm: 16 float32 sums, one per row, cover vdpbf16ps's latency.
constexpr int kRows = 16;

// 16 float32 sums += a pair of bfloat16 broadcast (`pair`: the first in the low half) times 16 interleaved pairs.
__m512 dot_pairs(__m512 sums, uint32_t pair, __m512i pairs) {
  return _mm512_dpbf16_ps(sums, (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair)), (__m512bh)pairs);
}

// Columns 2k and 2k + 1 of a row of bfloat16, as one 32-bit word.
uint32_t pair_at(const uint16_t* row, int64_t k) {
  uint32_t word = 0;
  std::memcpy(&word, row + 2 * k, sizeof(word));
  return word;
}

// 16 bfloat16 of q's row k, columns [j, j + 16).
__m256i q_row(const uint16_t* q, int64_t rp, int64_t k, int64_t j) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * rp + j));
}

// Rows [0, R) of out = p q for columns [j, j + 16), q (depth x rp) contiguous. Each pair of q's rows is interleaved
// in registers once for R vdpbf16ps: cheaper than a packed copy of q per call, which the op's small blocks repeat.
template <int R>
void mm_tile(const uint16_t* p, int64_t ldp, int64_t depth, const uint16_t* q, int64_t rp, int64_t j, uint16_t* out,
             int64_t ldo) {
  __m512 sums[R];
  for (int i = 0; i < R; ++i) {
    sums[i] = _mm512_setzero_ps();
  }
  const int64_t pairs = depth / 2;
  for (int64_t k = 0; k < pairs; ++k) {
    const __m512i q_pairs = interleave(q_row(q, rp, 2 * k, j), q_row(q, rp, 2 * k + 1, j));
    for (int i = 0; i < R; ++i) {
      sums[i] = dot_pairs(sums[i], pair_at(p + i * ldp, k), q_pairs);
    }
  }
  if (depth % 2 != 0) {  // the last column, paired with a zero row of q
    const __m512i q_pairs = interleave(q_row(q, rp, depth - 1, j), _mm256_setzero_si256());
    for (int i = 0; i < R; ++i) {
      sums[i] = dot_pairs(sums[i], p[i * ldp + depth - 1], q_pairs);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * ldo + j), to_bf16(sums[i]));
  }
}

// out (n x rp, rows ldo apart) = p (n x depth, rows ldp apart) q (depth x rp, contiguous), rp % 16 == 0.
void bf16_mm(const uint16_t* p, int64_t ldp, int64_t n, int64_t depth, const uint16_t* q, int64_t rp, uint16_t* out,
             int64_t ldo) {
  for (int64_t j = 0; j < rp; j += kLanes) {
    int64_t i = 0;
    for (; i + kRows <= n; i += kRows) {
      mm_tile<kRows>(p + i * ldp, ldp, depth, q, rp, j, out + i * ldo, ldo);
    }
    // The rows left over, 8, 4, 2 and 1 at a time.
    if (i + 8 <= n) {
      mm_tile<8>(p + i * ldp, ldp, depth, q, rp, j, out + i * ldo, ldo);
      i += 8;
    }
    if (i + 4 <= n) {
      mm_tile<4>(p + i * ldp, ldp, depth, q, rp, j, out + i * ldo, ldo);
      i += 4;
    }
    if (i + 2 <= n) {
      mm_tile<2>(p + i * ldp, ldp, depth, q, rp, j, out + i * ldo, ldo);
      i += 2;
    }
    if (i < n) {
      mm_tile<1>(p + i * ldp, ldp, depth, q, rp, j, out + i * ldo, ldo);
    }
  }
}

// acc (rp x depth, float32, contiguous) += q^T p for p (n x depth, rows ldp apart) and q (n x rp, contiguous),
// rp % 16 == 0. Per 16 columns of p and 16 rows of acc: each pair of p's rows is loaded and interleaved once for 16
// vdpbf16ps, whose other operand is a pair of q's rows broadcast from the interleaved copy.
void bf16_accumulate(const uint16_t* p, int64_t ldp, int64_t n, int64_t depth, const uint16_t* q, int64_t rp,
                     float* acc) {
  const int64_t n_pad = round_up(std::max<int64_t>(n, 1), 2);
  thread_local std::vector<uint16_t> packed;  // per worker, reused by its blocks
  packed.resize(n_pad * rp);
  interleave_panel(q, n, rp, n_pad, packed.data());
  const uint32_t* q_pairs = reinterpret_cast<const uint32_t*>(packed.data());
  const int64_t pairs = n / 2;
  for (int64_t c0 = 0; c0 < rp; c0 += kLanes) {
    for (int64_t d0 = 0; d0 < depth; d0 += kLanes) {
      const __mmask16 valid = first_lanes(depth - d0);
      float* sums_at = acc + c0 * depth + d0;
      __m512 sums[kLanes];
      for (int c = 0; c < kLanes; ++c) {
        sums[c] = _mm512_maskz_loadu_ps(valid, sums_at + c * depth);
      }
      const uint16_t* rows = p + d0;
      for (int64_t m = 0; m < pairs; ++m) {
        const __m256i a = _mm256_maskz_loadu_epi16(valid, rows + 2 * m * ldp);
        const __m256i b = _mm256_maskz_loadu_epi16(valid, rows + (2 * m + 1) * ldp);
        const __m512i both = interleave(a, b);
        const uint32_t* q_pair_row = q_pairs + m * rp + c0;
        for (int c = 0; c < kLanes; ++c) {
          sums[c] = dot_pairs(sums[c], q_pair_row[c], both);
        }
      }
      if (n % 2 != 0) {  // the last row, paired with a zero row (q's interleaved copy has zeros there too)
        const __m512i both = interleave(_mm256_maskz_loadu_epi16(valid, rows + (n - 1) * ldp), _mm256_setzero_si256());
        const uint32_t* q_pair_row = q_pairs + pairs * rp + c0;
        for (int c = 0; c < kLanes; ++c) {
          sums[c] = dot_pairs(sums[c], q_pair_row[c], both);
        }
      }
      for (int c = 0; c < kLanes; ++c) {
        _mm512_mask_storeu_ps(sums_at + c * depth, valid, sums[c]);
      }
    }
  }
}

// Rows [0, R) of out = scale p q^T + bias (see bf16_expand), 32 columns at a time: two sums of 16 columns per row,
// each pair of p's columns broadcast once per 32 columns, q's pairs loaded once per R rows.
template <int R>
void expand_rows(const uint16_t* p, int64_t ldp, int64_t depth, const uint32_t* packed, int64_t width,
                 int64_t width_pad, __m512 scales, const float* bias, uint16_t* out, int64_t ldo) {
  for (int64_t col0 = 0; col0 < width; col0 += 2 * kLanes) {
    __m512 sums[R][2];
    for (int i = 0; i < R; ++i) {
      sums[i][0] = sums[i][1] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < depth / 2; ++k) {
      const __m512i q0 = _mm512_loadu_si512(packed + k * width_pad + col0);
      const __m512i q1 = _mm512_loadu_si512(packed + k * width_pad + col0 + kLanes);
      for (int i = 0; i < R; ++i) {
        const uint32_t pair = pair_at(p + i * ldp, k);
        sums[i][0] = dot_pairs(sums[i][0], pair, q0);
        sums[i][1] = dot_pairs(sums[i][1], pair, q1);
      }
    }
    for (int half = 0; half < 2; ++half) {
      const int64_t col = col0 + half * kLanes;
      const __mmask16 valid = first_lanes(width - col);
      const __m512 shift = bias != nullptr ? _mm512_maskz_loadu_ps(valid, bias + col) : _mm512_setzero_ps();
      for (int i = 0; i < R; ++i) {
        _mm256_mask_storeu_epi16(out + i * ldo + col, valid, to_bf16(_mm512_fmadd_ps(sums[i][half], scales, shift)));
      }
    }
  }
}

// out (n x width, rows ldo apart) = scale p q^T + bias for p (n x depth, rows ldp apart; depth even) and q packed by
// interleave_rows (width_pad columns, a multiple of 32); bias float32 (width) or nullptr. 8 rows at a time: their 16
// sums cover vdpbf16ps's latency.
void bf16_expand(const uint16_t* p, int64_t ldp, int64_t n, int64_t depth, const uint32_t* packed, int64_t width,
                 int64_t width_pad, float scale, const float* bias, uint16_t* out, int64_t ldo) {
  const __m512 scales = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    expand_rows<8>(p + i * ldp, ldp, depth, packed, width, width_pad, scales, bias, out + i * ldo, ldo);
  }
  // The rows left over, 4, 2 and 1 at a time.
  if (i + 4 <= n) {
    expand_rows<4>(p + i * ldp, ldp, depth, packed, width, width_pad, scales, bias, out + i * ldo, ldo);
    i += 4;
  }
  if (i + 2 <= n) {
    expand_rows<2>(p + i * ldp, ldp, depth, packed, width, width_pad, scales, bias, out + i * ldo, ldo);
    i += 2;
  }
  if (i < n) {
    expand_rows<1>(p + i * ldp, ldp, depth, packed, width, width_pad, scales, bias, out + i * ldo, ldo);
  }
}

D9D_AVX512_BF16_TARGET_END

void mm(const at::Tensor& p, const at::Tensor& q, const at::Tensor& out, MemorySpan /*ahead*/) {
  call_bf16_mm("avx512_bf16 mm", bf16_mm, p, q, out);
}

void accumulate(const at::Tensor& p, const at::Tensor& q, const at::Tensor& acc, MemorySpan /*ahead*/) {
  call_bf16_accumulate("avx512_bf16 accumulate", bf16_accumulate, p, q, acc);
}

// The depths that expand takes: p's columns, even, positive and at most 64 (r up to 64; oneDNN beyond).
constexpr int64_t kMaxExpandDepth = 64;

at::Tensor pack_expand(const at::Tensor& q, int64_t depth) {
  return pack_bf16_expand("avx512_bf16 pack_expand", interleave_rows, q, depth, kMaxExpandDepth);
}

void expand(const at::Tensor& p, const at::Tensor& packed, double scale, const at::Tensor& bias,
            const at::Tensor& out) {
  call_bf16_expand("avx512_bf16 expand", bf16_expand, p, packed, scale, bias, out);
}

// Both read p, which the block loop keeps in cache between the two.
void mm_accumulate(const at::Tensor& p, const at::Tensor& q, const at::Tensor& out, const at::Tensor& h,
                   const at::Tensor& acc, MemorySpan ahead) {
  mm(p, q, out, ahead);
  accumulate(p, h, acc, {});
}

}  // namespace

// Blocks of 256 KiB of bfloat16: a block of x and one of dy fit a Zen 4 core's 1 MiB of L2 together. As on AMX,
// without dropout the backward takes these kernels from one block per worker, and the forward computes xa in one
// oneDNN GEMM (on these kernels, block by block, it ran 0.15 ms faster at in = 1024 and 0.09 ms slower at 2816).
// The LoRA terms of y and of dx ride the base GEMM as extra depth where it takes them (bf16_base_gemm.h; dx's under
// dropout with the keep bits of its mask); elsewhere expand writes them where r is even.
const SkinnyKernels kAvx512Bf16SkinnyKernels{kLanes,
                                             1 << 17,
                                             kRows,
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
                                             bf16_accumulate_base,
                                             bf16_base_takes_term,
                                             bf16_base_with_term};

#else  // not x86-64 with GCC 10 or Clang 9 and later

bool avx512_bf16_available() { return false; }

const SkinnyKernels kAvx512Bf16SkinnyKernels{16,      1 << 17, 16,      1,       false,   true,    nullptr, nullptr,
                                             nullptr, 0,       nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};

#endif

}  // namespace d9d
