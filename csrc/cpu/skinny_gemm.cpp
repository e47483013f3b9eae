// The CPU's SkinnyKernels (see ../lora.h): the float32 skinny GEMMs of the LoRA backward and the fold W + s B A, on
// the vectorized kernels of the running CPU's capability (vec_kernels.h); bfloat16's are in amx_gemm.cpp and
// avx512_bf16_gemm.cpp.
#include "skinny_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "amx_gemm.h"
#include "avx512_bf16_gemm.h"
#include "vec_kernels.h"

namespace d9d {
namespace {

// Whether this build is really vectorized. The DEFAULT build on x86-64 is plain arrays (SSE2 at best), which a BLAS
// beats: there ATen's GEMMs run instead, and that is how tests reach the ATen fallback (ATEN_CPU_CAPABILITY=default).
bool vectorized_build() {
#if defined(__aarch64__)
  return true;  // DEFAULT is NEON
#else
  return std::strcmp(cpu::vec_kernels().capability, "DEFAULT") != 0;
#endif
}

// p's rows may be strided (a block of x or dy), and with one column (in or out == 1) so may its column; the
// kernels never step along a single column. The panels are contiguous with rp columns, and so are the outputs but for
// mm's, whose rows may be strided.
void check_operands(const char* what, const at::Tensor& p, const at::Tensor& q, const at::Tensor& out) {
  TORCH_CHECK(p.dim() == 2 && (p.size(1) <= 1 || p.stride(1) == 1) && q.is_contiguous() && out.dim() == 2 &&
                  out.stride(1) == 1 &&
                  q.size(1) % cpu::kPanel == 0 && q.size(1) == out.size(1) && p.scalar_type() == at::kFloat &&
                  q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              what, ": internal error, unsupported operands ", p.sizes(), " ", q.sizes(), " ", out.sizes());
}

// `ahead` for the vectorized kernels.
cpu::Prefetch prefetch_of(MemorySpan ahead) {
  const char* begin = static_cast<const char*>(ahead.data);
  return {begin, begin + ahead.bytes};
}

void skinny_mm(const at::Tensor& p, const at::Tensor& q, const at::Tensor& out, MemorySpan ahead) {
  check_operands("skinny_mm", p, q, out);
  TORCH_CHECK(p.size(1) == q.size(0) && out.size(0) == p.size(0), "skinny_mm: internal error, shapes ", p.sizes(),
              " ", q.sizes(), " ", out.sizes());
  cpu::vec_kernels().panel_mm(p.const_data_ptr<float>(), p.stride(0), p.size(0), p.size(1),
                              q.const_data_ptr<float>(), q.size(1), out.mutable_data_ptr<float>(), out.stride(0),
                              prefetch_of(ahead));
}

void skinny_accumulate(const at::Tensor& p, const at::Tensor& q, const at::Tensor& acc, MemorySpan ahead) {
  check_operands("skinny_accumulate", p, q, acc);
  TORCH_CHECK(p.size(0) == q.size(0) && acc.size(0) == p.size(1) && acc.is_contiguous(),
              "skinny_accumulate: internal error, shapes ",
              p.sizes(), " ", q.sizes(), " ", acc.sizes());
  cpu::vec_kernels().panel_accumulate(p.const_data_ptr<float>(), p.stride(0), p.size(0), p.size(1),
                                      q.const_data_ptr<float>(), q.size(1), acc.mutable_data_ptr<float>(),
                                      prefetch_of(ahead));
}

void skinny_mm_accumulate(const at::Tensor& p, const at::Tensor& q, const at::Tensor& out, const at::Tensor& h,
                          const at::Tensor& acc, MemorySpan ahead) {
  const auto& kernels = cpu::vec_kernels();
  if (kernels.panel_mm_accumulate == nullptr || p.size(1) == 0) {  // the fused pass writes out per column chunk
    skinny_mm(p, q, out, {});
    skinny_accumulate(p, h, acc, ahead);  // the pass nearer to the rows' reader
    return;
  }
  check_operands("skinny_mm_accumulate", p, q, out);
  check_operands("skinny_mm_accumulate", p, h, acc);
  TORCH_CHECK(p.size(1) == q.size(0) && out.size(0) == p.size(0) && h.size(0) == p.size(0) &&
                  h.size(1) == q.size(1) && acc.size(0) == p.size(1) && acc.is_contiguous(),
              "skinny_mm_accumulate: internal error, shapes ", p.sizes(), " ", q.sizes(), " ", out.sizes(), " ",
              h.sizes(), " ", acc.sizes());
  kernels.panel_mm_accumulate(p.const_data_ptr<float>(), p.stride(0), p.size(0), p.size(1), q.const_data_ptr<float>(),
                              q.size(1), out.mutable_data_ptr<float>(), out.stride(0), h.const_data_ptr<float>(),
                              acc.mutable_data_ptr<float>(), prefetch_of(ahead));
}

// The LoRA terms as expand writes them (y's from xa and s B, dx's part from g and A): r up to this many columns.
constexpr int64_t kMaxExpandDepth = 64;

// q (width x r) as panel_expand's panels of op(q) = q^T (depth x width): ceil(width / kPanel) panels of depth x kPanel,
// zero in the rows past r and the columns past width.
at::Tensor pack_expand(const at::Tensor& q, int64_t depth) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.size(1) <= depth && depth <= kMaxExpandDepth,
              "float32 pack_expand: internal error, q ", q.sizes(), " for depth ", depth);
  const int64_t width = q.size(0);
  const int64_t r = q.size(1);
  const int64_t panels = (width + cpu::kPanel - 1) / cpu::kPanel;
  const at::Tensor padded = at::constant_pad_nd(q.t(), {0, panels * cpu::kPanel - width, 0, depth - r});
  return padded.reshape({depth, panels, cpu::kPanel}).permute({1, 0, 2}).contiguous();
}

// out = scale p q^T + bias for q packed by pack_expand(q, p.size(1)); out's rows may be strided.
void expand(const at::Tensor& p, const at::Tensor& packed, double scale, const at::Tensor& bias,
            const at::Tensor& out) {
  const int64_t depth = p.size(1);
  const int64_t width = out.size(1);
  TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kFloat && (depth <= 1 || p.stride(1) == 1) &&
                  packed.is_contiguous() && packed.dim() == 3 && packed.size(1) == depth &&
                  packed.size(0) == (width + cpu::kPanel - 1) / cpu::kPanel && out.dim() == 2 &&
                  out.size(0) == p.size(0) && out.stride(1) == 1 && out.scalar_type() == at::kFloat &&
                  (!bias.defined() ||
                   (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == width)),
              "float32 expand: internal error, operands ", p.sizes(), " ", packed.sizes(), " ", out.sizes());
  cpu::vec_kernels().panel_expand(p.const_data_ptr<float>(), p.stride(0), p.size(0), depth,
                                  packed.const_data_ptr<float>(), width, static_cast<float>(scale),
                                  bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                                  out.mutable_data_ptr<float>(), out.stride(0));
}

// out = weight + scale B A, in parallel over blocks of rows. Each output element is written once, from one read of
// weight: the memory traffic of a copy, with the r FMAs per element hidden under it.
void fold(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
          const at::Tensor& out) {
  if (!weight.is_contiguous() || !out.is_contiguous()) {
    at::addmm_out(const_cast<at::Tensor&>(out), weight, lora_B, lora_A, /*beta=*/1, /*alpha=*/scale);
    return;
  }
  const at::Tensor A = lora_A.contiguous();
  const at::Tensor sB = (lora_B * scale).contiguous();
  const int64_t rows = weight.size(0);
  const int64_t in = weight.size(1);
  const int64_t r = A.size(0);
  const float* w = weight.const_data_ptr<float>();
  const float* a = A.const_data_ptr<float>();
  const float* b = sB.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const auto& kernels = cpu::vec_kernels();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(in, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    kernels.fold_rows(w, b, a, r, in, begin, end, o);
  });
}

// Blocks of 256 KiB of float32 for the backward's skinny products: a block of x and one of dy sit in a core's L2
// with room to spare (on the AVX-512 Xeon of BENCHMARKS.md, 2^16 elements ran them about 5% faster than 2^17). The
// ATen GEMMs elsewhere keep the larger blocks of lora_cpu.cpp, which need fewer library calls. Without dropout, MKL
// wins below 8 blocks per worker: on that Xeon (2 threads), 1024 x 1024 forward + backward ran 19% faster on MKL at
// 16 rows, 8% at 128 and 2% at 512, and broke even at 8 blocks per worker. expand writes the LoRA terms of y and dx
// block by block, where MKL's call per block (16 to 128 rows, r deep) ran at half expand's rate.
const SkinnyKernels kFloatSkinnyKernels{
    cpu::kPanel,       1 << 16,
    cpu::kBlockRowMultiple,
    /*min_blocks_per_worker=*/8,
    /*forward_without_dropout=*/true,
    /*transposed_sums=*/false,
    skinny_mm,         skinny_accumulate,
    skinny_mm_accumulate,
    kMaxExpandDepth,
    pack_expand,
    expand,
    fold,
    /*accumulate_base=*/nullptr,
    /*base_takes_term=*/nullptr,
    /*base_with_term=*/nullptr};

// The bfloat16 kernels that run here (see cpu_bf16_kernels), or nullptr for ATen's GEMMs.
const SkinnyKernels* bf16_kernels() {
  static const SkinnyKernels* const kernels = [] {
    const char* cap = std::getenv("D9D_CPU_BF16_KERNELS");
    std::string most = cap != nullptr && *cap != '\0' ? cap : "amx";
    std::transform(most.begin(), most.end(), most.begin(), [](unsigned char c) { return std::tolower(c); });
    TORCH_CHECK(most == "amx" || most == "avx512_bf16" || most == "aten",
                "D9D_CPU_BF16_KERNELS must be amx, avx512_bf16 or aten (the most that the bfloat16 products may use), "
                "got '", most, "'");
    if (most == "amx" && amx_bf16_available()) {
      return &kAmxSkinnyKernels;
    }
    if (most != "aten" && avx512_bf16_available()) {
      return &kAvx512Bf16SkinnyKernels;
    }
    return static_cast<const SkinnyKernels*>(nullptr);
  }();
  return kernels;
}

}  // namespace

const char* cpu_bf16_kernels() {
  const SkinnyKernels* kernels = bf16_kernels();
  return kernels == &kAmxSkinnyKernels ? "AMX" : kernels == &kAvx512Bf16SkinnyKernels ? "AVX512_BF16" : "ATen";
}

const SkinnyKernels* cpu_skinny_kernels_for(const at::Tensor& x) {
  static const bool vectorized = vectorized_build();
  if (!x.device().is_cpu()) {
    return nullptr;
  }
  if (x.scalar_type() == at::kFloat && vectorized) {
    return &kFloatSkinnyKernels;
  }
  if (x.scalar_type() == at::kBFloat16) {
    return bf16_kernels();
  }
  return nullptr;
}

}  // namespace d9d
