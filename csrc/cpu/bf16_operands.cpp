// The checked tensor-level calls of the bfloat16 skinny kernels (see bf16_operands.h).
#include "bf16_operands.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

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

at::Tensor pack_bf16_expand(const char* what, InterleaveRowsKernel kernel, const at::Tensor& q, int64_t depth,
                            int64_t max_depth) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kBFloat16 && q.size(1) <= depth && depth > 0 &&
                  depth % 2 == 0 && depth <= max_depth,
              what, ": internal error, unsupported operand ", q.sizes(), " for depth ", depth);
  // Pairs of columns are gathered as 32-bit words from contiguous rows: an odd r gets a zero column, so that none
  // reads past q. (A view with one column may count as contiguous whatever its strides; padding copies it.)
  const at::Tensor even = q.size(1) % 2 != 0 ? at::constant_pad_nd(q, {0, 1}).contiguous() : q.contiguous();
  const int64_t width = even.size(0);
  const int64_t width_pad = (std::max<int64_t>(width, 1) + 31) / 32 * 32;
  at::Tensor packed = at::empty({depth / 2, width_pad}, even.options().dtype(at::kInt));
  kernel(bf16_data(even), even.stride(0), width, even.size(1), depth, width_pad,
         reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<int32_t>()));
  return packed;
}

void call_bf16_expand(const char* what, Bf16ExpandKernel kernel, const at::Tensor& p, const at::Tensor& packed,
                      double scale, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t depth = p.size(1);
  TORCH_CHECK(p.dim() == 2 && p.stride(1) == 1 && p.scalar_type() == at::kBFloat16 && packed.dim() == 2 &&
                  packed.size(0) * 2 == depth && out.dim() == 2 && out.stride(1) == 1 &&
                  out.scalar_type() == at::kBFloat16 && out.size(0) == p.size(0) &&
                  packed.size(1) >= out.size(1) && (!bias.defined() || (bias.scalar_type() == at::kFloat &&
                                                                        bias.is_contiguous() &&
                                                                        bias.numel() == out.size(1))),
              what, ": internal error, unsupported operands ", p.sizes(), " ", packed.sizes(), " ", out.sizes());
  kernel(bf16_data(p), p.stride(0), p.size(0), depth,
         reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>()), out.size(1), packed.size(1),
         static_cast<float>(scale), bias.defined() ? bias.const_data_ptr<float>() : nullptr,
         reinterpret_cast<uint16_t*>(out.mutable_data_ptr()), out.stride(0));
}

}  // namespace d9d
