// The CPU's vectorized kernels (float32; the dropout passes also bfloat16), written once over at::vec::Vectorized
// (vec_kernels_impl.h) and compiled once per CPU capability (capability/*.cpp). vec_kernels() picks the build for
// at::get_cpu_capability(), as ATen's DispatchStub does for its own kernels, so ATEN_CPU_CAPABILITY=default|avx2|avx512
// selects ours too.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace d9d::cpu {

// Columns of a skinny-GEMM panel: r is rounded up to a multiple of this (one AVX-512 register, two AVX2 ones, four
// NEON ones).
constexpr int64_t kPanel = 16;

// Blocks of rows handed to the kernels are multiples of this many rows where they hold that many (but for an
// input's last block): a whole number of every build's register tiles, whose leftover rows run fewer accumulators.
constexpr int64_t kBlockRowMultiple = 8;

// Memory for a kernel to pull into the core's L2 cache while it computes, one cache line per `period` steps of its
// inner loop: rows that a later kernel reads, so that their fetch from memory overlaps this kernel's arithmetic
// instead of stalling that one. Empty (next == end): nothing.
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t period = 1;
  int64_t countdown = 1;

  // Spreads the lines over about `steps` calls of step(). A kernel with fewer steps than lines fetches only its
  // first `steps` lines (one per step); the ones that it does not reach come from memory as before.
  void pace(int64_t steps) {
    const int64_t lines = (end - next + 63) / 64;
    period = countdown = lines > 0 && steps > lines ? steps / lines : 1;
  }
  void step() {
    if (--countdown == 0) {
      countdown = period;
      if (next < end) {
        __builtin_prefetch(next, /*rw=*/0, /*locality=*/2);  // prefetcht1 on x86: into L2
        next = end - next > 64 ? next + 64 : end;
      }
    }
  }
};

struct VecKernels {
  // The capability this build was compiled for ("DEFAULT", "AVX2", "AVX512").
  const char* capability;
  // out (n x rp) = p (n x depth) q (depth x rp), for p's rows ldp apart, out's ldo apart, q contiguous,
  // rp % kPanel == 0.
  void (*panel_mm)(const float* p, int64_t ldp, int64_t n, int64_t depth, const float* q, int64_t rp, float* out,
                   int64_t ldo, Prefetch ahead);
  // acc (depth x rp) += p^T q, for p (n x depth, rows ldp apart) and q (n x rp), q and acc contiguous.
  void (*panel_accumulate)(const float* p, int64_t ldp, int64_t n, int64_t depth, const float* q, int64_t rp,
                           float* acc, Prefetch ahead);
  // out = p q and acc += p^T h in one pass over p (h n x rp, contiguous), each element of p loaded once for both;
  // nullptr in builds with too few registers for that to pay, which run panel_mm and panel_accumulate instead.
  void (*panel_mm_accumulate)(const float* p, int64_t ldp, int64_t n, int64_t depth, const float* q, int64_t rp,
                              float* out, int64_t ldo, const float* h, float* acc, Prefetch ahead);
  // Rows [begin, end) of out = weight + sB A, for weight and out (rows x in), sB (rows x r) and A (r x in), all
  // contiguous.
  void (*fold_rows)(const float* weight, const float* sB, const float* A, int64_t r, int64_t in, int64_t begin,
                    int64_t end, float* out);
  // words[4 j + w] = word w of the Philox4x32-10 output for counter (group0 + j, row) and key seed, j < count
  // (the same arithmetic as at::philox_engine; see ../dropout_mask.h).
  void (*philox_batch)(uint64_t seed, int64_t row, int64_t group0, int64_t count, uint32_t* words);
  // out[c] = x[c] * keep[c] * scale with keep[c] = draws[c] >= threshold, for c < n.
  void (*dropout_span)(const float* x, float* out, const uint16_t* draws, int64_t n, uint32_t threshold, float scale);
  // The same, and grad[c] *= keep[c] * scale, in one pass.
  void (*dropout_backward_span)(const float* x, float* out, float* grad, const uint16_t* draws, int64_t n,
                                uint32_t threshold, float scale);
  // The two in bfloat16, computed in float32 and rounded as c10::BFloat16 rounds.
  void (*dropout_span_bf16)(const c10::BFloat16* x, c10::BFloat16* out, const uint16_t* draws, int64_t n,
                            uint32_t threshold, float scale);
  void (*dropout_backward_span_bf16)(const c10::BFloat16* x, c10::BFloat16* out, c10::BFloat16* grad,
                                     const uint16_t* draws, int64_t n, uint32_t threshold, float scale);
  // Bit c % 8 of bits[c / 8] = keep[c] (draws[c] >= threshold), for c < n, n a multiple of 8.
  void (*keep_bits)(const uint16_t* draws, int64_t n, uint32_t threshold, uint8_t* bits);
  // out (n x width) = scale p q + bias, for p (n x depth, rows ldp apart), bias (width) or nullptr, out's rows ldo
  // apart, and q (depth x width) as `panels`: ceil(width / kPanel) contiguous panels of depth x kPanel, zero past
  // width. The LoRA term's shape (the expand of SkinnyKernels).
  void (*panel_expand)(const float* p, int64_t ldp, int64_t n, int64_t depth, const float* panels, int64_t width,
                       float scale, const float* bias, float* out, int64_t ldo);
};

// The build for the running CPU (and ATEN_CPU_CAPABILITY), chosen once per process.
const VecKernels& vec_kernels();

// One table per compiled capability (see capability/*.cpp); D9D_X86_CAPABILITIES says whether AVX2 and AVX512 exist.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define D9D_X86_CAPABILITIES 1
#endif

namespace DEFAULT {
extern const VecKernels kVecKernels;
}
#ifdef D9D_X86_CAPABILITIES
namespace AVX2 {
extern const VecKernels kVecKernels;
}
namespace AVX512 {
extern const VecKernels kVecKernels;
}
#endif

}  // namespace d9d::cpu
