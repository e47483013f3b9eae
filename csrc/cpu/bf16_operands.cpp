// The checked tensor-level calls of the bfloat16 skinny kernels (see bf16_operands.h).
#include "bf16_operands.h"

#include <c10/util/Exception.h>

namespace d9d {
namespace {

constexpr int64_t kPanelWidth = 16;  // columns of the panels of rp columns that both families take

void check_operands(const char* what, const at::Tensor& p, const at::Tensor& q, int64_t rp) {
  TORCH_CHECK(p.dim() == 2 && (p.size(1) <= 1 || p.stride(1) == 1) && p.scalar_type() == at::kBFloat16 &&
                  q.is_contiguous() && q.scalar_type() == at::kBFloat16 && q.size(1) == rp && rp % kPanelWidth == 0,
              what, ": internal error, unsupported operands ", p.sizes(), " ", q.sizes());
}

}  // namespace

void call_bf16_mm(const char* what, Bf16MmKernel kernel, const at::Tensor& p, const at::Tensor& q,
                  const at::Tensor& out) {
  check_operands(what, p, q, out.size(1));
  TORCH_CHECK(p.size(1) == q.size(0) && out.dim() == 2 && out.size(0) == p.size(0) && out.stride(1) == 1 &&
                  out.scalar_type() == at::kBFloat16,
              what, ": internal error, shapes ", p.sizes(), " ", q.sizes(), " ", out.sizes());
  kernel(bf16_data(p), p.stride(0), p.size(0), p.size(1), bf16_data(q), q.size(1),
         reinterpret_cast<uint16_t*>(out.mutable_data_ptr()), out.stride(0));
}

void call_bf16_accumulate(const char* what, Bf16AccumulateKernel kernel, const at::Tensor& p, const at::Tensor& q,
                          const at::Tensor& acc) {
  check_operands(what, p, q, acc.size(0));
  TORCH_CHECK(p.size(0) == q.size(0) && acc.dim() == 2 && acc.size(1) == p.size(1) && acc.is_contiguous() &&
                  acc.scalar_type() == at::kFloat,
              what, ": internal error, shapes ", p.sizes(), " ", q.sizes(), " ", acc.sizes());
  kernel(bf16_data(p), p.stride(0), p.size(0), p.size(1), bf16_data(q), q.size(1), acc.mutable_data_ptr<float>());
}

}  // namespace d9d
