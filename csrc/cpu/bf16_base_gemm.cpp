// The base GEMM of the bfloat16 LoRA ops where the AVX512_BF16 kernels run (CPUs without AMX, or capped with
// D9D_CPU_BF16_KERNELS): out += a op(W) onto the LoRA term that out already holds, or out = a op(W) + the term taken
// as extra depth, rounded once either way.
//
// ATen's addmm_ does the first through oneDNN's matmul with a sum post-op, which on the Zen 4 of BENCHMARKS.md ran 2
// to 5% slower than the plain GEMM (mm) at the LoRA model's shapes, where in = 1024. Here the same micro-kernel
// (brgemm, which oneDNN's matmul also runs) writes each 64 x 32 tile in float32 to a buffer in L1, and the tile is
// added to out's bfloat16 and rounded there: as fast as mm at those shapes (paired repeats, 2 threads). W is repacked
// per call into the pairs of rows that vdpbf16ps takes (oneDNN's matmul repacks it too), 1 to 2% of the GEMM at 2048
// rows, hence the minimum of rows below.
//
// With the term as extra depth (a second brgemm call per tile, over the columns of xa or g: r, or the panels'
// zero-padded rp, onto the same sums), the LoRA term is never written to out and read back: 0.3 to 1.0 ms less per
// 2048-row layer's forward or backward than writing the term first (1024 and 2816 wide; BENCHMARKS.md). dx's term
// under dropout goes first instead, is masked in the tile's sums by the mask's bits, and the base GEMM adds onto it.
#include "bf16_base_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Rows [0, rows) of a tile of sums (rows kTileColumns apart) times keep * scale, in place: the LoRA term of dx under
// dropout, before the base GEMM adds onto it. keep: the tile's bits, rows ldk bytes apart (bit c % 8 of byte c / 8
// keeps column c).
void mask_tile(float* sums, int64_t rows, const uint8_t* keep, int64_t ldk, float scale) {
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < kTileColumns; c += kLanes) {
      __mmask16 bits;
      std::memcpy(&bits, keep + i * ldk + c / 8, sizeof(bits));
      float* sum = sums + i * kTileColumns + c;
      // times 0 where dropped, as the dropout passes do (a NaN stays NaN)
      _mm512_storeu_ps(sum, _mm512_mul_ps(_mm512_loadu_ps(sum), _mm512_maskz_mov_ps(bits, factor)));
    }
  }
}

// Rows [0, rows) of a tile: out = round(sums (+ bias) (+ out)), sums rows kTileColumns apart, bias the tile's
// kTileColumns or nullptr.
void store_tile(const float* sums, int64_t rows, const float* bias, bool add_out, uint16_t* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i) {
    uint16_t* row = out + i * ldo;
    for (int64_t c = 0; c < kTileColumns; c += kLanes) {
      __m512 sum = _mm512_loadu_ps(sums + i * kTileColumns + c);
      if (bias != nullptr) {
        sum = _mm512_add_ps(sum, _mm512_loadu_ps(bias + c));
      }
      if (add_out) {
        const __m256i old = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16)));
      }
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

// The LoRA term as extra depth of the tiles: t (m x depth, rows ldt apart) times op(term weight), packed as W's panels
// (panel j at j * depth * kTileColumns / 2 words). With keep bits (m rows, n / 8 bytes apart), it is summed first and
// masked in the tile's sums (keep * keep_scale * term) before the base GEMM adds onto them.
struct Term {
  const at::BFloat16* t = nullptr;
  int64_t ldt = 0;
  int64_t depth = 0;
  const uint32_t* panels = nullptr;
  const uint8_t* keep = nullptr;
  float keep_scale = 1;
};

// out = a op(W) (+ term) (+ bias) (+ out if add_out) for operands already checked; may throw where ATen's brgemm
// cannot run on bfloat16 here.
void gemm(const at::Tensor& a, const at::Tensor& weight, bool transposed, const Term& term, const float* bias,
          bool add_out, const at::Tensor& out) {
  const int64_t m = a.size(0);
  const int64_t k = a.size(1);
  const int64_t n = out.size(1);
  const int64_t lda = a.stride(0);
  const int64_t panels = n / kTileColumns;
  const int64_t panel_words = k / 2 * kTileColumns;
  const int64_t term_panel_words = term.depth / 2 * kTileColumns;
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
    // A term under a mask goes first, is masked in place, and the base GEMM adds onto it; else the term adds onto the
    // base GEMM's sums. Either way one tile of sums in L1.
    const bool masked_term = term.depth > 0 && term.keep != nullptr;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t row0 = tile / panels * kTileRows;
      const int64_t rows = std::min(kTileRows, m - row0);
      const int64_t j = tile % panels;
      const auto add_term = [&](bool add_C) {
        at::native::cpublas::brgemm(rows, kTileColumns, term.depth, term.ldt, kTileColumns, kTileColumns, add_C,
                                    term.t + row0 * term.ldt,
                                    reinterpret_cast<const at::BFloat16*>(term.panels + j * term_panel_words), sums,
                                    /*is_vnni=*/true);
      };
      if (masked_term) {
        add_term(/*add_C=*/false);
        mask_tile(sums, rows, term.keep + row0 * (n / 8) + j * kTileColumns / 8, n / 8, term.keep_scale);
      }
      at::native::cpublas::brgemm(rows, kTileColumns, k, lda, kTileColumns, kTileColumns, /*add_C=*/masked_term,
                                  a_data + row0 * lda, reinterpret_cast<const at::BFloat16*>(panel0 + j * panel_words),
                                  sums, /*is_vnni=*/true);
      if (term.depth > 0 && !masked_term) {
        add_term(/*add_C=*/true);
      }
      store_tile(sums, rows, bias == nullptr ? nullptr : bias + j * kTileColumns, add_out,
                 out_data + row0 * n + j * kTileColumns, n);
    }
  });
}

// op(term_weight) (depth x n) as brgemm's panels: for panel j, depth / 2 rows of 32 pairs (rows 2i and 2i + 1 of a
// column), the layout that pack_panel writes for W. The term is r columns deep, too small for the kernels above to pay.
at::Tensor pack_term(const at::Tensor& term_weight, bool transposed, int64_t n) {
  const at::Tensor op = transposed ? term_weight.t() : term_weight;
  const int64_t depth = op.size(0);
  return op.reshape({depth / 2, 2, n / kTileColumns, kTileColumns}).permute({2, 0, 3, 1}).contiguous();
}

// out = a op(W) + [keep * keep_scale *] t op(term_weight) (+ bias), operands checked.
void gemm_with_term(const at::Tensor& a, const at::Tensor& weight, bool transposed, const at::Tensor& t,
                    const at::Tensor& term_weight, const at::Tensor& bias, const at::Tensor& keep, double keep_scale,
                    const at::Tensor& out) {
  const at::Tensor term_panels = pack_term(term_weight, transposed, out.size(1));
  const Term term{static_cast<const at::BFloat16*>(t.const_data_ptr()),
                  t.stride(0),
                  t.size(1),
                  static_cast<const uint32_t*>(term_panels.const_data_ptr()),
                  keep.defined() ? keep.const_data_ptr<uint8_t>() : nullptr,
                  static_cast<float>(keep_scale)};
  gemm(a, weight, transposed, term, bias.defined() ? bias.const_data_ptr<float>() : nullptr, /*add_out=*/false, out);
}

// Small operands for the self-checks, the same in every process.
at::Tensor check_operand(int64_t rows, int64_t cols, double step, at::ScalarType dtype = at::kBFloat16) {
  return at::arange(rows * cols, at::TensorOptions().dtype(at::kDouble)).mul(step).sin().view({rows, cols}).to(dtype);
}

// out within one rounding of reference: a wrong layout or a lost tile is off by about the magnitude itself; one
// rounding, by 2^-9 of it.
bool close_to(const at::Tensor& out, const at::Tensor& reference) {
  return at::allclose(out.to(at::kDouble), reference, 0.0, reference.abs().max().item<double>() / 128);
}

// Whether brgemm runs here and agrees with a float64 reference, tried once on small operands of both layouts of W (a
// torch built without oneDNN's micro-kernels, or a brgemm that wants another layout of W, turns this path off).
bool brgemm_works() {
  try {
    const at::Tensor a = check_operand(70, 32, 0.37);
    const at::Tensor w = check_operand(64, 32, 0.61);
    const at::Tensor base = check_operand(70, 64, 0.13);
    const at::Tensor expected = at::addmm(base.to(at::kDouble), a.to(at::kDouble), w.to(at::kDouble).t());
    for (const bool transposed : {true, false}) {
      const at::Tensor out = base.clone();
      const at::Tensor weight = transposed ? w : w.t().contiguous();  // stored n x k, or k x n
      gemm(a, weight, transposed, Term{}, nullptr, /*add_out=*/true, out);
      if (!close_to(out, expected)) {
        return false;
      }
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

// The same for the term as extra depth (brgemm onto its own sums, add_C), with depths of one pair and of one panel,
// and for the term masked by keep bits.
bool brgemm_takes_terms() {
  try {
    const at::Tensor a = check_operand(70, 32, 0.37);
    const at::Tensor w = check_operand(64, 32, 0.61);
    const at::Tensor bias = check_operand(1, 64, 0.71, at::kFloat).view({64});
    const at::Tensor keep = check_operand(70, 64, 0.43, at::kDouble) > 0;
    const at::Tensor keep_bits =
        at::bitwise_left_shift(keep.to(at::kInt).view({70, 8, 8}), at::arange(8, at::kInt)).sum(-1).to(at::kByte);
    for (const int64_t depth : {2, 16}) {
      const at::Tensor t = check_operand(70, depth, 0.29);
      const at::Tensor tw = check_operand(64, depth, 0.53);
      const at::Tensor base = at::addmm(bias.to(at::kDouble), a.to(at::kDouble), w.to(at::kDouble).t());
      const at::Tensor term = at::mm(t.to(at::kDouble), tw.to(at::kDouble).t());
      for (const bool masked : {false, true}) {
        const at::Tensor expected = masked ? base + term * keep * 1.25 : base + term;
        for (const bool transposed : {true, false}) {
          const at::Tensor out = at::empty({70, 64}, a.options());
          gemm_with_term(a, transposed ? w : w.t().contiguous(), transposed, t, transposed ? tw : tw.t().contiguous(),
                         bias, masked ? keep_bits : at::Tensor(), 1.25, out);
          if (!close_to(out, expected)) {
            return false;
          }
        }
      }
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

namespace {

bool bf16_cpu_matrix(const at::Tensor& t) {
  return t.defined() && t.scalar_type() == at::kBFloat16 && t.device().is_cpu() && t.dim() == 2;
}

// Whether the driver's tiles take a (m x k) op(weight) (k x n): shapes that its tiles and brgemm's pairs divide, and
// rows enough to pay for packing W. Whether it runs on this CPU is asked apart.
bool fits(const at::Tensor& a, const at::Tensor& weight, bool transposed) {
  if (!bf16_cpu_matrix(a) || !bf16_cpu_matrix(weight)) {
    return false;
  }
  const int64_t k = a.size(1);
  const int64_t n = weight.size(transposed ? 0 : 1);
  return a.size(0) >= kMinRows && k > 0 && k % 16 == 0 && n % kTileColumns == 0 && a.stride(1) == 1 &&
         a.stride(0) >= k && weight.is_contiguous() && weight.size(transposed ? 1 : 0) == k;
}

// Whether the term as extra depth runs here: the driver runs, and its check of terms passed (once per process).
bool terms_run() {
  if (!bf16_base_gemm_runs()) {
    return false;
  }
  static const bool works = brgemm_takes_terms();
  return works;
}

}  // namespace

bool bf16_accumulate_base(const at::Tensor& a, const at::Tensor& weight, bool transposed, const at::Tensor& out) {
  if (!fits(a, weight, transposed) || !bf16_cpu_matrix(out) || !out.is_contiguous() || out.size(0) != a.size(0) ||
      out.size(1) != weight.size(transposed ? 0 : 1) || !bf16_base_gemm_runs()) {
    return false;
  }
  gemm(a, weight, transposed, Term{}, nullptr, /*add_out=*/true, out);
  return true;
}

bool bf16_base_takes_term(const at::Tensor& a, const at::Tensor& weight, bool transposed, int64_t depth) {
  return depth > 0 && depth % 2 == 0 && fits(a, weight, transposed) && terms_run();
}

void bf16_base_with_term(const at::Tensor& a, const at::Tensor& weight, bool transposed, const at::Tensor& t,
                         const at::Tensor& term_weight, const at::Tensor& bias, const at::Tensor& keep,
                         double keep_scale, const at::Tensor& out) {
  constexpr const char* op = "bf16_base_with_term";
  const int64_t m = a.size(0);
  const int64_t n = weight.size(transposed ? 0 : 1);
  const int64_t depth = t.size(1);
  // The shapes only: whether it runs here was asked before the term was computed (torch.backends.mkldnn may change
  // since, and the op must not stop halfway).
  TORCH_CHECK(depth > 0 && depth % 2 == 0 && fits(a, weight, transposed), op, ": operands it does not take");
  TORCH_CHECK(bf16_cpu_matrix(t) && t.size(0) == m && t.stride(1) == 1 && t.stride(0) >= depth, op,
              ": t must be bfloat16 ", m, " x depth with contiguous rows, got ", t.sizes());
  TORCH_CHECK(bf16_cpu_matrix(term_weight) && term_weight.size(transposed ? 0 : 1) == n &&
                  term_weight.size(transposed ? 1 : 0) == depth,
              op, ": term_weight must be bfloat16 in weight's layout, got ", term_weight.sizes());
  TORCH_CHECK(!bias.defined() || (bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == n &&
                                  bias.is_contiguous() && bias.device().is_cpu()),
              op, ": bias must be a contiguous float32 vector of ", n);
  TORCH_CHECK(!keep.defined() || (keep.scalar_type() == at::kByte && keep.dim() == 2 && keep.size(0) == m &&
                                  keep.size(1) == n / 8 && keep.is_contiguous() && keep.device().is_cpu()),
              op, ": keep must be contiguous uint8 ", m, " x ", n / 8, " (bits), got ", keep.sizes());
  TORCH_CHECK(std::isfinite(keep_scale), op, ": keep_scale must be finite, got ", keep_scale);
  TORCH_CHECK(bf16_cpu_matrix(out) && out.is_contiguous() && out.size(0) == m && out.size(1) == n, op,
              ": out must be contiguous bfloat16 ", m, " x ", n, ", got ", out.sizes());
  gemm_with_term(a, weight, transposed, t, term_weight, bias, keep, keep_scale, out);
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

bool bf16_base_takes_term(const at::Tensor&, const at::Tensor&, bool, int64_t) { return false; }

void bf16_base_with_term(const at::Tensor&, const at::Tensor&, bool, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, double, const at::Tensor&) {
  TORCH_CHECK(false, "bf16_base_with_term: not built here (bf16_base_takes_term is false)");
}

bool bf16_base_gemm_runs() { return false; }

#endif

}  // namespace d9d
