// Float32 GEMMs with one side a panel of 16 columns (r, padded), for the LoRA backward on the CPU.
//
// The backward's four LoRA products (x A^T, dy B, x^T g, dy^T xa) are skinny: a block of rows times an in x r panel,
// or a reduction over the rows into an in x r panel. MKL runs these shapes at about 70% of the core's FMA rate; a
// 16-column panel is one AVX-512 register, so a broadcast-and-FMA loop runs them near the full rate.
#include "skinny_gemm.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define D9D_HAVE_AVX512_KERNELS 1
#endif

namespace d9d {
namespace {

constexpr int64_t kPanel = 16;  // floats in an AVX-512 register

#ifdef D9D_HAVE_AVX512_KERNELS

// out[i, :16] = sum_k p[i, k] q[k, :16] for the R rows i starting at p (row strides ldp, ldq, ldo).
template <int R>
__attribute__((target("avx512f"))) inline void rows_times_panel(const float* p, int64_t ldp, int64_t depth,
                                                                const float* q, int64_t ldq, float* out, int64_t ldo) {
  __m512 acc[R];
  for (int row = 0; row < R; ++row) {
    acc[row] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 qk = _mm512_loadu_ps(q + k * ldq);
    for (int row = 0; row < R; ++row) {
      acc[row] = _mm512_fmadd_ps(_mm512_set1_ps(p[row * ldp + k]), qk, acc[row]);
    }
  }
  for (int row = 0; row < R; ++row) {
    _mm512_storeu_ps(out + row * ldo, acc[row]);
  }
}

// acc[k, :16] += sum_i p[i, k] q[i, :16] for the J columns k starting at p, over `rows` rows.
template <int J>
__attribute__((target("avx512f"))) inline void columns_times_panel(const float* p, int64_t ldp, int64_t rows,
                                                                   const float* q, int64_t ldq, float* acc,
                                                                   int64_t lda) {
  __m512 sums[J];
  for (int col = 0; col < J; ++col) {
    sums[col] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 qi = _mm512_loadu_ps(q + i * ldq);
    const float* pi = p + i * ldp;
    for (int col = 0; col < J; ++col) {
      sums[col] = _mm512_fmadd_ps(_mm512_set1_ps(pi[col]), qi, sums[col]);
    }
  }
  for (int col = 0; col < J; ++col) {
    _mm512_storeu_ps(acc + col * lda, _mm512_add_ps(_mm512_loadu_ps(acc + col * lda), sums[col]));
  }
}

// out (n x rp) = p (n x depth) q (depth x rp). Groups of 4 rows keep 4 accumulators and one panel row in registers;
// measured here, more rows per group gain nothing because the broadcasts then compete with the panel loads.
__attribute__((target("avx512f"))) void panel_mm(const float* p, int64_t ldp, int64_t n, int64_t depth,
                                                 const float* q, int64_t rp, float* out) {
  for (int64_t c = 0; c < rp; c += kPanel) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      rows_times_panel<4>(p + i * ldp, ldp, depth, q + c, rp, out + i * rp + c, rp);
    }
    for (; i < n; ++i) {
      rows_times_panel<1>(p + i * ldp, ldp, depth, q + c, rp, out + i * rp + c, rp);
    }
  }
}

// acc (depth x rp) += p^T (depth x n) q (n x rp). Groups of 16 columns read one cache line of each row of p.
__attribute__((target("avx512f"))) void panel_accumulate(const float* p, int64_t ldp, int64_t n, int64_t depth,
                                                         const float* q, int64_t rp, float* acc) {
  for (int64_t c = 0; c < rp; c += kPanel) {
    int64_t k = 0;
    for (; k + 16 <= depth; k += 16) {
      columns_times_panel<16>(p + k, ldp, n, q + c, rp, acc + k * rp + c, rp);
    }
    for (; k < depth; ++k) {
      columns_times_panel<1>(p + k, ldp, n, q + c, rp, acc + k * rp + c, rp);
    }
  }
}

bool cpu_has_avx512() {
  // ATen's own dispatch level, so ATEN_CPU_CAPABILITY=avx2 (or default) turns these kernels off too.
  static const bool has = at::get_cpu_capability() == "AVX512";
  return has;
}

#else

bool cpu_has_avx512() {
  return false;
}

#endif

bool skinny_supports(const at::Tensor& x) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && cpu_has_avx512();
}

// p's rows may be strided (a block of x or dy), and with one column (in or out == 1) so may its column; the
// kernels never step along a single column. The panels and outputs are contiguous with rp columns.
void check_operands(const char* what, const at::Tensor& p, const at::Tensor& q, const at::Tensor& out) {
  TORCH_CHECK(p.dim() == 2 && (p.size(1) <= 1 || p.stride(1) == 1) && q.is_contiguous() && out.is_contiguous() &&
                  q.size(1) % kPanel == 0 && q.size(1) == out.size(1) && p.scalar_type() == at::kFloat &&
                  q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              what, ": internal error, unsupported operands ", p.sizes(), " ", q.sizes(), " ", out.sizes());
}

void skinny_mm(const at::Tensor& p, const at::Tensor& q, const at::Tensor& out) {
  check_operands("skinny_mm", p, q, out);
  TORCH_CHECK(p.size(1) == q.size(0) && out.size(0) == p.size(0), "skinny_mm: internal error, shapes ", p.sizes(),
              " ", q.sizes(), " ", out.sizes());
#ifdef D9D_HAVE_AVX512_KERNELS
  panel_mm(p.const_data_ptr<float>(), p.stride(0), p.size(0), p.size(1), q.const_data_ptr<float>(), q.size(1),
           out.mutable_data_ptr<float>());
#endif
}

void skinny_accumulate(const at::Tensor& p, const at::Tensor& q, const at::Tensor& acc) {
  check_operands("skinny_accumulate", p, q, acc);
  TORCH_CHECK(p.size(0) == q.size(0) && acc.size(0) == p.size(1), "skinny_accumulate: internal error, shapes ",
              p.sizes(), " ", q.sizes(), " ", acc.sizes());
#ifdef D9D_HAVE_AVX512_KERNELS
  panel_accumulate(p.const_data_ptr<float>(), p.stride(0), p.size(0), p.size(1), q.const_data_ptr<float>(),
                   q.size(1), acc.mutable_data_ptr<float>());
#endif
}

}  // namespace

const SkinnyKernels kCpuSkinnyKernels{kPanel, skinny_supports, skinny_mm, skinny_accumulate};

}  // namespace d9d
