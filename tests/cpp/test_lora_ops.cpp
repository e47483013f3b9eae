// C++ unit tests of the d9d ops through the dispatcher (torch::ops are looked up by name, as Python does).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <tuple>

#include "dropout_mask.h"

namespace {

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor lora_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout,
                        const at::Tensor& seed) {
  return op("d9d::lora_forward")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                        const at::Tensor&, double, double, const at::Tensor&)>()
      .call(x, weight, bias, lora_A, lora_B, scale, dropout, seed);
}

at::Tensor dropout_mask(const at::Tensor& x, double dropout, const at::Tensor& seed) {
  return op("d9d::dropout_mask")
      .typed<at::Tensor(const at::Tensor&, double, const at::Tensor&)>()
      .call(x, dropout, seed);
}

struct Inputs {
  at::Tensor x = torch::randn({2, 5, 12});
  at::Tensor weight = torch::randn({7, 12});
  at::Tensor bias = torch::randn({7});
  at::Tensor lora_A = torch::randn({3, 12});
  at::Tensor lora_B = torch::randn({7, 3});
  at::Tensor seed = torch::tensor({int64_t{99}});
};

TEST(LoraForward, MatchesReferenceWithAndWithoutDropout) {
  torch::manual_seed(0);
  Inputs in;
  // 10 rows take the folded path without dropout (W + s B A), 5 rows the blocked LoRA GEMMs.
  for (const at::Tensor& x : {in.x, in.x[0]}) {
    for (double dropout : {0.0, 0.4}) {
      const at::Tensor y = lora_forward(x, in.weight, in.bias, in.lora_A, in.lora_B, 0.5, dropout, in.seed);
      at::Tensor xd = x;
      if (dropout > 0) {
        xd = x * dropout_mask(x, dropout, in.seed) / (1 - dropout);
      }
      const at::Tensor want =
          at::linear(x, in.weight, in.bias) + 0.5 * at::linear(at::linear(xd, in.lora_A), in.lora_B);
      EXPECT_TRUE(at::allclose(y, want, 1e-4, 1e-4)) << "dropout " << dropout << ", x " << x.sizes();
    }
  }
}

TEST(LoraForward, BadShapeThrowsNamingOpAndArgument) {
  Inputs in;
  try {
    lora_forward(in.x, in.weight, in.bias, torch::randn({3, 11}), in.lora_B, 1.0, 0.0, in.seed);
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what_without_backtrace()).find("lora_forward: lora_A must be r x in"),
              std::string::npos)
        << error.what_without_backtrace();
  }
  EXPECT_THROW(lora_forward(in.x, in.weight, torch::randn({6}), in.lora_A, in.lora_B, 1.0, 0.0, in.seed), c10::Error);
  EXPECT_THROW(lora_forward(in.x, in.weight, in.bias, in.lora_A, in.lora_B, 1.0, 1.5, in.seed), c10::Error);
  EXPECT_THROW(lora_forward(in.x, in.weight.to(at::kDouble), in.bias, in.lora_A, in.lora_B, 1.0, 0.0, in.seed),
               c10::Error);
}

TEST(DropoutMask, IndependentOfThreadCountAndMatchesPhiloxEngine) {
  const at::Tensor x = torch::empty({67, 45});
  const at::Tensor seed = torch::tensor({int64_t{1} << 40});
  const int previous = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = dropout_mask(x, 0.2, seed);
  at::set_num_threads(2);
  const at::Tensor two = dropout_mask(x, 0.2, seed);
  at::set_num_threads(previous);
  EXPECT_TRUE(at::equal(one, two));

  // The CPU kernel draws its bits lane-parallel; they must equal at::philox_engine's (which the CUDA kernel uses).
  const auto threshold = static_cast<uint32_t>(0.2 * d9d::kMaskLevels + 0.5);
  const auto mask = one.accessor<bool, 2>();
  for (int64_t row = 0; row < x.size(0); ++row) {
    for (int64_t col = 0; col < x.size(1); ++col) {
      const d9d::MaskBits bits = d9d::mask_bits(uint64_t{1} << 40, row, col / d9d::kMaskGroup);
      ASSERT_EQ(mask[row][col], bits.keep(static_cast<int>(col % d9d::kMaskGroup), threshold)) << row << ", " << col;
    }
  }
}

}  // namespace
