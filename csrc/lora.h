// Device-independent LoRA ops. The GEMMs go through ATen (MKL / cuBLAS); the dropout mask passes and the way blocks
// of rows are spread over workers are device-specific and come in through `DeviceKernels`.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace d9d {

// Dropout as the kernels see it: keep an element iff its 16-bit draw >= threshold, then multiply by scale.
struct DropoutSpec {
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double scale = 1.0;  // 1 / (1 - p)
};

// Work on rows [row0, row0 + n) of x, done by `worker` (< DeviceKernels::max_workers()).
using BlockBody = c10::function_ref<void(int64_t row0, int64_t n, int64_t worker)>;

// Bytes [data, data + bytes) of memory; empty by default.
struct MemorySpan {
  const void* data = nullptr;
  int64_t bytes = 0;
};

// Faster GEMMs for the skinny products (xa = x A^T in both passes, the backward's other three), for the fold
// W + s B A, and for the base GEMM onto the LoRA term or with it as extra depth. In the products one operand is a
// panel of rp columns (r rounded up to a multiple of panel_width, with zero columns), and p is a block of rows of x or
// dy (row stride free, columns contiguous); q and acc are contiguous. The sums of accumulate are in float32 for the 16-bit dtypes.
struct SkinnyKernels {
  int64_t panel_width;
  // Rows per block of the backward when these kernels run it, and of expand_in_blocks's LoRA term: about this many
  // elements of the widest operand.
  int64_t block_elements;
  // Blocks of rows that these kernels take are multiples of this many rows where they hold that many (but for the
  // input's last block), so that their register tiles have no leftover rows.
  int64_t block_row_multiple;
  // Without dropout, the products run on these kernels only where x has at least this many of their blocks per
  // worker (else one library GEMM per product, over all threads), and in the forward only if
  // forward_without_dropout.
  int64_t min_blocks_per_worker;
  bool forward_without_dropout;
  // Whether accumulate's sums are rp x depth (acc += q^T p) rather than depth x rp (acc += p^T q).
  bool transposed_sums;
  // Each product also takes `ahead`: memory that a later product of the same worker reads (the other operand's block,
  // or the worker's next block of x or dy), which the kernels may pull into cache while they compute, so that its
  // fetch overlaps this product's arithmetic instead of stalling that one.
  // out (n x rp) = p (n x depth) q (depth x rp); out's rows may be strided.
  void (*mm)(const at::Tensor& p, const at::Tensor& q, const at::Tensor& out, MemorySpan ahead);
  // acc (depth x rp) += p^T q, for p (n x depth) and q (n x rp); or acc (rp x depth) += q^T p (transposed_sums).
  void (*accumulate)(const at::Tensor& p, const at::Tensor& q, const at::Tensor& acc, MemorySpan ahead);
  // out = p q and accumulate(p, h, acc), for h (n x rp): mm and accumulate on the same p, in one pass over it where
  // the kernels can (p is then read once for both).
  void (*mm_accumulate)(const at::Tensor& p, const at::Tensor& q, const at::Tensor& out, const at::Tensor& h,
                        const at::Tensor& acc, MemorySpan ahead);
  // out (n x width) = scale p q^T + bias, the LoRA term's shape (y from xa and s B, dx's part from g and A), for p
  // (n x depth) with depth even and at most expand_max_depth, and q (width x r, r <= depth) packed once by
  // pack_expand(q, depth); bias float32 (width) or undefined. expand_max_depth 0: ATen's GEMMs instead.
  int64_t expand_max_depth;
  at::Tensor (*pack_expand)(const at::Tensor& q, int64_t depth);
  void (*expand)(const at::Tensor& p, const at::Tensor& packed, double scale, const at::Tensor& bias,
                 const at::Tensor& out);
  // out = weight + scale B A, for out of weight's shape (the fold; no panels involved); nullptr: ATen's addmm.
  void (*fold)(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
               const at::Tensor& out);
  // out (n x width) += p op(weight), the base GEMM onto the LoRA term that out holds (rounded once), with op(weight)
  // = weight^T if `transposed`, else weight. Returns false, having done nothing, where it does not take these operands
  // (ATen's addmm_ runs instead); nullptr: ATen's addmm_ always.
  bool (*accumulate_base)(const at::Tensor& p, const at::Tensor& weight, bool transposed, const at::Tensor& out);
  // out (n x width) = p op(weight) + t op(term_weight) (+ bias): the base GEMM with the LoRA term (y's from xa and
  // s B, dx's part from g and A) as extra depth of its sums, rounded once, out's contents ignored; t (n x depth),
  // term_weight in weight's layout, bias float32 (width) or undefined. With `keep` defined (dx's part under dropout:
  // n x width / 8 bytes of keep bits, as DeviceKernels::dropout_rows_keep writes them), the term is masked: keep *
  // keep_scale * t op(term_weight). Only where base_takes_term(p, weight, transposed, depth) said so, asked before
  // the term is computed; nullptr: never (the term is written into out first).
  bool (*base_takes_term)(const at::Tensor& p, const at::Tensor& weight, bool transposed, int64_t depth);
  void (*base_with_term)(const at::Tensor& p, const at::Tensor& weight, bool transposed, const at::Tensor& t,
                         const at::Tensor& term_weight, const at::Tensor& bias, const at::Tensor& keep,
                         double keep_scale, const at::Tensor& out);
};

// What differs between devices. In the mask passes every tensor is 2-D and row-major contiguous, and `row0` is the
// global row index (over x's flattened leading dims) of the first row passed.
struct DeviceKernels {
  // out = x * keep * scale.
  void (*dropout_rows)(const at::Tensor& x, const at::Tensor& out, int64_t row0, const DropoutSpec& spec);
  // out = x * keep * scale and grad *= keep * scale, in one pass over the mask.
  void (*dropout_rows_backward)(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad, int64_t row0,
                                const DropoutSpec& spec);
  // mask = keep (bool), for the whole input starting at row 0.
  void (*mask_rows)(const at::Tensor& mask, const DropoutSpec& spec);
  // out = x * keep * scale, and keep as bits: bit c % 8 of byte c / 8 of a row of `keep` (x's rows, cols / 8 bytes;
  // cols a multiple of 8), for a base GEMM that masks dx's LoRA part itself (SkinnyKernels::base_with_term).
  // nullptr: none (dx's LoRA part is then masked in place by dropout_rows_backward).
  void (*dropout_rows_keep)(const at::Tensor& x, const at::Tensor& out, const at::Tensor& keep, int64_t row0,
                            const DropoutSpec& spec);
  // Rows are processed in blocks of about this many elements (of the widest operand): small enough for a block of
  // dy and x to stay in cache between the LoRA GEMMs that read it, and for the dropped-out copy of x to exist for
  // one block only. The backward takes SkinnyKernels::block_elements instead when those kernels run it.
  int64_t block_elements;
  // The same for bfloat16 inputs, whose library GEMMs cost more per call (float16 keeps block_elements: its
  // per-block partial sums of dA and dB are rounded to float16, whose range larger blocks would strain).
  int64_t block_elements_bf16;
  // Runs body over the blocks [0, step), [step, 2 step), ... covering `rows`; blocks of different workers may run
  // concurrently, so each worker gets its own buffers and accumulators. Each worker should take consecutive blocks
  // in order (the CPU's does): the loops prefetch a worker's next block as the one after its current block. Worker
  // indices stay below both max_workers() and the number of blocks (ATen's parallel_for numbers its tasks so).
  void (*for_each_block)(int64_t rows, int64_t step, BlockBody body);
  // Upper bound on the worker index + 1.
  int64_t (*max_workers)();
  // The skinny kernels that take tensors like x (device, dtype, CPU features), or nullptr: ATen's GEMMs run instead.
  // Optional (nullptr: ATen's GEMMs everywhere).
  const SkinnyKernels* (*skinny_for)(const at::Tensor& x);
  // Scratch of weight's shape and dtype for the folded weight, used only until the op returns.
  at::Tensor (*fold_scratch)(const at::Tensor& weight);
  // Whether, without dropout, the LoRA products that the skinny kernels do not take run as one GEMM each over all
  // rows rather than one per block: on the CPU one library call runs these N x r shapes several times faster
  // (bfloat16 on AMX: about 4x). It also sends inputs with too few rows for the skinny kernels' blocks there (see
  // products_in_whole_gemms in lora.cpp). CUDA keeps its large blocks, whose partial sums of dA and dB add up in
  // float32 whatever cuBLAS's reduced-precision reductions do.
  bool whole_products;
};

// y = x W^T + bias + scale * dropout(x) A^T B^T. The backward needs only x and the seed. With a row scale f (out,),
// y = f * (x W^T + scale * dropout(x) A^T B^T) + bias over the last dim, with f folded into the weights. A and B have
// x's dtype, or are float32 on 16-bit x: they are then rounded to x's dtype for the products, and lora_backward
// returns their gradients in float32, its float32 sums over blocks not rounded to 16 bits.
at::Tensor lora_forward(const DeviceKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                        double scale, double dropout, const at::Tensor& seed, const at::Tensor& row_scale = {});

// (grad_x, grad_A, grad_B) for a frozen weight and bias; grad_x is an empty tensor when need_grad_x is false. With a
// row scale f, the gradients of lora_forward's scaled form (grad_y times f, without an N x out copy of it when the
// weights are folded or grad_x is not needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward(const DeviceKernels& kernels, const at::Tensor& grad_y,
                                                             const at::Tensor& x, const at::Tensor& weight,
                                                             const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                             double scale, double dropout, const at::Tensor& seed,
                                                             bool need_grad_x, const at::Tensor& row_scale = {});

// DoRA without dropout: y = factor * (x W^T + scale x A^T B^T) + bias, factor (out,) applied over the last dim (the
// fused LoRA op with the factor folded in: y is the only N x out tensor).
at::Tensor dora_forward(const DeviceKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                        const at::Tensor& factor, double scale);

// (grad_x, grad_A, grad_B, grad_factor) of dora_forward, from its output y: DoRA's unscaled output is
// (y - bias) / factor (recomputed from x for the features whose factor is 0). With a bias in a 16-bit dtype, y - bias
// keeps little of it; dora_linear takes this op with a bias in float32 and float64 only.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward(
    const DeviceKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& factor, double scale, bool need_grad_x);

// Whether the ops take tensors of this dtype: float32, bfloat16, float16, and float64 (for gradcheck).
bool is_supported_dtype(at::ScalarType dtype);

// Whether a pair of adapters, both of dtype `adapter`, may meet activations of dtype `x` though the dtypes differ:
// float32 adapters on 16-bit activations (as PEFT keeps them), which the LoRA apply ops take uncast.
bool float32_adapters_on(at::ScalarType adapter, at::ScalarType x);

// Checks that lora_A is r x in and lora_B is out x r, naming `op` and where in came from (`in_from`); returns r.
int64_t check_adapters(const char* op, const at::Tensor& lora_A, const at::Tensor& lora_B, int64_t in, int64_t out,
                       const char* in_from);

// The dropout of `op` checked (0 <= p < 1, a one-element CPU int64 seed) and turned into the kernels' form.
DropoutSpec make_dropout_spec(const char* op, double dropout, const at::Tensor& seed);

// The keep mask (bool, x's shape) that lora_forward and lora_backward use for this seed and dropout.
at::Tensor dropout_mask(const DeviceKernels& kernels, const at::Tensor& x, double dropout, const at::Tensor& seed);

}  // namespace d9d
