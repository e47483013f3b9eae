// The grouped LoRA ops' schemas, argument checks and device-independent logic (see grouped_lora.h).
#include "grouped_lora.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dropout_mask.h"

namespace d9d {
namespace {

struct Shape {
  int64_t experts, out, in, r;
};

bool is_float_dtype(at::ScalarType dtype) {
  // float64 is there for gradcheck; training runs in float32, bfloat16 or float16.
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble;
}

// Checks weight (E, out, in), lora_A (E, r, in), lora_B (E, out, r) and their devices; returns the shape.
Shape check_weights(const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK(weight.dim() == 3, op, ": weight must be 3-D (E, out, in), got ", weight.sizes());
  TORCH_CHECK(is_float_dtype(weight.scalar_type()), op, ": weight must be float32, bfloat16, float16 or float64, got ",
              weight.scalar_type());
  const Shape s{weight.size(0), weight.size(1), weight.size(2), lora_A.dim() == 3 ? lora_A.size(1) : -1};
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(0) == s.experts && lora_A.size(2) == s.in, op,
              ": lora_A must be (E, r, in) with E == weight.size(0) == ", s.experts, " and in == weight.size(2) == ",
              s.in, ", got ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(0) == s.experts && lora_B.size(1) == s.out && lora_B.size(2) == s.r,
              op, ": lora_B must be (E, out, r) with E == ", s.experts, ", out == weight.size(1) == ", s.out,
              " and r == lora_A.size(1) == ", s.r, ", got ", lora_B.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"lora_A", &lora_A}, {"lora_B", &lora_B}}) {
    TORCH_CHECK(t->device() == weight.device(), op, ": ", name, " must be on weight's device ", weight.device(),
                ", got ", t->device());
    TORCH_CHECK(is_float_dtype(t->scalar_type()), op, ": ", name, " must be floating point, got ", t->scalar_type());
  }
  return s;
}

// Checks x (rows, in) against the weights; the adapters must have x's dtype (the Python wrapper casts them).
Shape check_apply(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, double scale) {
  const Shape s = check_weights(op, weight, lora_A, lora_B);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == s.in, op, ": x must be (rows, in) with in == weight.size(2) == ", s.in,
              ", got ", x.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"weight", &weight},
                                {"lora_A", &lora_A},
                                {"lora_B", &lora_B}}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type(), " (cast the adapters to the compute dtype first)");
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  return s;
}

// The end row of each expert, read from offsets (int64, (E,), non-decreasing, at most rows; any device).
std::vector<int64_t> expert_ends(const char* op, const at::Tensor& offsets, int64_t experts, int64_t rows) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == experts && offsets.scalar_type() == at::kLong, op,
              ": offsets must be int64 of shape (", experts, ",), got ", offsets.scalar_type(), " ", offsets.sizes());
  const at::Tensor host = offsets.to(at::kCPU).contiguous();
  const int64_t* data = host.const_data_ptr<int64_t>();
  std::vector<int64_t> ends(data, data + experts);
  int64_t previous = 0;
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK(ends[e] >= previous && ends[e] <= rows, op,
                ": offsets must be non-decreasing end rows in [0, x.size(0) == ", rows, "], got offsets[", e,
                "] == ", ends[e], " after ", previous);
    previous = ends[e];
  }
  return ends;
}

int64_t block_rows(const GroupedKernels& kernels, int64_t rows, int64_t width) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, kernels.block_elements / std::max<int64_t>(width, 1)));
}

// float32 accumulator for reduced-precision gradients summed over blocks.
at::ScalarType accumulate_dtype(at::ScalarType dtype) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) ? at::kFloat : dtype;
}

// acc += p q, in acc's dtype.
void accumulate(at::Tensor acc, const at::Tensor& p, const at::Tensor& q) {
  if (acc.scalar_type() == p.scalar_type()) {
    acc.addmm_(p, q);
  } else {
    acc.add_(at::mm(p, q));
  }
}

// Calls body(e, lo, hi) for every expert e with rows [lo, hi) non-empty; returns the end of the last expert's rows.
template <typename Body>
int64_t for_each_expert(const std::vector<int64_t>& ends, const Body& body) {
  int64_t lo = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(ends.size()); ++e) {
    if (ends[e] > lo) {
      body(e, lo, ends[e]);
    }
    lo = ends[e];
  }
  return lo;
}

}  // namespace

at::Tensor grouped_lora_forward(const GroupedKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets,
                                double scale, double dropout, const at::Tensor& seed) {
  constexpr const char* op = "grouped_lora_forward";
  const Shape s = check_apply(op, x, weight, lora_A, lora_B, scale);
  const DropoutSpec spec = make_dropout_spec(op, dropout, seed);
  const int64_t rows = x.size(0);
  const std::vector<int64_t> ends = expert_ends(op, offsets, s.experts, rows);

  const at::Tensor x2d = x.contiguous();
  at::Tensor y = at::empty({rows, s.out}, x2d.options());
  const int64_t step = block_rows(kernels, rows, std::max(s.in, s.out));
  const at::Tensor dropped_buffer = dropout > 0.0 ? at::empty({step, s.in}, x2d.options()) : at::Tensor();
  const at::Tensor xa_buffer = at::empty({step, s.r}, x2d.options());
  const int64_t end = for_each_expert(ends, [&](int64_t e, int64_t lo, int64_t hi) {
    const at::Tensor A_t = lora_A[e].t();
    const at::Tensor B_t = lora_B[e].t();
    for (int64_t row0 = lo; row0 < hi; row0 += step) {
      const int64_t n = std::min(step, hi - row0);
      at::Tensor source = x2d.narrow(0, row0, n);
      if (dropout > 0.0) {
        const at::Tensor dropped = dropped_buffer.narrow(0, 0, n);
        kernels.dropout_rows(source, dropped, row0, spec);
        source = dropped;
      }
      at::Tensor xa = xa_buffer.narrow(0, 0, n);
      at::mm_out(xa, source, A_t);
      at::Tensor y_block = y.narrow(0, row0, n);
      at::addmm_out(y_block, y_block, xa, B_t, /*beta=*/0, /*alpha=*/scale);  // beta 0 ignores y's contents
    }
    // The base GEMM accumulates into the LoRA term (beta = 1): no rows x out temporary.
    y.narrow(0, lo, hi - lo).addmm_(x2d.narrow(0, lo, hi - lo), weight[e].t());
  });
  if (end < rows) {
    y.narrow(0, end, rows - end).zero_();  // rows routed to no expert
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward(
    const GroupedKernels& kernels, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets, double scale, double dropout,
    const at::Tensor& seed, bool weight_grad) {
  constexpr const char* op = "grouped_lora_backward";
  const Shape s = check_apply(op, x, weight, lora_A, lora_B, scale);
  const int64_t rows = x.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows && grad.size(1) == s.out, op, ": grad must be (rows, out) == (",
              rows, ", ", s.out, "), got ", grad.sizes());
  TORCH_CHECK(grad.device() == x.device() && grad.scalar_type() == x.scalar_type(), op,
              ": grad must have x's device and dtype ", x.device(), " ", x.scalar_type(), ", got ", grad.device(), " ",
              grad.scalar_type());
  const DropoutSpec spec = make_dropout_spec(op, dropout, seed);
  const std::vector<int64_t> ends = expert_ends(op, offsets, s.experts, rows);

  const at::Tensor x2d = x.contiguous();
  const at::Tensor gy = grad.contiguous();
  at::Tensor grad_x = at::empty({rows, s.in}, x2d.options());
  at::Tensor grad_W =
      weight_grad ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  // dA_e and dB_e / s are sums over the expert's blocks, in float32 for the 16-bit dtypes.
  const auto acc_options = x2d.options().dtype(accumulate_dtype(x2d.scalar_type()));
  const at::Tensor grad_A_acc = at::zeros({s.experts, s.r, s.in}, acc_options);
  const at::Tensor grad_B_acc = at::zeros({s.experts, s.out, s.r}, acc_options);
  const at::Tensor Bs = lora_B * scale;
  const int64_t step = block_rows(kernels, rows, std::max(s.in, s.out));
  const at::Tensor dropped_buffer = dropout > 0.0 ? at::empty({step, s.in}, x2d.options()) : at::Tensor();
  const at::Tensor xa_buffer = at::empty({step, s.r}, x2d.options());
  const at::Tensor g_buffer = at::empty({step, s.r}, x2d.options());
  const int64_t end = for_each_expert(ends, [&](int64_t e, int64_t lo, int64_t hi) {
    const at::Tensor A = lora_A[e];
    for (int64_t row0 = lo; row0 < hi; row0 += step) {
      const int64_t n = std::min(step, hi - row0);
      const at::Tensor gy_block = gy.narrow(0, row0, n);
      const at::Tensor x_block = x2d.narrow(0, row0, n);
      // g = s dy B_e is the gradient w.r.t. xa; its product with A_e is the LoRA part of dx (masked below).
      at::Tensor g = g_buffer.narrow(0, 0, n);
      at::mm_out(g, gy_block, Bs[e]);
      at::Tensor dx_block = grad_x.narrow(0, row0, n);
      at::mm_out(dx_block, g, A);
      at::Tensor source = x_block;
      if (dropout > 0.0) {
        // Regenerate the block's mask: dropout(x) feeds xa and dA, and dx's LoRA part is masked in the same pass.
        source = dropped_buffer.narrow(0, 0, n);
        kernels.dropout_rows_backward(x_block, source, dx_block, row0, spec);
      }
      at::Tensor xa = xa_buffer.narrow(0, 0, n);
      at::mm_out(xa, source, A.t());
      accumulate(grad_A_acc[e], g.t(), source);    // dA_e = g^T dropout(x_e)
      accumulate(grad_B_acc[e], gy_block.t(), xa);  // dB_e = s dy^T xa (s applied once at the end)
    }
    const at::Tensor gy_e = gy.narrow(0, lo, hi - lo);
    const at::Tensor x_e = x2d.narrow(0, lo, hi - lo);
    grad_x.narrow(0, lo, hi - lo).addmm_(gy_e, weight[e]);  // the base GEMM accumulates into the LoRA part
    if (weight_grad) {
      at::Tensor grad_W_e = grad_W[e];
      at::mm_out(grad_W_e, gy_e.t(), x_e);
    }
  });
  if (end < rows) {
    grad_x.narrow(0, end, rows - end).zero_();
  }
  const at::Tensor grad_A = grad_A_acc.to(x2d.scalar_type());
  const at::Tensor grad_B = grad_B_acc.mul_(scale).to(x2d.scalar_type());
  return {grad_x, grad_W, grad_A, grad_B};
}

void grouped_lora_merge(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  constexpr const char* op = "grouped_lora_merge_";
  const Shape s = check_weights(op, weight, lora_A, lora_B);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  // Casting the small adapters is cheap; each expert's product goes straight into W_e (beta = 1).
  const at::Tensor A = lora_A.to(weight.scalar_type());
  const at::Tensor B = lora_B.to(weight.scalar_type());
  for (int64_t e = 0; e < s.experts; ++e) {
    weight[e].addmm_(B[e], A[e], /*beta=*/1, /*alpha=*/scale);
  }
}

}  // namespace d9d

TORCH_LIBRARY_FRAGMENT(d9d, m) {
  m.def(
      "grouped_lora_forward(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor offsets, float scale, "
      "float dropout, Tensor seed) -> Tensor");
  m.def(
      "grouped_lora_backward(Tensor grad, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor offsets, "
      "float scale, float dropout, Tensor seed, bool weight_grad) -> (Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_A, Tensor grad_B)");
  m.def("grouped_lora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()");
}
