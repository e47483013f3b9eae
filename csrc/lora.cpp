#include "lora.h"

#include "dropout_mask.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace d9d {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble;
}

DropoutSpec make_dropout_spec(const char* op, double dropout, const at::Tensor& seed) {
  TORCH_CHECK(std::isfinite(dropout) && dropout >= 0.0 && dropout < 1.0, op, ": dropout must be in [0, 1), got ",
              dropout);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
              ": seed must be a CPU int64 tensor with one element, got ", seed.scalar_type(), " ", seed.sizes(),
              " on ", seed.device());
  DropoutSpec spec;
  spec.seed = static_cast<uint64_t>(seed.contiguous().data_ptr<int64_t>()[0]);
  spec.threshold = static_cast<uint32_t>(std::llround(dropout * kMaskLevels));
  spec.scale = 1.0 / (1.0 - dropout);
  return spec;
}

int64_t check_adapters(const char* op, const at::Tensor& lora_A, const at::Tensor& lora_B, int64_t in, int64_t out,
                       const char* in_from) {
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == in, op, ": lora_A must be r x in (2D with in == ", in_from,
              " == ", in, "), got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out && lora_B.size(1) == r, op,
              ": lora_B must be out x r (2D with out == weight.size(0) == ", out, " and r == lora_A.size(0) == ", r,
              "), got ", lora_B.sizes());
  return r;
}

bool float32_adapters_on(at::ScalarType adapter, at::ScalarType x) {
  return adapter == at::kFloat && (x == at::kBFloat16 || x == at::kHalf);
}

namespace {

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type(), " (cast it to x's dtype first; lora_forward also takes a float32 pair of adapters on ",
              "16-bit x)");
}

// Checks x, weight, A and B of an apply op and returns (in, out, r). With `float32_adapters`, A and B may also be
// float32 on 16-bit x (both alike).
std::tuple<int64_t, int64_t, int64_t> check_apply(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                  bool float32_adapters = false) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in), got ", x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": x must be float32, bfloat16, float16 or float64, got ",
              x.scalar_type());
  const int64_t in = x.size(-1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in, op,
              ": weight must be out x in (2D with in == x.size(-1) == ", in, "), got ", weight.sizes());
  const int64_t out = weight.size(0);
  const int64_t r = check_adapters(op, lora_A, lora_B, in, out, "x.size(-1)");
  check_same(op, "weight", weight, x);
  if (float32_adapters && float32_adapters_on(lora_A.scalar_type(), x.scalar_type())) {
    TORCH_CHECK(lora_B.scalar_type() == lora_A.scalar_type(), op, ": lora_B must have lora_A's dtype ",
                lora_A.scalar_type(), ", got ", lora_B.scalar_type());
    TORCH_CHECK(lora_A.device() == x.device() && lora_B.device() == x.device(), op,
                ": lora_A and lora_B must be on x's device ", x.device(), ", got ", lora_A.device(), " and ",
                lora_B.device());
  } else {
    check_same(op, "lora_A", lora_A, x);
    check_same(op, "lora_B", lora_B, x);
  }
  return {in, out, r};
}

// Rows per block: about `elements` elements of the widest row-major operand, rounded down to a multiple of
// `multiple` where there are that many.
int64_t block_rows(int64_t elements, int64_t rows, int64_t width, int64_t multiple = 1) {
  const int64_t step = std::max<int64_t>(1, std::min<int64_t>(rows, elements / std::max<int64_t>(width, 1)));
  return step >= multiple ? step / multiple * multiple : step;
}

// Rows per block of a loop whose products run on `skinny` where it is not nullptr.
int64_t skinny_block_rows(const SkinnyKernels* skinny, int64_t elements, int64_t rows, int64_t width) {
  return block_rows(elements, rows, width, skinny != nullptr ? skinny->block_row_multiple : 1);
}

// Elements per block for the library GEMMs of a block (ATen's, where the skinny kernels do not take x), by x's
// dtype.
int64_t library_block_elements(const DeviceKernels& kernels, at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? kernels.block_elements_bf16 : kernels.block_elements;
}

// float32 accumulator for reduced-precision gradients summed over blocks.
at::ScalarType accumulate_dtype(at::ScalarType dtype) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) ? at::kFloat : dtype;
}

// Whether to fold the adapters into a temporary W + s B A rather than run the LoRA GEMMs over x and y (dropout 0
// only). Per forward + backward the fold moves about 4 in out elements (read W, write the temporary, twice); the
// LoRA GEMMs move about rows (3 in + 2 out) (read x, read-modify-write y and dx). Both do about r flops per element
// moved, so they break even near rows = 4 in out / (3 in + 2 out), 0.8 in for a square W; folding starts a little
// later, at rows = 2 in out / (in + out), in for a square W.
//
// Only in float32 and float64: W is already on the grid of its dtype, so rounding W + s B A to 16 bits would drop
// every element of s B A below half an ulp of W, systematically (while rounding y = x W^T + LoRA term adds
// unbiased noise). Small adapters, such as B early in training, would then barely act. In float32 the cut-off is
// 2^-24 of W, far below any update that float32 weights themselves could take.
bool folding_pays_off(at::ScalarType dtype, int64_t rows, int64_t in, int64_t out) {
  return (dtype == at::kFloat || dtype == at::kDouble) && rows * (in + out) >= 2 * in * out;
}

// Whether the LoRA products run as one GEMM each over all rows rather than block by block (without dropout only,
// which needs the blocks to regenerate the mask): where the device prefers whole GEMMs and either its skinny kernels
// do not take x (or not in this pass), or x has fewer than the kernels' min_blocks_per_worker (backward) blocks per
// worker. With so few blocks the fixed costs per call and per block outweigh the blocks' work, and a library call
// per product, spread over all threads, runs faster.
bool products_in_whole_gemms(const DeviceKernels& kernels, const SkinnyKernels* skinny, double dropout,
                             int64_t rows, int64_t in, int64_t out, bool forward) {
  if (dropout != 0.0 || !kernels.whole_products) {
    return false;
  }
  if (skinny == nullptr || (forward && !skinny->forward_without_dropout)) {
    return true;
  }
  const int64_t step = skinny_block_rows(skinny, skinny->block_elements, rows, std::max(in, out));
  return (rows + step - 1) / step < skinny->min_blocks_per_worker * kernels.max_workers();
}

// Workers of a for_each_block loop over `rows` in blocks of `step`: no more than there are blocks (see
// DeviceKernels::for_each_block), so that small inputs set up one worker's buffers and sums, not one per thread.
int64_t loop_workers(const DeviceKernels& kernels, int64_t rows, int64_t step) {
  return std::max<int64_t>(1, std::min(kernels.max_workers(), (rows + step - 1) / step));
}

// The device's skinny kernels if they take tensors like x, else nullptr (ATen's GEMMs run instead).
const SkinnyKernels* skinny_kernels_for(const DeviceKernels& kernels, const at::Tensor& x) {
  return kernels.skinny_for != nullptr ? kernels.skinny_for(x) : nullptr;
}

// W + s B A in W's dtype, in the device's scratch: on the device's own kernel when it has one for this dtype, else
// through the GEMM library.
at::Tensor fold_adapters(const DeviceKernels& kernels, const at::Tensor& weight, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, double scale) {
  at::Tensor folded = kernels.fold_scratch(weight);
  const SkinnyKernels* skinny = skinny_kernels_for(kernels, weight);
  if (skinny != nullptr && skinny->fold != nullptr) {
    skinny->fold(weight, lora_A, lora_B, scale, folded);
    return folded;
  }
  return at::addmm_out(folded, weight, lora_B, lora_A, /*beta=*/1, /*alpha=*/scale);
}

// Whether the skinny kernels write a LoRA term (p q^T, p with `depth` columns) themselves; else ATen's GEMMs do.
bool expands(const SkinnyKernels* skinny, int64_t depth) {
  return skinny != nullptr && skinny->expand != nullptr && depth > 0 && depth % 2 == 0 &&
         depth <= skinny->expand_max_depth;
}

// out = scale p q^T + bias on the skinny kernels' expand (see expands), block by block over the workers.
void expand_in_blocks(const DeviceKernels& kernels, const SkinnyKernels* skinny, const at::Tensor& p,
                      const at::Tensor& q, double scale, const at::Tensor& bias, const at::Tensor& out) {
  const at::Tensor packed = skinny->pack_expand(q, p.size(1));
  const at::Tensor bias32 = bias.defined() ? bias.to(at::kFloat).contiguous() : bias;
  const int64_t rows = p.size(0);
  const int64_t step = skinny_block_rows(skinny, skinny->block_elements, rows, out.size(1));
  kernels.for_each_block(rows, step, [&](int64_t row0, int64_t n, int64_t /*worker*/) {
    skinny->expand(p.narrow(0, row0, n), packed, scale, bias32, out.narrow(0, row0, n));
  });
}

// out += p op(weight), op(weight) = weight^T if `transposed`: the base GEMM accumulating onto the LoRA term (beta =
// 1: the sum rounded once, no temporary of out's size), on the skinny kernels' own where they take it.
void accumulate_base(const SkinnyKernels* skinny, at::Tensor& out, const at::Tensor& p, const at::Tensor& weight,
                     bool transposed) {
  if (skinny != nullptr && skinny->accumulate_base != nullptr &&
      skinny->accumulate_base(p, weight, transposed, out)) {
    return;
  }
  out.addmm_(p, transposed ? weight.t() : weight);
}

// Whether the skinny kernels' base GEMM takes a LoRA term of `depth` columns as extra depth of its sums here (see
// SkinnyKernels::base_with_term): then the term is computed for it and never written into y or dx.
bool term_rides_base(const SkinnyKernels* skinny, const at::Tensor& p, const at::Tensor& weight, bool transposed,
                     int64_t depth) {
  return skinny != nullptr && skinny->base_takes_term != nullptr &&
         skinny->base_takes_term(p, weight, transposed, depth);
}

// Rows [row0, row0 + n) of a contiguous 2-D tensor, as memory for the skinny kernels to prefetch.
MemorySpan row_span(const at::Tensor& t2d, int64_t row0, int64_t n) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(t2d.dim() == 2 && t2d.is_contiguous());
  const int64_t row_bytes = t2d.size(1) * t2d.element_size();
  return {static_cast<const char*>(t2d.const_data_ptr()) + row0 * row_bytes, n * row_bytes};
}

// The block of `step` rows after rows [row0, row0 + n) (shorter at the end, empty past it): the worker's next block
// where for_each_block hands each worker consecutive blocks (the CPU's does; after a worker's last block, another
// worker's first one, fetched for nothing).
MemorySpan next_rows(const at::Tensor& t2d, int64_t row0, int64_t n, int64_t step) {
  return row_span(t2d, row0 + n, std::min(step, t2d.size(0) - row0 - n));
}

// Columns of the panels that hold r columns: r rounded up to the skinny kernels' panel width (r for ATen's GEMMs).
int64_t panel_columns(const SkinnyKernels* skinny, int64_t r) {
  return skinny == nullptr ? r : (r + skinny->panel_width - 1) / skinny->panel_width * skinny->panel_width;
}

// columns (rows x r) as a contiguous panel of rp columns, zero beyond r.
at::Tensor as_panel(const at::Tensor& columns, int64_t rp) {
  if (rp == columns.size(1)) {
    return columns.contiguous();
  }
  return at::constant_pad_nd(columns, {0, rp - columns.size(1)}).contiguous();
}

// The row scale (DoRA's factor) as an (out, 1) column, checked; undefined stays undefined.
at::Tensor row_scale_column(const char* op, const at::Tensor& row_scale, const at::Tensor& x, int64_t out) {
  if (!row_scale.defined()) {
    return row_scale;
  }
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == out, op, ": factor must be 1D of size out == ", out,
              ", got ", row_scale.sizes());
  check_same(op, "factor", row_scale, x);
  return row_scale.unsqueeze(1);
}

// y = dropout(x) A^T (s B)^T [+ bias], block by block: each block of x is read once (and dropped out once, in a
// per-worker buffer), and xa = dropout(x) A^T of a block runs on the skinny kernels where they take x, with A^T as a
// panel of rp columns. Where xa_rows is defined (rows x rp, for the base GEMM's term), xa goes there and y is left
// alone.
void write_lora_term_blocks(const DeviceKernels& kernels, const at::Tensor& x2d, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const at::Tensor& bias, double scale, double dropout,
                            const DropoutSpec& spec, const SkinnyKernels* skinny, const at::Tensor& y,
                            const at::Tensor& xa_rows) {
  const int64_t rows = x2d.size(0);
  const int64_t in = x2d.size(1);
  const int64_t out = y.size(1);
  const int64_t r = lora_A.size(0);
  const int64_t step = skinny_block_rows(skinny, library_block_elements(kernels, x2d.scalar_type()), rows,
                                         std::max(in, out));
  const int64_t workers = loop_workers(kernels, rows, step);
  const int64_t rp = panel_columns(skinny, r);
  const at::Tensor At = skinny != nullptr ? as_panel(lora_A.t(), rp) : lora_A.t();
  const bool only_xa = xa_rows.defined();
  TORCH_INTERNAL_ASSERT(!only_xa || (skinny != nullptr && xa_rows.size(0) == rows && xa_rows.size(1) == rp));
  // The skinny kernels' expand takes the bias and scale itself. For ATen's GEMMs the bias rides along the expansion
  // as an extra column of ones, y = [xa, 1] [s B, bias]^T.
  const bool expanded = !only_xa && expands(skinny, rp);
  const at::Tensor packed_B = expanded ? skinny->pack_expand(lora_B, rp) : at::Tensor();
  const at::Tensor bias32 = expanded && bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  const bool bias_in_blocks = !only_xa && bias.defined() && !expanded;
  const at::Tensor B_rows = only_xa || expanded ? at::Tensor()
                            : bias_in_blocks    ? at::cat({as_panel(lora_B * scale, rp), bias.unsqueeze(1)}, 1)
                                                : as_panel(lora_B, rp);
  // Per-worker buffers: [xa, 1] of one block, and with dropout the block's dropped-out copy of x (the mask is
  // regenerated in backward).
  const at::Tensor xa_buffers = only_xa          ? at::Tensor()
                                : bias_in_blocks ? at::ones({workers, step, rp + 1}, x2d.options())
                                                 : at::empty({workers, step, rp}, x2d.options());
  const at::Tensor dropped_buffers =
      dropout > 0.0 ? at::empty({workers, step, in}, x2d.options()) : at::empty({0}, x2d.options());
  kernels.for_each_block(rows, step, [&](int64_t row0, int64_t n, int64_t worker) {
    at::Tensor source = x2d.narrow(0, row0, n);
    if (dropout > 0.0) {
      const at::Tensor dropped = dropped_buffers[worker].narrow(0, 0, n);
      kernels.dropout_rows(source, dropped, row0, spec);
      source = dropped;
    }
    const at::Tensor xa_1 = only_xa ? at::Tensor() : xa_buffers[worker].narrow(0, 0, n);
    at::Tensor xa_block = only_xa ? xa_rows.narrow(0, row0, n) : xa_1.narrow(1, 0, rp);
    if (skinny != nullptr) {
      // Fetches the worker's next block of x, which its next block reads first (the dropout pass, or this product).
      skinny->mm(source, At, xa_block, next_rows(x2d, row0, n, step));
    } else {
      at::mm_out(xa_block, source, At);
    }
    if (only_xa) {
      return;
    }
    at::Tensor y_block = y.narrow(0, row0, n);
    if (expanded) {
      skinny->expand(xa_block, packed_B, scale, bias32, y_block);
    } else if (bias_in_blocks) {
      at::mm_out(y_block, xa_1, B_rows.t());
    } else {
      at::addmm_out(y_block, y_block, xa_1, B_rows.t(), /*beta=*/0, /*alpha=*/scale);  // ignores y's contents
    }
  });
}

// The backward's LoRA products block by block, for blocks of rows small enough to stay in cache, so that each block
// of dy and x is read from memory once: g = dy s B, xa = dropout(x) A^T (recomputed rather than saved by the
// forward; with dropout the mask of a block is drawn again, never stored), dB / s = dy^T xa and dA = g^T dropout(x),
// summed per worker (in float32 for the 16-bit dtypes). With grad_x defined, also its LoRA part g A, masked. With
// g_rows defined (rows x rp, for the base GEMM's term), g of every block goes there, and with keep_rows defined
// (rows x in / 8 bytes, with dropout) the mask's bits (DeviceKernels::dropout_rows_keep).
// Returns (dA, dB / s), in the accumulation dtype.
std::pair<at::Tensor, at::Tensor> lora_products_in_blocks(const DeviceKernels& kernels, const at::Tensor& gy,
                                                          const at::Tensor& x2d, const at::Tensor& lora_A,
                                                          const at::Tensor& Bs, double dropout,
                                                          const DropoutSpec& spec, const SkinnyKernels* skinny,
                                                          const at::Tensor& grad_x, const at::Tensor& g_rows,
                                                          const at::Tensor& keep_rows) {
  const int64_t rows = x2d.size(0);
  const int64_t in = x2d.size(1);
  const int64_t out = gy.size(1);
  const int64_t r = lora_A.size(0);
  const bool lora_grad_x = grad_x.defined();
  // The LoRA products multiply blocks of rows by the panels A^T (in x r) and s B (out x r). The skinny kernels want
  // contiguous panels zero-padded to their width, and sum dA^T and dB in that layout; ATen's GEMMs run fastest on
  // the transposed views and sums (dA and dB^T), as MKL prefers the long side as the output's rows.
  // The skinny kernels' sums are depth x rp, or rp x depth where they say so (ATen's: r x depth).
  const int64_t rp = panel_columns(skinny, r);
  const auto panel = [&](const at::Tensor& columns) { return skinny == nullptr ? columns : as_panel(columns, rp); };
  const at::Tensor At = panel(lora_A.t());
  const at::Tensor Bp = panel(Bs);
  const int64_t block_elements =
      skinny != nullptr ? skinny->block_elements : library_block_elements(kernels, x2d.scalar_type());
  const int64_t step = skinny_block_rows(skinny, block_elements, rows, std::max(in, out));
  const int64_t workers = loop_workers(kernels, rows, step);
  const auto acc_options = x2d.options().dtype(accumulate_dtype(x2d.scalar_type()));
  const bool cast_acc = acc_options.dtype() != x2d.dtype();
  const bool sums_by_rank = skinny == nullptr || skinny->transposed_sums;  // r (or rp) x depth
  const auto sums = [&](int64_t depth) {
    if (skinny == nullptr) {
      return at::zeros({workers, r, depth}, acc_options);
    }
    return sums_by_rank ? at::zeros({workers, rp, depth}, acc_options) : at::zeros({workers, depth, rp}, acc_options);
  };
  const at::Tensor grad_A_acc = sums(in);
  const at::Tensor grad_B_acc = sums(out);
  // `ahead`: rows that a later product of this worker reads (see SkinnyKernels), which the skinny kernels may
  // prefetch; ATen's GEMMs do not take it.
  const auto product = [skinny](at::Tensor result, const at::Tensor& p, const at::Tensor& q,
                                MemorySpan ahead) {  // result = p q
    if (skinny != nullptr) {
      skinny->mm(p, q, result, ahead);
    } else {
      at::mm_out(result, p, q);
    }
  };
  const auto accumulate = [skinny, cast_acc](at::Tensor acc, const at::Tensor& p, const at::Tensor& q,
                                             MemorySpan ahead) {
    if (skinny != nullptr) {
      skinny->accumulate(p, q, acc, ahead);  // acc += p^T q (or its transpose)
    } else if (cast_acc) {
      acc.add_(at::mm(q.t(), p));  // acc^T += p^T q
    } else {
      acc.addmm_(q.t(), p);
    }
  };
  // result = p q and acc += p^T h: the skinny kernels read p once for both.
  const auto product_and_accumulate = [&](at::Tensor result, const at::Tensor& p, const at::Tensor& q,
                                          at::Tensor acc, const at::Tensor& h, MemorySpan ahead) {
    if (skinny != nullptr) {
      skinny->mm_accumulate(p, q, result, h, acc, ahead);
    } else {
      product(result, p, q, ahead);
      accumulate(acc, p, h, {});
    }
  };
  // Where the skinny kernels fuse (float32 on AVX512), three passes over a block instead of four: one of dy and x
  // carries both of its products (g and dB on dy, or xa and dA on x), the other takes its two in turn. The carrier's
  // second pass is the one saved, so the wider of the two carries. But with dropout and a LoRA part of dx, x goes
  // second and carries: g A must exist before the pass that regenerates the mask of dropout(x), which masks g A too
  // (not so where dx's LoRA part rides the base GEMM, which masks it from the mask's bits).
  const bool dy_carries_both = skinny != nullptr && out > in && !(dropout > 0.0 && lora_grad_x);
  const at::Tensor dropped_buffers =
      dropout > 0.0 ? at::empty({workers, step, in}, x2d.options()) : at::empty({0}, x2d.options());
  // dx's LoRA part g A on the skinny kernels' expand where they have one. Else, on a device that prefers whole
  // library GEMMs (the CPU), in bfloat16 without dropout, it is one GEMM after the loop rather than one per block
  // (oneDNN's calls cost more than MKL's, and there is no mask to apply to it per block): g is then kept for all rows.
  const at::Tensor packed_A =
      lora_grad_x && expands(skinny, rp) ? skinny->pack_expand(lora_A.t(), rp) : at::Tensor();
  const bool dx_after_loop = lora_grad_x && !packed_A.defined() && dropout == 0.0 && kernels.whole_products &&
                             x2d.scalar_type() == at::kBFloat16;
  const at::Tensor xa_buffers = at::empty({workers, step, rp}, x2d.options());
  TORCH_INTERNAL_ASSERT(!g_rows.defined() || (g_rows.size(0) == rows && g_rows.size(1) == rp));
  const bool g_of_all_rows = dx_after_loop || g_rows.defined();
  const at::Tensor g_buffers = g_rows.defined() ? g_rows
                               : dx_after_loop  ? at::empty({rows, rp}, x2d.options())
                                                : at::empty({workers, step, rp}, x2d.options());
  const auto lora_part_of_dx = [&](at::Tensor dx_block, const at::Tensor& g_block) {
    if (packed_A.defined()) {
      skinny->expand(g_block, packed_A, 1.0, at::Tensor(), dx_block);
    } else {
      at::mm_out(dx_block, g_block.narrow(1, 0, r), lora_A);
    }
  };
  // Each worker's buffers and sums as views made once: a view costs about a microsecond, and a block of the skinny
  // kernels some tens of microseconds.
  struct WorkerViews {
    at::Tensor xa, g, dropped, grad_A_sums, grad_B_sums;
  };
  std::vector<WorkerViews> views;
  views.reserve(workers);
  for (int64_t w = 0; w < workers; ++w) {
    views.push_back({xa_buffers[w], g_of_all_rows ? at::Tensor() : g_buffers[w],
                     dropout > 0.0 ? dropped_buffers[w] : at::Tensor(), grad_A_acc[w], grad_B_acc[w]});
  }
  const auto first_rows = [](const at::Tensor& buffer, int64_t n) {
    return n == buffer.size(0) ? buffer : buffer.narrow(0, 0, n);
  };
  TORCH_INTERNAL_ASSERT(!keep_rows.defined() || (dropout > 0.0 && g_rows.defined() && !lora_grad_x));
  // dropped = dropout(x) of a block, with the mask's bits where the base GEMM masks dx's LoRA part.
  const auto drop = [&](const at::Tensor& x_block, const at::Tensor& dropped, int64_t row0, int64_t n) {
    if (keep_rows.defined()) {
      kernels.dropout_rows_keep(x_block, dropped, keep_rows.narrow(0, row0, n), row0, spec);
    } else {
      kernels.dropout_rows(x_block, dropped, row0, spec);
    }
  };
  kernels.for_each_block(rows, step, [&](int64_t row0, int64_t n, int64_t worker) {
    const WorkerViews& own = views.at(worker);  // checked: see DeviceKernels::for_each_block
    const at::Tensor gy_block = gy.narrow(0, row0, n);
    const at::Tensor x_block = x2d.narrow(0, row0, n);
    // g = s dy B is the gradient w.r.t. xa; dB = dy^T xa (times s, applied once at the end); dA^T = dropout(x)^T g.
    const at::Tensor g_block = g_of_all_rows ? g_buffers.narrow(0, row0, n) : first_rows(own.g, n);
    const at::Tensor xa_block = first_rows(own.xa, n);
    const at::Tensor& grad_A_sums = own.grad_A_sums;
    const at::Tensor& grad_B_sums = own.grad_B_sums;
    at::Tensor dx_block = lora_grad_x && !dx_after_loop ? grad_x.narrow(0, row0, n) : at::Tensor();
    at::Tensor source = x_block;
    // The first pass over one of x and dy fetches the other's block, which the second pass reads; the second pass
    // fetches the first one's next block, which this worker's next block starts with.
    if (dy_carries_both) {  // dx's LoRA part, if any, is not masked here
      if (dropout > 0.0) {
        source = first_rows(own.dropped, n);
        drop(x_block, source, row0, n);
      }
      product(xa_block, source, At, row_span(gy, row0, n));
      product_and_accumulate(g_block, gy_block, Bp, grad_B_sums, xa_block, next_rows(x2d, row0, n, step));
      if (dx_block.defined()) {
        lora_part_of_dx(dx_block, g_block);
      }
      accumulate(grad_A_sums, source, g_block, {});
      return;
    }
    product(g_block, gy_block, Bp, row_span(x2d, row0, n));
    // The LoRA part of dx, g A (masked below with dropout); the base GEMM accumulates onto it after the loop.
    if (dx_block.defined()) {
      lora_part_of_dx(dx_block, g_block);
    }
    if (dropout > 0.0) {
      // Regenerate the block's mask: dropout(x) feeds xa and dA, and the LoRA part of dx is masked in the same pass.
      source = first_rows(own.dropped, n);
      if (lora_grad_x) {
        kernels.dropout_rows_backward(x_block, source, dx_block, row0, spec);
      } else {
        drop(x_block, source, row0, n);
      }
    }
    product_and_accumulate(xa_block, source, At, grad_A_sums, g_block, next_rows(gy, row0, n, step));
    accumulate(grad_B_sums, gy_block, xa_block, {});
  });
  // The workers' sums are added up here, before the base GEMM evicts them.
  at::Tensor grad_A = workers == 1 ? grad_A_acc[0] : grad_A_acc.sum(0);
  at::Tensor grad_B = workers == 1 ? grad_B_acc[0] : grad_B_acc.sum(0);
  if (dx_after_loop) {
    at::Tensor dx = grad_x;
    at::mm_out(dx, g_buffers.narrow(1, 0, r), lora_A);
  }
  if (sums_by_rank) {
    return {grad_A.narrow(0, 0, r), grad_B.narrow(0, 0, r).t()};
  }
  return {grad_A.narrow(1, 0, r).t(), grad_B.narrow(1, 0, r)};
}

}  // namespace

at::Tensor lora_forward(const DeviceKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& given_A, const at::Tensor& given_B,
                        double scale, double dropout, const at::Tensor& seed, const at::Tensor& row_scale) {
  constexpr const char* op = "lora_forward";
  const auto [in, out, r] = check_apply(op, x, weight, given_A, given_B, /*float32_adapters=*/true);
  // float32 adapters on 16-bit x compute in x's dtype, as if the caller had cast them.
  const at::Tensor lora_A = given_A.to(x.scalar_type());
  const at::Tensor lora_B = given_B.to(x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor f = row_scale_column(op, row_scale, x, out);
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must be 1D of size out == weight.size(0) == ",
                out, ", got ", bias->sizes());
    check_same(op, "bias", *bias, x);
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const DropoutSpec spec = make_dropout_spec(op, dropout, seed);

  const at::Tensor x2d = x.reshape({-1, in}).contiguous();
  const int64_t rows = x2d.size(0);
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out;
  if (dropout == 0.0 && folding_pays_off(x2d.scalar_type(), rows, in, out)) {
    // One GEMM on W + s B A: the LoRA term costs the fold (into the device's out x in scratch) and not a pass over
    // x and y.
    const at::Tensor folded = fold_adapters(kernels, weight, lora_A, lora_B, scale);
    if (f.defined()) {
      folded.mul_(f);  // f * (W + s B A), in the scratch
    }
    const at::Tensor y = has_bias ? at::addmm(*bias, x2d, folded.t()) : at::mm(x2d, folded.t());
    return y.view(y_shape);
  }

  at::Tensor y = at::empty({rows, out}, x2d.options());
  const SkinnyKernels* skinny = skinny_kernels_for(kernels, x2d);
  // The bias rides along the LoRA term, so it costs no pass of its own; with a row scale it is added after the
  // scaling.
  const bool bias_in_lora = has_bias && !f.defined();
  const bool whole_products = products_in_whole_gemms(kernels, skinny, dropout, rows, in, out, /*forward=*/true);
  const int64_t xa_columns = whole_products ? r : panel_columns(skinny, r);  // the blocks' xa: a panel, zero beyond r
  if (term_rides_base(skinny, x2d, weight, /*transposed=*/true, xa_columns)) {
    // y = x W^T + xa (s B)^T (+ bias) in the base GEMM's sums, rounded once; s B is rounded to 16 bits once from the
    // adapters as given (nothing beyond B's own rounding where s is a power of two).
    at::Tensor xa;
    if (whole_products) {
      xa = at::mm(x2d, lora_A.t());
    } else {
      xa = at::empty({rows, xa_columns}, x2d.options());
      write_lora_term_blocks(kernels, x2d, lora_A, lora_B, at::Tensor(), scale, dropout, spec, skinny, y, xa);
    }
    const at::Tensor scaled_B = as_panel((given_B.to(at::kFloat) * scale).to(x2d.scalar_type()), xa_columns);
    skinny->base_with_term(x2d, weight, /*transposed=*/true, xa, scaled_B,
                           bias_in_lora ? bias->to(at::kFloat).contiguous() : at::Tensor(), /*keep=*/at::Tensor(),
                           1.0, y);
  } else {
    if (whole_products) {
      const at::Tensor xa = at::mm(x2d, lora_A.t());  // N x r
      if (expands(skinny, r)) {
        expand_in_blocks(kernels, skinny, xa, lora_B, scale, bias_in_lora ? *bias : at::Tensor(), y);
      } else if (bias_in_lora) {
        at::addmm_out(y, *bias, xa, lora_B.t(), /*beta=*/1, /*alpha=*/scale);
      } else {
        at::addmm_out(y, y, xa, lora_B.t(), /*beta=*/0, /*alpha=*/scale);  // ignores y's contents
      }
    } else {
      write_lora_term_blocks(kernels, x2d, lora_A, lora_B, bias_in_lora ? *bias : at::Tensor(), scale, dropout,
                             spec, skinny, y, /*xa_rows=*/at::Tensor());
    }
    accumulate_base(skinny, y, x2d, weight, /*transposed=*/true);
  }
  if (f.defined()) {
    y.mul_(f.t());
    if (has_bias) {
      y.add_(*bias);
    }
  }
  return y.view(y_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward(const DeviceKernels& kernels, const at::Tensor& grad_y,
                                                             const at::Tensor& x, const at::Tensor& weight,
                                                             const at::Tensor& given_A, const at::Tensor& given_B,
                                                             double scale, double dropout, const at::Tensor& seed,
                                                             bool need_grad_x, const at::Tensor& row_scale) {
  constexpr const char* op = "lora_backward";
  const auto [in, out, r] = check_apply(op, x, weight, given_A, given_B, /*float32_adapters=*/true);
  // As in lora_forward, the products run in x's dtype; dA and dB come back in the adapters' dtype, so float32 adapters
  // get the float32 sums unrounded.
  const at::Tensor lora_A = given_A.to(x.scalar_type());
  const at::Tensor lora_B = given_B.to(x.scalar_type());
  const at::ScalarType grad_dtype = given_A.scalar_type();
  TORCH_CHECK(grad_y.dim() == x.dim() && grad_y.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1) &&
                  grad_y.size(-1) == out,
              op, ": grad_y must be x's shape with the last dim out == ", out, ", got ", grad_y.sizes(), " for x ",
              x.sizes());
  check_same(op, "grad_y", grad_y, x);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const DropoutSpec spec = make_dropout_spec(op, dropout, seed);

  const at::Tensor x2d = x.reshape({-1, in}).contiguous();
  const int64_t rows = x2d.size(0);
  // Without dropout and with enough rows, dx = dy (W + s B A) is one GEMM, as in the forward.
  const bool fold = need_grad_x && dropout == 0.0 && folding_pays_off(x2d.scalar_type(), rows, in, out);
  const bool lora_grad_x = need_grad_x && !fold;
  // A row scale f multiplies dy's columns. Where dy meets only B and the folded weight, f goes into those (B's rows,
  // the fold's rows, and dB's rows at the end); where the base GEMM takes dy itself, dy is scaled once.
  const at::Tensor f = row_scale_column(op, row_scale, x, out);
  const bool f_in_weights = f.defined() && !lora_grad_x;
  at::Tensor gy = grad_y.reshape({-1, out}).contiguous();
  if (f.defined() && !f_in_weights) {
    gy = gy * f.t();
  }
  const SkinnyKernels* skinny = skinny_kernels_for(kernels, x2d);
  const at::Tensor Bs = f_in_weights ? lora_B * f * scale : lora_B * scale;
  at::Tensor grad_x = need_grad_x ? at::empty({rows, in}, x2d.options()) : at::empty({0}, x.options());
  at::Tensor grad_A;
  at::Tensor grad_B;  // without its factor s (and f)
  const bool whole_products = products_in_whole_gemms(kernels, skinny, dropout, rows, in, out, /*forward=*/false);
  // dx's LoRA part g A can ride the base GEMM as extra depth: g of all rows is then kept for it (the blocks' g: a
  // panel, zero beyond r). With dropout, which masks that part alone, the loop's dropout pass also writes the mask as
  // bits (in / 8 bytes a row; the base GEMM takes in as a multiple of 32), and the base GEMM applies them.
  const int64_t g_columns = whole_products ? r : panel_columns(skinny, r);
  const bool dx_term_in_base = lora_grad_x && (dropout == 0.0 || kernels.dropout_rows_keep != nullptr) &&
                               term_rides_base(skinny, gy, weight, /*transposed=*/false, g_columns);
  const at::Tensor keep = dx_term_in_base && dropout > 0.0 ? at::empty({rows, in / 8}, x2d.options().dtype(at::kByte))
                                                           : at::Tensor();
  at::Tensor g_rows;
  if (whole_products) {
    const at::Tensor g = at::mm(gy, Bs);  // N x r: the gradient w.r.t. xa = x A^T
    if (dx_term_in_base) {
      g_rows = g;
    } else if (lora_grad_x) {
      at::mm_out(grad_x, g, lora_A);  // the LoRA part of dx; the base GEMM accumulates onto it below
    }
    grad_A = at::mm(g.t(), x2d);
    grad_B = at::mm(gy.t(), at::mm(x2d, lora_A.t()));
  } else {
    g_rows = dx_term_in_base ? at::empty({rows, g_columns}, x2d.options()) : at::Tensor();
    std::tie(grad_A, grad_B) =
        lora_products_in_blocks(kernels, gy, x2d, lora_A, Bs, dropout, spec, skinny,
                                lora_grad_x && !dx_term_in_base ? grad_x : at::Tensor(), g_rows, keep);
  }
  grad_A = grad_A.to(grad_dtype).contiguous();
  // s and f multiply dB in float32 for the 16-bit dtypes: f * s rounded to 16 bits would bias whole rows of dB.
  const at::ScalarType acc_dtype = accumulate_dtype(x2d.scalar_type());
  grad_B = grad_B.to(acc_dtype).mul(f_in_weights ? f.to(acc_dtype) * scale
                                                 : at::scalar_tensor(scale, grad_B.options().dtype(acc_dtype)));
  grad_B = grad_B.to(grad_dtype).contiguous();
  if (fold) {
    const at::Tensor folded = fold_adapters(kernels, weight, lora_A, lora_B, scale);
    if (f_in_weights) {
      folded.mul_(f);
    }
    at::mm_out(grad_x, gy, folded);
  } else if (dx_term_in_base) {
    const at::Tensor A_rows = g_columns == r ? lora_A : at::constant_pad_nd(lora_A, {0, 0, 0, g_columns - r});
    skinny->base_with_term(gy, weight, /*transposed=*/false, g_rows, A_rows.contiguous(), /*bias=*/at::Tensor(), keep,
                           spec.scale, grad_x);
  } else if (need_grad_x) {
    accumulate_base(skinny, grad_x, gy, weight, /*transposed=*/false);
  }
  return {need_grad_x ? grad_x.view(x.sizes()) : grad_x, grad_A, grad_B};
}

at::Tensor dora_forward(const DeviceKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                        const at::Tensor& factor, double scale) {
  check_apply("dora_forward", x, weight, lora_A, lora_B);
  row_scale_column("dora_forward", factor, x, weight.size(0));
  return lora_forward(kernels, x, weight, bias, lora_A, lora_B, scale, 0.0, at::zeros({}, at::kLong), factor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward(
    const DeviceKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& factor, double scale, bool need_grad_x) {
  constexpr const char* op = "dora_backward";
  check_apply(op, x, weight, lora_A, lora_B);
  const int64_t out = weight.size(0);
  row_scale_column(op, factor, x, out);
  TORCH_CHECK(y.sizes() == grad_y.sizes(), op, ": y must be grad_y's shape ", grad_y.sizes(), ", got ", y.sizes());
  check_same(op, "y", y, x);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must be 1D of size out == weight.size(0) == ",
                out, ", got ", bias->sizes());
    check_same(op, "bias", *bias, x);
  }
  auto [grad_x, grad_A, grad_B] = lora_backward(kernels, grad_y, x, weight, lora_A, lora_B, scale, 0.0,
                                                at::zeros({}, at::kLong), need_grad_x, factor);
  // grad_factor = sum over rows of dy * z, with DoRA's unscaled output z = (y - bias) / factor:
  // (sum(dy * y) - bias * sum(dy)) / factor, the sums taken over blocks of rows (no N x out temporary), in float32
  // for the 16-bit dtypes.
  const at::Tensor gy = grad_y.reshape({-1, out});
  const at::Tensor y2d = y.reshape({-1, out});
  const int64_t rows = gy.size(0);
  const auto acc_dtype = accumulate_dtype(gy.scalar_type());
  at::Tensor sums = at::zeros({out}, gy.options().dtype(acc_dtype));
  at::Tensor grad_sums = at::zeros({out}, gy.options().dtype(acc_dtype));
  const int64_t step = block_rows(kernels.block_elements, rows, out);
  at::Tensor product = at::empty({std::min(step, rows), out}, gy.options());
  for (int64_t row0 = 0; row0 < rows; row0 += step) {
    const int64_t n = std::min(step, rows - row0);
    at::Tensor block = product.narrow(0, 0, n);
    at::mul_out(block, gy.narrow(0, row0, n), y2d.narrow(0, row0, n));
    sums.add_(block.sum(0, false, acc_dtype));
    if (has_bias) {
      grad_sums.add_(gy.narrow(0, row0, n).sum(0, false, acc_dtype));
    }
  }
  if (has_bias) {
    sums.sub_(bias->to(acc_dtype) * grad_sums);
  }
  at::Tensor grad_factor = sums / factor.to(acc_dtype);
  // Where the factor is 0, y holds nothing of z: z's columns come from x and those rows of W + s B A.
  const at::Tensor zero = at::nonzero(factor == 0).squeeze(1);
  if (zero.numel() > 0) {
    const at::Tensor rows_of_fold = at::addmm(weight.index_select(0, zero), lora_B.index_select(0, zero), lora_A,
                                              /*beta=*/1, /*alpha=*/scale);
    const at::Tensor z = at::mm(x.reshape({-1, x.size(-1)}), rows_of_fold.t());
    grad_factor.index_copy_(0, zero, (gy.index_select(1, zero) * z).sum(0, false, acc_dtype));
  }
  return {grad_x, grad_A, grad_B, grad_factor.to(factor.scalar_type())};
}

at::Tensor dropout_mask(const DeviceKernels& kernels, const at::Tensor& x, double dropout, const at::Tensor& seed) {
  constexpr const char* op = "dropout_mask";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in), got ", x.sizes());
  const DropoutSpec spec = make_dropout_spec(op, dropout, seed);
  at::Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  if (mask.numel() > 0) {
    kernels.mask_rows(mask.view({-1, x.size(-1)}), spec);
  }
  return mask;
}

}  // namespace d9d
