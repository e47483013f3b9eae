// The base GEMM of the bfloat16 LoRA ops where the AVX512_BF16 kernels run (CPUs without AMX, or capped with
// D9D_CPU_BF16_KERNELS): out += a op(W) onto the LoRA term that out already holds, rounded once.
//
// ATen's addmm_ does this through oneDNN's matmul with a sum post-op, which on the Zen 4 of BENCHMARKS.md ran 2 to 5%
// slower than the plain GEMM (mm) at the LoRA model's shapes, where in = 1024. Here the same micro-kernel (brgemm,
// which oneDNN's matmul also runs) writes each 64 x 32 tile in float32 to a buffer in L1, and the tile is added to
// out's bfloat16 and rounded there: as fast as mm at those shapes (paired repeats, 2 threads). W is repacked per call
// into the pairs of rows that vdpbf16ps takes (oneDNN's matmul repacks it too), 1 to 2% of the GEMM at 2048 rows,
// hence the minimum of rows below.
#include "bf16_base_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <exception>

#include "avx512_bf16_gemm.h"
#include "skinny_gemm.h"

// The AVX512_BF16 target needs GCC 10 or Clang 9; brgemm on bfloat16 came with torch's CPUBLAS_BRGEMM_* macros.
#if defined(__x86_64__) && defined(CPUBLAS_BRGEMM_BF16BF16F32) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define D9D_BF16_BASE_GEMM 1
#include <immintrin.h>
#endif

namespace d9d {

#ifdef D9D_BF16_BASE_GEMM
namespace {

constexpr int64_t kTileRows = 64;     // rows of a tile: 64 x 32 float32 sums, 8 KiB
constexpr int64_t kTileColumns = 32;  // columns of a tile and of a panel of packed W
// Fewer rows leave W's repacking too large a share of the GEMM for the faster sum to pay for it.
constexpr int64_t kMinRows = 1024;

D9D_AVX512_BF16_TARGET_BEGIN

#include "bf16_pairs.h"

// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block of 32-bit words.
void transpose_8x8(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
  __m256i r[8];
  __m256i t[8];
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * lds));
  }
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * ldd), _mm256_permute2x128_si256(r[i], r[i + 4], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (i + 4) * ldd),
                        _mm256_permute2x128_si256(r[i], r[i + 4], 0x31));
  }
}

// Panel j of op(W) (k x n) as brgemm takes it (VNNI): k / 2 rows of 32 column pairs (op(W)[2i][c], op(W)[2i+1][c]),
// one 32-bit word each, for columns [32 j, 32 j + 32).
void pack_panel(const uint16_t* w, int64_t k, int64_t n, bool transposed, int64_t j, uint32_t* panel) {
  const int64_t pairs = k / 2;
  if (transposed) {  // op(W) = W^T: a pair is two neighbours in a row of W, so the panel is a 32-bit transpose
    const uint32_t* rows = reinterpret_cast<const uint32_t*>(w) + j * kTileColumns * pairs;
    for (int64_t c = 0; c < kTileColumns; c += 8) {
      for (int64_t i = 0; i < pairs; i += 8) {
        transpose_8x8(rows + c * pairs + i, pairs, panel + i * kTileColumns + c, kTileColumns);
      }
    }
    return;
  }
  for (int64_t i = 0; i < pairs; ++i) {  // op(W) = W: two rows of W interleaved
    const uint16_t* first = w + 2 * i * n + j * kTileColumns;
    for (int64_t c = 0; c < kTileColumns; c += kLanes) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + c));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + n + c));
      _mm512_storeu_si512(panel + i * kTileColumns + c, interleave(a, b));
    }
  }
}

// Rows [0, rows) of a tile: out = round(out + sums), sums rows kTileColumns apart.
void add_tile(const float* sums, int64_t rows, uint16_t* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i) {
    uint16_t* row = out + i * ldo;
    for (int64_t c = 0; c < kTileColumns; c += kLanes) {
      const __m256i old = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
      const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(sums + i * kTileColumns + c),
                                       _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + c), to_bf16(sum));
    }
  }
}

D9D_AVX512_BF16_TARGET_END

// Releases brgemm's hardware context (AMX's tile state, where brgemm runs on AMX) when a worker leaves, also by an
// exception.
struct ReleaseBrgemm {
  ~ReleaseBrgemm() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }
};

// out += a op(W) for operands already checked; may throw where ATen's brgemm cannot run on bfloat16 here.
void accumulate(const at::Tensor& a, const at::Tensor& weight, bool transposed, const at::Tensor& out) {
  const int64_t m = a.size(0);
  const int64_t k = a.size(1);
  const int64_t n = out.size(1);
  const int64_t lda = a.stride(0);
  const int64_t panels = n / kTileColumns;
  const int64_t panel_words = k / 2 * kTileColumns;
  // The packed W (k n bfloat16, as many as W's) in the CPU's weight scratch, which bfloat16's ops use for nothing else.
  const at::Tensor packed = cpu_weight_scratch(weight);
  const auto* w = static_cast<const uint16_t*>(weight.const_data_ptr());
  auto* panel0 = static_cast<uint32_t*>(packed.mutable_data_ptr());
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      pack_panel(w, k, n, transposed, j, panel0 + j * panel_words);
    }
  });
  const auto* a_data = static_cast<const at::BFloat16*>(a.const_data_ptr());
  auto* out_data = static_cast<uint16_t*>(out.mutable_data_ptr());
  const int64_t row_tiles = (m + kTileRows - 1) / kTileRows;
  // Tiles in row-major order, consecutive ones to a thread: a block of rows of a stays in its cache over the panels.
  at::parallel_for(0, row_tiles * panels, 1, [&](int64_t begin, int64_t end) {
    const ReleaseBrgemm release;
    alignas(64) float sums[kTileRows * kTileColumns];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t row0 = tile / panels * kTileRows;
      const int64_t rows = std::min(kTileRows, m - row0);
      const int64_t j = tile % panels;
      at::native::cpublas::brgemm(rows, kTileColumns, k, lda, kTileColumns, kTileColumns, /*add_C=*/false,
                                  a_data + row0 * lda, reinterpret_cast<const at::BFloat16*>(panel0 + j * panel_words),
                                  sums, /*is_vnni=*/true);
      add_tile(sums, rows, out_data + row0 * n + j * kTileColumns, n);
    }
  });
}

// Whether brgemm runs here and agrees with a float64 reference, tried once on small operands of both layouts (a torch
// built without oneDNN's micro-kernels, or a brgemm that wants another layout of W, turns this path off).
bool brgemm_works() {
  try {
    const auto options = at::TensorOptions().dtype(at::kDouble);
    const at::Tensor a = at::arange(70 * 32, options).mul(0.37).sin().view({70, 32}).to(at::kBFloat16);
    const at::Tensor w = at::arange(64 * 32, options).mul(0.61).cos().view({64, 32}).to(at::kBFloat16);
    const at::Tensor base = at::arange(70 * 64, options).mul(0.13).sin().view({70, 64}).to(at::kBFloat16);
    const at::Tensor expected = at::addmm(base.to(at::kDouble), a.to(at::kDouble), w.to(at::kDouble).t());
    for (const bool transposed : {true, false}) {
      const at::Tensor out = base.clone();
      accumulate(a, transposed ? w : w.t().contiguous(), transposed, out);  // W stored n x k, or k x n
      // A wrong layout of W or a lost tile is off by about the magnitude itself; one rounding, by 2^-9 of it.
      if (!at::allclose(out.to(at::kDouble), expected, 0.0, expected.abs().max().item<double>() / 128)) {
        return false;
      }
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

bool bf16_accumulate_base(const at::Tensor& a, const at::Tensor& weight, bool transposed, const at::Tensor& out) {
  const auto bf16_cpu = [](const at::Tensor& t) {
    return t.scalar_type() == at::kBFloat16 && t.device().is_cpu() && t.dim() == 2;
  };
  if (!bf16_cpu(a) || !bf16_cpu(weight) || !bf16_cpu(out)) {
    return false;
  }
  const int64_t m = a.size(0);
  const int64_t k = a.size(1);
  const int64_t n = out.size(1);
  if (m < kMinRows || k == 0 || k % 16 != 0 || n % kTileColumns != 0 || out.size(0) != m || a.stride(1) != 1 ||
      a.stride(0) < k || !weight.is_contiguous() || !out.is_contiguous() || weight.size(transposed ? 0 : 1) != n ||
      weight.size(transposed ? 1 : 0) != k || !bf16_base_gemm_runs()) {
    return false;
  }
  accumulate(a, weight, transposed, out);
  return true;
}

bool bf16_base_gemm_runs() {
  if (!avx512_bf16_available() || !at::globalContext().userEnabledMkldnn()) {  // ATen's brgemm runs on oneDNN
    return false;
  }
  static const bool works = brgemm_works();
  return works;
}

#else  // not x86-64, or a compiler or torch without what this needs

bool bf16_accumulate_base(const at::Tensor&, const at::Tensor&, bool, const at::Tensor&) { return false; }

bool bf16_base_gemm_runs() { return false; }

#endif

}  // namespace d9d
