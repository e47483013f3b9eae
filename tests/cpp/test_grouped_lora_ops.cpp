// C++ unit tests of the grouped (per-expert) LoRA ops through the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <tuple>

namespace {

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor grouped_lora_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, const at::Tensor& offsets, double scale, double dropout,
                                const at::Tensor& seed) {
  return op("d9d::grouped_lora_forward")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        double, double, const at::Tensor&)>()
      .call(x, weight, lora_A, lora_B, offsets, scale, dropout, seed);
}

at::Tensor dropout_mask(const at::Tensor& x, double dropout, const at::Tensor& seed) {
  return op("d9d::dropout_mask")
      .typed<at::Tensor(const at::Tensor&, double, const at::Tensor&)>()
      .call(x, dropout, seed);
}

// Experts 0..3 own 3, 0, 5 and 2 rows; the reference loops over them in float64.
struct Inputs {
  at::Tensor x = torch::randn({10, 13}, torch::kDouble);
  at::Tensor weight = torch::randn({4, 6, 13}, torch::kDouble);
  at::Tensor lora_A = torch::randn({4, 2, 13}, torch::kDouble);
  at::Tensor lora_B = torch::randn({4, 6, 2}, torch::kDouble);
  at::Tensor offsets = torch::tensor({int64_t{3}, int64_t{3}, int64_t{8}, int64_t{10}});
  at::Tensor seed = torch::tensor({int64_t{41}});
};

at::Tensor reference(const Inputs& in, double scale, const at::Tensor& keep) {
  at::Tensor y = torch::empty({in.x.size(0), in.weight.size(1)}, in.x.options());
  const at::Tensor x_lora = in.x * keep;
  int64_t lo = 0;
  for (int64_t e = 0; e < 4; ++e) {
    const int64_t hi = in.offsets[e].item<int64_t>();
    const at::Tensor rows = in.x.slice(0, lo, hi);
    y.slice(0, lo, hi).copy_(rows.mm(in.weight[e].t()) +
                             scale * x_lora.slice(0, lo, hi).mm(in.lora_A[e].t()).mm(in.lora_B[e].t()));
    lo = hi;
  }
  return y;
}

TEST(GroupedLoraForward, MatchesReferenceWithTheTwoDimensionalOpsMask) {
  torch::manual_seed(0);
  const Inputs in;
  const at::Tensor plain = grouped_lora_forward(in.x, in.weight, in.lora_A, in.lora_B, in.offsets, 0.5, 0.0, in.seed);
  EXPECT_TRUE(torch::allclose(plain, reference(in, 0.5, torch::ones_like(in.x)), 1e-10, 1e-10));
  const at::Tensor dropped = grouped_lora_forward(in.x, in.weight, in.lora_A, in.lora_B, in.offsets, 0.5, 0.3, in.seed);
  const at::Tensor keep = dropout_mask(in.x, 0.3, in.seed).to(torch::kDouble) / 0.7;
  EXPECT_TRUE(torch::allclose(dropped, reference(in, 0.5, keep), 1e-10, 1e-10));
  EXPECT_FALSE(torch::allclose(dropped, plain));
}

TEST(GroupedLoraForward, BadOffsetsThrowNamingOpAndArgument) {
  const Inputs in;
  try {
    grouped_lora_forward(in.x, in.weight, in.lora_A, in.lora_B, torch::tensor({int64_t{3}, int64_t{2}, int64_t{8},
                                                                                  int64_t{10}}),
                         1.0, 0.0, in.seed);
    FAIL() << "decreasing offsets were accepted";
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    EXPECT_NE(message.find("grouped_lora_forward: offsets must be non-decreasing"), std::string::npos) << message;
  }
}

TEST(GroupedLoraMerge, AddsEachExpertsUpdateInPlace) {
  torch::manual_seed(1);
  const Inputs in;
  at::Tensor merged = in.weight.clone();
  op("d9d::grouped_lora_merge_")
      .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>()
      .call(merged, in.lora_A.to(torch::kFloat), in.lora_B.to(torch::kFloat), 0.25);
  const at::Tensor expected = in.weight + 0.25 * torch::bmm(in.lora_B.to(torch::kFloat).to(torch::kDouble),
                                                            in.lora_A.to(torch::kFloat).to(torch::kDouble));
  EXPECT_TRUE(torch::allclose(merged, expected, 1e-10, 1e-10));
}

}  // namespace
