// C++ unit tests of the d9d ops through the dispatcher (torch::ops are looked up by name, as Python does).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/avx512_bf16_gemm.h"
#include "cpu/bf16_base_gemm.h"
#include "cpu/vec_kernels.h"
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
  // 10 rows take the folded path without dropout (W + s B A); 5 rows the LoRA GEMMs (whole on the CPU without
  // dropout, blocked with it).
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

// The op's autograd (csrc/apply_autograd.cpp) from C++, against ATen's own autograd of the same formula: the
// gradients of the inputs that require them, with and without bias and dropout, with x and W frozen or not (which
// shifts the positions autograd counts the other inputs at).
TEST(LoraForward, AutogradMatchesAtenAutograd) {
  torch::manual_seed(1);
  const auto f64 = torch::TensorOptions().dtype(at::kDouble);
  for (const bool with_bias : {true, false}) {
    for (const bool frozen_base : {false, true}) {
      for (const double dropout : {0.0, 0.3}) {
        const at::Tensor seed = torch::tensor({int64_t{5}});
        std::vector<at::Tensor> ours = {torch::randn({2, 4, 12}, f64), torch::randn({7, 12}, f64),
                                        torch::randn({7}, f64), torch::randn({3, 12}, f64),
                                        torch::randn({7, 3}, f64)};
        std::vector<at::Tensor> refs;
        for (size_t i = 0; i < ours.size(); ++i) {
          const bool trains = !(frozen_base && i < 2) && (with_bias || i != 2);
          refs.push_back(ours[i].clone().requires_grad_(trains));
          ours[i].requires_grad_(trains);
        }
        const at::Tensor grad_y = torch::randn({2, 4, 7}, f64);
        const std::optional<at::Tensor> bias = with_bias ? std::optional<at::Tensor>(ours[2]) : std::nullopt;
        lora_forward(ours[0], ours[1], bias, ours[3], ours[4], 0.7, dropout, seed).backward(grad_y);
        at::Tensor xd = refs[0];
        if (dropout > 0) {
          xd = refs[0] * dropout_mask(refs[0].detach(), dropout, seed) / (1 - dropout);
        }
        const at::Tensor want = at::linear(refs[0], refs[1], with_bias ? refs[2] : at::Tensor()) +
                                0.7 * at::linear(at::linear(xd, refs[3]), refs[4]);
        want.backward(grad_y);
        for (size_t i = 0; i < ours.size(); ++i) {
          if (!refs[i].requires_grad()) {
            continue;
          }
          ASSERT_TRUE(ours[i].grad().defined()) << "input " << i;
          EXPECT_TRUE(at::allclose(ours[i].grad(), refs[i].grad(), 1e-9, 1e-9))
              << "input " << i << ", bias " << with_bias << ", frozen base " << frozen_base << ", dropout " << dropout;
        }
      }
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

// Every build of the vectorized kernels that this CPU can run, called directly (the ops use only the one that
// at::get_cpu_capability() picks).
std::vector<const d9d::cpu::VecKernels*> runnable_builds() {
  std::vector<const d9d::cpu::VecKernels*> builds{&d9d::cpu::DEFAULT::kVecKernels};
#ifdef D9D_X86_CAPABILITIES
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    builds.push_back(&d9d::cpu::AVX2::kVecKernels);
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    builds.push_back(&d9d::cpu::AVX512::kVecKernels);
  }
#endif
  return builds;
}

TEST(VecKernels, EveryBuildMatchesAten) {
  torch::manual_seed(3);
  // Odd sizes: tails of rows, columns and vectors; p's rows are strided (a block of a wider x).
  const int64_t n = 11, depth = 37, rp = 2 * d9d::cpu::kPanel;
  const at::Tensor p = torch::randn({n, depth + 5}).narrow(1, 0, depth);
  const at::Tensor q = torch::randn({depth, rp});
  const at::Tensor acc0 = torch::randn({depth, rp});
  const int64_t rows = 9, in = 37, r = 5;
  const at::Tensor weight = torch::randn({rows, in});
  const at::Tensor sB = torch::randn({rows, r});
  const at::Tensor A = torch::randn({r, in});
  // Memory for the kernels to prefetch while they compute: more lines than the kernels have steps (some left
  // unfetched), fewer lines (spread out), a part of a line, and none. Their results must not change.
  const at::Tensor next_block = torch::randn({64, 1000});
  const char* next_begin = static_cast<const char*>(next_block.const_data_ptr());
  const std::vector<d9d::cpu::Prefetch> prefetches{{next_begin, next_begin + next_block.nbytes()},
                                                   {next_begin, next_begin + 1000},
                                                   {next_begin, next_begin + 40},
                                                   {}};
  for (const d9d::cpu::VecKernels* build : runnable_builds()) {
    SCOPED_TRACE(build->capability);
    // out's rows strided too (a block of [xa, 1] in the forward).
    std::vector<at::Tensor> outs;
    for (const d9d::cpu::Prefetch& ahead : prefetches) {
      at::Tensor out = torch::empty({n, rp + 3}).narrow(1, 0, rp);
      build->panel_mm(p.data_ptr<float>(), p.stride(0), n, depth, q.data_ptr<float>(), rp, out.data_ptr<float>(),
                      out.stride(0), ahead);
      EXPECT_TRUE(at::allclose(out, at::mm(p, q), 1e-4, 1e-4));
      outs.push_back(out);
      EXPECT_TRUE(at::equal(out, outs.front()));
    }

    // Rows in tiles of 32 and leftovers (11; 64; 75 = 2 x 32 + 11), and none.
    for (const int64_t rows_p : {int64_t{11}, int64_t{64}, int64_t{75}, int64_t{0}}) {
      SCOPED_TRACE(rows_p);
      const at::Tensor pa = torch::randn({rows_p, depth + 5}).narrow(1, 0, depth);
      const at::Tensor qa = torch::randn({rows_p, rp});
      std::vector<at::Tensor> sums;
      for (const d9d::cpu::Prefetch& ahead : prefetches) {
        at::Tensor acc = acc0.clone();
        build->panel_accumulate(pa.data_ptr<float>(), pa.stride(0), rows_p, depth, qa.data_ptr<float>(), rp,
                                acc.data_ptr<float>(), ahead);
        EXPECT_TRUE(at::allclose(acc, acc0 + at::mm(pa.t(), qa), 1e-4, 1e-4));
        sums.push_back(acc);
        EXPECT_TRUE(at::equal(acc, sums.front()));
      }
    }

    // The fused pass, where the build has one: rows in full tiles and leftovers (11 = 8 + 2 + 1, 7 = 4 + 2 + 1), and
    // columns in one chunk and in several (300 > 256).
    if (std::string(build->capability) == "AVX512") {
      EXPECT_NE(build->panel_mm_accumulate, nullptr);
    }
    if (build->panel_mm_accumulate != nullptr) {
      for (const int64_t rows_p : {int64_t{11}, int64_t{7}}) {
        for (const int64_t depth_p : {int64_t{37}, int64_t{300}}) {
          SCOPED_TRACE(std::to_string(rows_p) + " x " + std::to_string(depth_p));
          const at::Tensor pp = torch::randn({rows_p, depth_p + 5}).narrow(1, 0, depth_p);
          const at::Tensor qp = torch::randn({depth_p, rp});
          const at::Tensor h = torch::randn({rows_p, rp});
          const at::Tensor sums0 = torch::randn({depth_p, rp});
          at::Tensor product = torch::empty({rows_p, rp + 3}).narrow(1, 0, rp);
          at::Tensor sums = sums0.clone();
          build->panel_mm_accumulate(pp.data_ptr<float>(), pp.stride(0), rows_p, depth_p, qp.data_ptr<float>(), rp,
                                     product.data_ptr<float>(), product.stride(0), h.data_ptr<float>(),
                                     sums.data_ptr<float>(), prefetches.front());
          EXPECT_TRUE(at::allclose(product, at::mm(pp, qp), 1e-4, 1e-4));
          EXPECT_TRUE(at::allclose(sums, sums0 + at::mm(pp.t(), h), 1e-4, 1e-4));
        }
      }
    }

    at::Tensor folded = torch::empty({rows, in});
    build->fold_rows(weight.data_ptr<float>(), sB.data_ptr<float>(), A.data_ptr<float>(), r, in, 0, rows,
                     folded.data_ptr<float>());
    EXPECT_TRUE(at::allclose(folded, weight + at::mm(sB, A), 1e-4, 1e-4));

    // Whole vectors of groups and a tail; a row past 2^32; groups whose counter crosses 2^32, and groups past it; a
    // seed with both halves set.
    const uint64_t seed = (uint64_t{7} << 33) + 12345;
    for (const int64_t group0 : {int64_t{3}, (int64_t{1} << 32) - 20, (int64_t{1} << 32) + 3}) {
      const int64_t count = 37, row = (int64_t{1} << 33) + 6;
      std::vector<uint32_t> words(4 * count);
      build->philox_batch(seed, row, group0, count, words.data());
      for (int64_t j = 0; j < count; ++j) {
        const d9d::MaskBits bits = d9d::mask_bits(seed, row, group0 + j);
        for (int w = 0; w < 4; ++w) {
          EXPECT_EQ(words[4 * j + w], bits.words[w]) << group0 << ", " << j << ", " << w;
        }
      }
    }

    const std::vector<uint16_t> draws{0, 100, 30000, 65535, 29999, 1};
    const std::vector<float> x{1, 2, 3, 4, 5, 6};
    std::vector<float> dropped(6), grad{1, 1, 1, 1, 1, 1};
    build->dropout_backward_span(x.data(), dropped.data(), grad.data(), draws.data(), 6, 30000, 2.0f);
    EXPECT_EQ(dropped, (std::vector<float>{0, 0, 6, 8, 0, 0}));
    EXPECT_EQ(grad, (std::vector<float>{0, 0, 2, 2, 0, 0}));
    build->dropout_span(x.data(), dropped.data(), draws.data(), 6, 100, 0.5f);
    EXPECT_EQ(dropped, (std::vector<float>{0, 1, 1.5, 2, 2.5, 0}));

    // Keep bits: bit c % 8 of byte c / 8 says whether draw c >= threshold; 72 columns leave a tail after 32-bit
    // words. Thresholds 0 and 65536 keep all and none.
    std::vector<uint16_t> bit_draws(72);
    for (int64_t c = 0; c < 72; ++c) {
      bit_draws[c] = static_cast<uint16_t>((c * 40503 + 7) % 65536);
    }
    bit_draws[5] = 65535;
    bit_draws[6] = 0;
    for (const uint32_t threshold : {0u, 1u, 3277u, 30000u, 65535u, 65536u}) {
      SCOPED_TRACE(threshold);
      std::vector<uint8_t> bits(9, 0xA5);
      build->keep_bits(bit_draws.data(), 72, threshold, bits.data());
      for (int64_t c = 0; c < 72; ++c) {
        EXPECT_EQ((bits[c / 8] >> (c % 8)) & 1, bit_draws[c] >= threshold ? 1 : 0) << c;
      }
    }

    // bfloat16: x * keep in float32, rounded as c10::BFloat16 rounds. Random values (times 1.5 their products have
    // up to 10 significant bits, so many round on a tie), and bit patterns that rounding treats apart, each once kept
    // and once dropped: NaNs of either sign and other payloads, infinities, the largest finite value (times
    // 1.00390625 a finite float32 that rounds up to infinity), a subnormal and -0. The length leaves a tail after
    // whole vectors.
    const std::vector<uint16_t> special_bits{0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7F80, 0xFF80, 0x7F7F, 0xFF7F, 0x0001,
                                             0x8000};
    const int64_t specials = static_cast<int64_t>(special_bits.size());
    const int64_t count = 203;
    const at::Tensor values = torch::randn({count}).mul_(100);
    std::vector<c10::BFloat16> x16(count), out16(count);
    std::vector<uint16_t> draws16(count);
    for (int64_t c = 0; c < count; ++c) {
      x16[c] = c < 2 * specials ? c10::BFloat16(special_bits[c % specials], c10::BFloat16::from_bits())
                                : c10::BFloat16(values.data_ptr<float>()[c]);
      draws16[c] = c < specials ? 65535 : c < 2 * specials ? 0 : static_cast<uint16_t>((c * 7919) % 65536);
    }
    for (const float factor : {1.0f / 0.95f, 1.5f, 2.0f, 1.00390625f}) {
      SCOPED_TRACE(factor);
      std::vector<c10::BFloat16> grad16 = x16;
      build->dropout_backward_span_bf16(x16.data(), out16.data(), grad16.data(), draws16.data(), count, 30000, factor);
      for (int64_t c = 0; c < count; ++c) {
        const c10::BFloat16 expected(static_cast<float>(x16[c]) * (draws16[c] >= 30000 ? factor : 0.0f));
        EXPECT_EQ(out16[c].x, expected.x) << c << ": " << static_cast<float>(x16[c]);
        EXPECT_EQ(grad16[c].x, expected.x) << c;
      }
      build->dropout_span_bf16(x16.data(), out16.data(), draws16.data(), count, 100, factor);
      for (int64_t c = 0; c < count; ++c) {
        const c10::BFloat16 expected(static_cast<float>(x16[c]) * (draws16[c] >= 100 ? factor : 0.0f));
        EXPECT_EQ(out16[c].x, expected.x) << c << ": " << static_cast<float>(x16[c]);
      }
    }
  }
}

// panel_expand (the float32 LoRA terms of y and dx): out = scale p q + bias, q as panels of kPanel columns; p's and
// out's rows strided, widths with a short last panel and none, depths odd and of a panel, rows leaving short tiles.
TEST(VecKernels, EveryBuildExpandsAsAten) {
  torch::manual_seed(4);
  constexpr int64_t kPanel = d9d::cpu::kPanel;
  for (const d9d::cpu::VecKernels* build : runnable_builds()) {
    SCOPED_TRACE(build->capability);
    for (const auto& [n, depth, width] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {11, 5, 37}, {64, 16, 1024}, {3, 16, 16}, {19, 32, 40}}) {
      SCOPED_TRACE(std::to_string(n) + " x " + std::to_string(depth) + " -> " + std::to_string(width));
      const at::Tensor p = torch::randn({n, depth + 3}).narrow(1, 0, depth);
      const at::Tensor q = torch::randn({depth, width});
      const int64_t panels = (width + kPanel - 1) / kPanel;
      const at::Tensor packed = at::constant_pad_nd(q, {0, panels * kPanel - width})
                                    .reshape({depth, panels, kPanel})
                                    .permute({1, 0, 2})
                                    .contiguous();
      for (const bool with_bias : {false, true}) {
        const at::Tensor bias = torch::randn({width});
        const float scale = with_bias ? 0.75f : 1.0f;
        at::Tensor out = torch::full({n, width + 5}, std::nan("")).narrow(1, 0, width);
        build->panel_expand(p.data_ptr<float>(), p.stride(0), n, depth, packed.data_ptr<float>(), width, scale,
                            with_bias ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(), out.stride(0));
        const at::Tensor expected = at::mm(p, q) * scale + (with_bias ? bias : torch::zeros({width}));
        EXPECT_TRUE(at::allclose(out, expected, 1e-5, 1e-5)) << (out - expected).abs().max();
        EXPECT_TRUE(out.as_strided({n, 5}, {out.stride(0), 1}, width).isnan().all().item<bool>());  // nothing past
      }
    }
  }
}

// The bfloat16 base GEMM of AVX512_BF16 CPUs (bf16_base_gemm.cpp): out += a op(W) rounded once, at shapes with a short
// last tile of rows, for both layouts of W.
TEST(Bf16BaseGemm, AddsTheProductRoundedOnce) {
  if (!d9d::bf16_base_gemm_runs()) {
    GTEST_SKIP() << "the driver does not run here (no AVX512_BF16 under ATen's AVX512 capability, or no brgemm)";
  }
  torch::manual_seed(0);
  for (const bool transposed : {true, false}) {
    for (const auto& [m, k, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1100, 1024, 96}, {1024, 48, 64}}) {
      SCOPED_TRACE(std::to_string(m) + " x " + std::to_string(k) + " x " + std::to_string(n) +
                   (transposed ? ", W^T" : ", W"));
      const at::Tensor a = torch::randn({m, k}).to(at::kBFloat16);
      const at::Tensor w = (transposed ? torch::randn({n, k}) : torch::randn({k, n})).to(at::kBFloat16);
      const at::Tensor start = torch::randn({m, n}).mul_(4).to(at::kBFloat16);
      const at::Tensor out = start.clone();
      ASSERT_TRUE(d9d::bf16_accumulate_base(a, w, transposed, out));
      const at::Tensor op_w = (transposed ? w.t() : w).to(at::kDouble);
      const at::Tensor exact = start.to(at::kDouble) + at::mm(a.to(at::kDouble), op_w);
      // Within half a bfloat16 ulp of the exact sum (one rounding), plus float32's accumulation error over k terms.
      const at::Tensor half_ulp = at::exp2(at::floor(at::log2(exact.abs())) - 8);
      const at::Tensor accumulation = at::mm(a.to(at::kDouble).abs(), op_w.abs()) * (k * std::ldexp(1.0, -24));
      const at::Tensor excess = (out.to(at::kDouble) - exact).abs() - half_ulp - accumulation;
      EXPECT_LE(excess.max().item<double>(), 0.0);
      EXPECT_GT((out != start).sum().item<int64_t>(), m * n / 2);  // the product did land
    }
  }
}

// keep (bool, m x n) as the driver's keep bits: bit c % 8 of byte c / 8 of a row says whether column c is kept.
at::Tensor keep_bits_of(const at::Tensor& keep) {
  const int64_t m = keep.size(0);
  const int64_t n = keep.size(1);
  return at::bitwise_left_shift(keep.to(at::kInt).view({m, n / 8, 8}), at::arange(8, at::kInt)).sum(-1).to(at::kByte);
}

// The same driver with the LoRA term as extra depth (bf16_base_with_term): out = a op(W) + t op(T) (+ bias), out's
// contents ignored, rounded once; t's rows strided, T in W's layout, depths of one pair, one panel and three.
TEST(Bf16BaseGemm, TakesTheTermAsExtraDepthRoundedOnce) {
  if (!d9d::bf16_base_gemm_runs()) {
    GTEST_SKIP() << "the driver does not run here (no AVX512_BF16 under ATen's AVX512 capability, or no brgemm)";
  }
  torch::manual_seed(1);
  for (const bool transposed : {true, false}) {
    for (const auto& [m, k, n, depth] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
             {1100, 1024, 96, 16}, {1024, 48, 64, 2}, {1030, 64, 32, 48}}) {
      const bool with_bias = depth != 2;
      SCOPED_TRACE(std::to_string(m) + " x " + std::to_string(k) + " x " + std::to_string(n) + ", depth " +
                   std::to_string(depth) + (transposed ? ", W^T" : ", W"));
      const at::Tensor a = torch::randn({m, k}).to(at::kBFloat16);
      const at::Tensor w = (transposed ? torch::randn({n, k}) : torch::randn({k, n})).to(at::kBFloat16);
      const at::Tensor t = torch::randn({m, depth + 6}).mul_(3).to(at::kBFloat16).narrow(1, 0, depth);
      const at::Tensor tw = (transposed ? torch::randn({n, depth}) : torch::randn({depth, n})).to(at::kBFloat16);
      const at::Tensor bias = with_bias ? torch::randn({n}).mul_(8) : at::Tensor();
      ASSERT_TRUE(d9d::bf16_base_takes_term(a, w, transposed, depth));
      // Also under a keep mask (dx's LoRA part with dropout): the term summed apart, added as keep * scale * term.
      const at::Tensor keep = torch::rand({m, n}) > 0.3;
      const at::Tensor keep_bits = keep_bits_of(keep);
      for (const bool masked : {false, true}) {
        SCOPED_TRACE(masked ? "masked" : "unmasked");
        const double keep_scale = masked ? 1 / 0.7 : 1.0;
        const at::Tensor out = torch::full({m, n}, std::nan("")).to(at::kBFloat16);
        d9d::bf16_base_with_term(a, w, transposed, t, tw, bias, masked ? keep_bits : at::Tensor(), keep_scale, out);
        const at::Tensor op_w = (transposed ? w.t() : w).to(at::kDouble);
        const at::Tensor op_t = (transposed ? tw.t() : tw).to(at::kDouble);
        const at::Tensor term_factor = masked ? keep.to(at::kDouble) * keep_scale : torch::ones({m, n}, at::kDouble);
        at::Tensor exact = at::mm(a.to(at::kDouble), op_w) + at::mm(t.to(at::kDouble), op_t) * term_factor;
        at::Tensor magnitude =
            at::mm(a.to(at::kDouble).abs(), op_w.abs()) + at::mm(t.to(at::kDouble).abs(), op_t.abs()) * term_factor;
        if (with_bias) {
          exact = exact + bias.to(at::kDouble);
          magnitude = magnitude + bias.to(at::kDouble).abs();
        }
        // Within half a bfloat16 ulp of the exact sum (one rounding), plus float32's accumulation error over its
        // terms.
        const at::Tensor half_ulp = at::exp2(at::floor(at::log2(exact.abs())) - 8);
        const at::Tensor accumulation = magnitude * ((k + depth + 2) * std::ldexp(1.0, -24));
        const at::Tensor excess = (out.to(at::kDouble) - exact).abs() - half_ulp - accumulation;
        EXPECT_LE(excess.max().item<double>(), 0.0);
      }
    }
  }
}

TEST(Bf16BaseGemm, TakesNoTermItCannotPairAndChecksItsOperands) {
  if (!d9d::bf16_base_gemm_runs()) {
    GTEST_SKIP() << "the driver does not run here (no AVX512_BF16 under ATen's AVX512 capability, or no brgemm)";
  }
  const at::Tensor a = torch::randn({1024, 64}).to(at::kBFloat16);
  const at::Tensor w = torch::randn({96, 64}).to(at::kBFloat16);
  EXPECT_TRUE(d9d::bf16_base_takes_term(a, w, /*transposed=*/true, 16));
  EXPECT_FALSE(d9d::bf16_base_takes_term(a, w, true, 0));
  EXPECT_FALSE(d9d::bf16_base_takes_term(a, w, true, 7));  // brgemm pairs the depth
  EXPECT_FALSE(d9d::bf16_base_takes_term(a.narrow(0, 0, 1000), w, true, 16));  // too few rows
  EXPECT_FALSE(d9d::bf16_base_takes_term(a.to(at::kFloat), w.to(at::kFloat), true, 16));
  const at::Tensor out = torch::zeros({1024, 96}).to(at::kBFloat16);
  const at::Tensor t = torch::randn({1024, 16}).to(at::kBFloat16);
  const at::Tensor tw = torch::randn({96, 16}).to(at::kBFloat16);
  const at::Tensor none;
  const at::Tensor keep = torch::zeros({1024, 12}, at::kByte);
  EXPECT_THROW(d9d::bf16_base_with_term(a, w, true, t.narrow(0, 0, 1000), tw, none, none, 1, out), c10::Error);
  EXPECT_THROW(d9d::bf16_base_with_term(a, w, true, t, tw.t().contiguous(), none, none, 1, out), c10::Error);
  EXPECT_THROW(d9d::bf16_base_with_term(a, w, true, t, tw, torch::zeros({95}), none, 1, out), c10::Error);
  EXPECT_THROW(d9d::bf16_base_with_term(a, w, true, t, tw, none, none, 1, out.narrow(1, 0, 64)), c10::Error);
  EXPECT_THROW(d9d::bf16_base_with_term(a, w, true, t, tw, none, keep.narrow(1, 0, 11), 1, out), c10::Error);
  EXPECT_THROW(d9d::bf16_base_with_term(a, w, true, t, tw, none, keep.to(at::kInt), 1, out), c10::Error);
  EXPECT_THROW(d9d::bf16_base_with_term(a, w, true, t, tw, none, keep, std::nan(""), out), c10::Error);
  EXPECT_TRUE(at::equal(out, torch::zeros({1024, 96}).to(at::kBFloat16)));  // nothing written by the refusals
}

TEST(Bf16BaseGemm, LeavesWhatItDoesNotTakeToAtenUntouched) {
  if (!d9d::bf16_base_gemm_runs()) {
    GTEST_SKIP() << "the driver does not run here (no AVX512_BF16 under ATen's AVX512 capability, or no brgemm)";
  }
  const auto refuses = [](int64_t m, int64_t k, int64_t n, at::ScalarType dtype) {
    const at::Tensor a = torch::randn({m, k}).to(dtype);
    const at::Tensor w = torch::randn({n, k}).to(dtype);
    const at::Tensor start = torch::randn({m, n}).to(dtype);
    const at::Tensor out = start.clone();
    const bool taken = d9d::bf16_accumulate_base(a, w, /*transposed=*/true, out);
    return !taken && at::equal(out, start);
  };
  EXPECT_TRUE(d9d::bf16_accumulate_base(torch::randn({1024, 64}).to(at::kBFloat16),
                                        torch::randn({64, 64}).to(at::kBFloat16), true,
                                        torch::zeros({1024, 64}).to(at::kBFloat16)));
  EXPECT_TRUE(refuses(512, 64, 64, at::kBFloat16));   // too few rows
  EXPECT_TRUE(refuses(1024, 40, 64, at::kBFloat16));  // k not a multiple of 16
  EXPECT_TRUE(refuses(1024, 64, 48, at::kBFloat16));  // n not a multiple of 32
  EXPECT_TRUE(refuses(1024, 64, 64, at::kFloat));
  EXPECT_TRUE(refuses(1024, 0, 64, at::kBFloat16));
  const bool onednn = at::globalContext().userEnabledMkldnn();
  at::globalContext().setUserEnabledMkldnn(false);  // ATen's brgemm runs on oneDNN
  const bool refused_without_onednn = refuses(1024, 64, 64, at::kBFloat16);
  const bool term_without_onednn = d9d::bf16_base_takes_term(torch::randn({1024, 64}).to(at::kBFloat16),
                                                             torch::randn({64, 64}).to(at::kBFloat16), true, 16);
  at::globalContext().setUserEnabledMkldnn(onednn);
  EXPECT_TRUE(refused_without_onednn);
  EXPECT_FALSE(term_without_onednn);
}

}  // namespace
