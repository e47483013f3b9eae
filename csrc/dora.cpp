// DoRA's weight-norm ops: ||W + s B A|| per row, and the merge W <- m / ||W + s B A|| * (W + s B A), in blocks of
// rows so that no out x in temporary exists. Written once over ATen ops (the GEMMs go to MKL / cuBLAS), so one
// CompositeExplicitAutograd kernel serves every device; the ops are not differentiable (DoRA detaches the norm).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace d9d {
namespace {

// Rows per block: about 64 Ki elements of W, so a block of W + s B A stays in cache until its norms are taken.
constexpr int64_t kBlockElements = 1 << 16;

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble;
}

// The norms are taken in float32 for the 16-bit dtypes, in the weight's dtype otherwise.
at::ScalarType norm_dtype(at::ScalarType dtype) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) ? at::kFloat : dtype;
}

// Checks W (out x in), A (r x in), B (out x r) and returns the dtype the norms are computed in.
at::ScalarType check_dora(const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                          double scale) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be out x in (2D), got ", weight.sizes());
  TORCH_CHECK(is_float_dtype(weight.scalar_type()), op, ": weight must be float32, bfloat16, float16 or float64, got ",
              weight.scalar_type());
  const int64_t out = weight.size(0);
  const int64_t in = weight.size(1);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == in, op,
              ": lora_A must be r x in (2D with in == weight.size(1) == ", in, "), got ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out && lora_B.size(1) == lora_A.size(0), op,
              ": lora_B must be out x r (2D with out == weight.size(0) == ", out, " and r == lora_A.size(0) == ",
              lora_A.size(0), "), got ", lora_B.sizes());
  for (const auto* t : {&lora_A, &lora_B}) {
    TORCH_CHECK(t->device() == weight.device(), op, ": the adapters must be on weight's device ", weight.device(),
                ", got ", t->device());
    TORCH_CHECK(is_float_dtype(t->scalar_type()), op, ": the adapters must be floating point, got ", t->scalar_type());
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  return norm_dtype(weight.scalar_type());
}

// Calls body(row0, n, folded) for blocks of rows of W, where folded = W[row0:row0+n] + s B[row0:row0+n] A in the norm
// dtype, in a scratch reused across blocks.
template <typename Body>
void for_each_folded_block(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                           at::ScalarType dtype, const Body& body) {
  const int64_t out = weight.size(0);
  const int64_t in = weight.size(1);
  const int64_t step = std::max<int64_t>(1, std::min<int64_t>(out, kBlockElements / std::max<int64_t>(in, 1)));
  const at::Tensor A = lora_A.to(dtype);
  const at::Tensor B = lora_B.to(dtype);
  const at::Tensor scratch = at::empty({step, in}, weight.options().dtype(dtype));
  for (int64_t row0 = 0; row0 < out; row0 += step) {
    const int64_t n = std::min(step, out - row0);
    at::Tensor folded = scratch.narrow(0, 0, n);
    at::addmm_out(folded, weight.narrow(0, row0, n).to(dtype), B.narrow(0, row0, n), A, /*beta=*/1, /*alpha=*/scale);
    body(row0, n, folded);
  }
}

at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scale) {
  const at::ScalarType dtype = check_dora("dora_weight_norm", weight, lora_A, lora_B, scale);
  at::Tensor norm = at::empty({weight.size(0)}, weight.options().dtype(dtype));
  for_each_folded_block(weight, lora_A, lora_B, scale, dtype, [&](int64_t row0, int64_t n, const at::Tensor& folded) {
    at::Tensor part = norm.narrow(0, row0, n);
    at::linalg_vector_norm_out(part, folded, 2, at::IntArrayRef{1});
  });
  return norm;
}

void dora_merge_(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                 const at::Tensor& magnitude, double scale) {
  constexpr const char* op = "dora_merge_";
  const at::ScalarType dtype = check_dora(op, weight, lora_A, lora_B, scale);
  TORCH_CHECK(magnitude.dim() == 1 && magnitude.size(0) == weight.size(0), op,
              ": magnitude must be 1D of size out == weight.size(0) == ", weight.size(0), ", got ", magnitude.sizes());
  TORCH_CHECK(magnitude.device() == weight.device(), op, ": magnitude must be on weight's device ", weight.device(),
              ", got ", magnitude.device());
  const at::Tensor m = magnitude.to(dtype);
  // The norm of each block is taken before the block is rescaled, from the unmerged weight, as in DoRA's forward.
  for_each_folded_block(weight, lora_A, lora_B, scale, dtype, [&](int64_t row0, int64_t n, const at::Tensor& folded) {
    const at::Tensor factor = m.narrow(0, row0, n) / at::linalg_vector_norm(folded, 2, at::IntArrayRef{1});
    folded.mul_(factor.unsqueeze(1));
    weight.narrow(0, row0, n).copy_(folded);
  });
}

}  // namespace
}  // namespace d9d

TORCH_LIBRARY_FRAGMENT(d9d, m) {
  m.def("dora_weight_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");
  m.def("dora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, float scale) -> ()");
  // DoRA without dropout on the fused LoRA op (kernels in cpu/lora_cpu.cpp and cuda/lora_cuda.cu; see lora.h).
  m.def(
      "dora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor factor, "
      "float scale) -> Tensor");
  m.def(
      "dora_backward(Tensor grad_y, Tensor x, Tensor y, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor factor, float scale, bool need_grad_x) -> (Tensor grad_x, Tensor grad_A, Tensor grad_B, "
      "Tensor grad_factor)");
}

TORCH_LIBRARY_IMPL(d9d, CompositeExplicitAutograd, m) {
  m.impl("dora_weight_norm", &d9d::dora_weight_norm);
  m.impl("dora_merge_", &d9d::dora_merge_);
}
