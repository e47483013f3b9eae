// Autograd of the apply ops (lora_forward, dora_forward, grouped_lora_forward), in C++: their Python formulas
// (torch.library.register_autograd) cost about 70 us of interpreter time per layer and step, the C++ nodes about 4
// (see BENCHMARKS.md).
//
// Autograd keeps nothing of x's size but x itself (and DoRA's output): the backward ops regenerate the dropout mask
// and x A^T block by block. Under create_graph=True (double backward, e.g. gradient penalties) the LoRA and DoRA
// gradients must themselves be differentiable, so they are computed from the same formulas in ATen ops, which
// autograd records. The backwards read only saved tensors and saved_data, so compiled autograd may trace them
// (is_traceable).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace d9d {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The dispatcher's handle of op `name` of the d9d library, for calls below autograd (forward) or through it.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = std::optional<at::Tensor>;

at::Tensor call_dropout_mask(const at::Tensor& x, double dropout, const at::Tensor& seed) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, double, const at::Tensor&)>("d9d::dropout_mask");
  return op.call(x, dropout, seed);
}

// Which of a function's tensor inputs autograd wants gradients for, by position among them. Autograd counts only the
// tensors passed: `absent` is the position of an optional one that was not (kAllPassed: none).
struct InputGrads {
  static constexpr int64_t kAllPassed = -1;
  std::vector<bool> need;

  InputGrads(AutogradContext* ctx, int64_t tensors, int64_t absent) {
    for (int64_t i = 0, edge = 0; i < tensors; ++i) {
      need.push_back(i != absent && ctx->needs_input_grad(edge));
      edge += i != absent ? 1 : 0;
    }
  }

  // `grad` where input i needs it, else undefined (no gradient).
  at::Tensor operator()(int64_t i, const at::Tensor& grad) const {
    return need[i] ? grad : at::Tensor();
  }
};

// The position of the bias among the tensor inputs of lora_forward and dora_forward (after x and weight).
constexpr int64_t kBias = 2;

// lora_backward's (grad_x, grad_A, grad_B) in ATen ops, with the op's own dropout mask.
Tensors3 differentiable_lora_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& lora_A_in, const at::Tensor& lora_B_in, double scale,
                                      double dropout, const at::Tensor& seed) {
  // float32 adapters on 16-bit x: the products run in x's dtype, as in the op; the casts' backward returns float32.
  const at::Tensor lora_A = lora_A_in.to(x.scalar_type());
  const at::Tensor lora_B = lora_B_in.to(x.scalar_type());
  at::Tensor keep_scale;
  if (dropout > 0) {
    keep_scale = call_dropout_mask(x.detach(), dropout, seed).to(x.scalar_type()) / (1 - dropout);
  }
  const at::Tensor x_dropped = keep_scale.defined() ? x * keep_scale : x;
  const at::Tensor g = at::matmul(grad_y, lora_B) * scale;  // the gradient of x_dropped A^T
  const at::Tensor grad_x_lora = at::matmul(g, lora_A);
  const at::Tensor grad_x =
      at::matmul(grad_y, weight) + (keep_scale.defined() ? grad_x_lora * keep_scale : grad_x_lora);
  const at::Tensor x2d = x_dropped.reshape({-1, x.size(-1)});
  const at::Tensor grad_A = g.reshape({-1, g.size(-1)}).t().mm(x2d);
  const at::Tensor grad_B = grad_y.reshape({-1, grad_y.size(-1)}).t().mm(x2d.mm(lora_A.t())) * scale;
  return {grad_x, grad_A, grad_B};
}

class LoRAForward : public torch::autograd::Function<LoRAForward> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptionalTensor& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scale, double dropout, const at::Tensor& seed) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                                const at::Tensor&, const at::Tensor&, double, double,
                                                const at::Tensor&)>("d9d::lora_forward");
    ctx->save_for_backward({x, weight, lora_A, lora_B, seed});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, weight, bias, lora_A, lora_B, scale, dropout, seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<Tensors3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, double, const at::Tensor&, bool)>("d9d::lora_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &seed = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    const double dropout = ctx->saved_data["dropout"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const InputGrads wanted(ctx, 6, has_bias ? InputGrads::kAllPassed : kBias);  // x, W, bias, A, B, seed
    const at::Tensor& grad_y = grads[0];
    const auto [grad_x, grad_A, grad_B] =
        at::GradMode::is_enabled()
            ? differentiable_lora_backward(grad_y, x, weight, lora_A, lora_B, scale, dropout, seed)
            : op.call(grad_y, x, weight, lora_A, lora_B, scale, dropout, seed, wanted.need[0]);
    // The weight and bias are frozen in LoRA training; their gradients are plain GEMM / sum when asked for anyway.
    const at::Tensor grad_y2d = grad_y.reshape({-1, grad_y.size(-1)});
    return {wanted(0, grad_x),
            wanted.need[1] ? grad_y2d.t().mm(x.reshape({-1, x.size(-1)})) : at::Tensor(),
            wanted.need[2] ? grad_y2d.sum(0) : at::Tensor(),
            wanted(3, grad_A),
            wanted(4, grad_B),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

class DoRAForward : public torch::autograd::Function<DoRAForward> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptionalTensor& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const at::Tensor& factor, double scale) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
        "d9d::dora_forward");
    at::Tensor y;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      y = op.call(x, weight, bias, lora_A, lora_B, factor, scale);
    }
    // The output itself rather than DoRA's unscaled output z = (y - bias) / factor: no second N x out tensor.
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor()), lora_A, lora_B, factor, y});
    ctx->saved_data["scale"] = scale;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<Tensors4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptionalTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                           bool)>("d9d::dora_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &lora_A = saved[3], &lora_B = saved[4];
    const at::Tensor &factor = saved[5], &y = saved[6];
    const double scale = ctx->saved_data["scale"].toDouble();
    const InputGrads wanted(ctx, 6, bias.defined() ? InputGrads::kAllPassed : kBias);  // x, W, bias, A, B, f
    const at::Tensor& grad_y = grads[0];
    const at::Tensor gy = grad_y.reshape({-1, grad_y.size(-1)});
    at::Tensor grad_x, grad_weight, grad_A, grad_B, grad_factor;
    if (at::GradMode::is_enabled() || wanted.need[1]) {
      // Double backward (create_graph=True), or a trainable base weight: the same gradients in ATen ops, which
      // autograd records, with z recomputed (an extra GEMM; rare paths).
      const at::Tensor x2d = x.reshape({-1, x.size(-1)});
      const at::Tensor xa = x2d.mm(lora_A.t());
      const at::Tensor z = x2d.mm(weight.t()) + scale * xa.mm(lora_B.t());
      const at::Tensor grad_z = gy * factor;
      const at::Tensor g = scale * grad_z.mm(lora_B);  // the gradient of x A^T
      grad_x = (grad_z.mm(weight) + g.mm(lora_A)).reshape(x.sizes());
      grad_A = g.t().mm(x2d);
      grad_B = scale * grad_z.t().mm(xa);
      grad_factor = (gy * z).sum(0);
      grad_weight = wanted.need[1] ? grad_z.t().mm(x2d) : at::Tensor();
    } else {
      const OptionalTensor maybe_bias = bias.defined() ? OptionalTensor(bias) : std::nullopt;
      std::tie(grad_x, grad_A, grad_B, grad_factor) =
          op.call(grad_y, x, y, weight, maybe_bias, lora_A, lora_B, factor, scale, wanted.need[0]);
    }
    return {wanted(0, grad_x),
            grad_weight,
            wanted.need[2] ? gy.sum(0) : at::Tensor(),
            wanted(3, grad_A),
            wanted(4, grad_B),
            wanted(5, grad_factor),
            at::Tensor()};
  }
};

class GroupedLoRAForward : public torch::autograd::Function<GroupedLoRAForward> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets,
                            double scale, double dropout, const at::Tensor& seed) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, double, double,
                                                const at::Tensor&)>("d9d::grouped_lora_forward");
    ctx->save_for_backward({x, weight, lora_A, lora_B, offsets, seed});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout"] = dropout;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, weight, lora_A, lora_B, offsets, scale, dropout, seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<Tensors4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double, double, const at::Tensor&, bool)>(
            "d9d::grouped_lora_backward");
    const variable_list saved = ctx->get_saved_variables();
    const InputGrads wanted(ctx, 6, InputGrads::kAllPassed);  // x, weight, A, B, offsets, seed
    const auto [grad_x, grad_weight, grad_A, grad_B] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["scale"].toDouble(),
                ctx->saved_data["dropout"].toDouble(), saved[5], wanted.need[1]);
    return {wanted(0, grad_x), wanted(1, grad_weight), wanted(2, grad_A), wanted(3, grad_B), at::Tensor(),
            at::Tensor(),      at::Tensor(),           at::Tensor()};
  }
};

at::Tensor lora_forward_autograd(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout,
                                 const at::Tensor& seed) {
  return LoRAForward::apply(x, weight, bias, lora_A, lora_B, scale, dropout, seed);
}

at::Tensor dora_forward_autograd(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& factor,
                                 double scale) {
  return DoRAForward::apply(x, weight, bias, lora_A, lora_B, factor, scale);
}

at::Tensor grouped_lora_forward_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                         const at::Tensor& lora_B, const at::Tensor& offsets, double scale,
                                         double dropout, const at::Tensor& seed) {
  return GroupedLoRAForward::apply(x, weight, lora_A, lora_B, offsets, scale, dropout, seed);
}

}  // namespace
}  // namespace d9d

TORCH_LIBRARY_IMPL(d9d, Autograd, m) {
  m.impl("lora_forward", &d9d::lora_forward_autograd);
  m.impl("dora_forward", &d9d::dora_forward_autograd);
  m.impl("grouped_lora_forward", &d9d::grouped_lora_forward_autograd);
}
