"""Benchmarks the fused LoRA ops against the frozen base linear and the unfused LoRA form, side by side.

For each dropout rate it times forward + backward (W frozen, x requires grad) of
  base:    the frozen base linear alone,
  unfused: ``base(x) + s * lora_B(lora_A(dropout(x)))`` with nn.Linear modules,
  fused:   ``d9d.ops.lora_linear``,
interleaving the variants so that machine noise hits them alike, and reports the median and the overhead over base.
In the same repeats it times the fused step's own work alone (the fold of ``W + s B A`` and the backward's LoRA
products): what that work costs on this machine, however little else the fused op adds.
It also counts the bytes that autograd saves for backward (hooks on saved tensors, excluding x and parameters) and
the bytes that merging allocates (fused ``lora_merge_`` vs ``W += s * (B @ A)``).

    python scripts/bench_lora.py                                    # CPU, float32, the issue's shapes
    python scripts/bench_lora.py --write BENCHMARKS.md              # also replace the table in that file
    python scripts/bench_lora.py --device cuda --dtype bfloat16 --tokens 32768 --features 8192

The table header names the CPU, the capability that ATen and d9d's kernels run (``ATEN_CPU_CAPABILITY`` picks a
lower one) and the memory allocator (a preloaded tcmalloc spares the unfused form's extra tensors their page faults;
see bench_e2e.py); ``--write`` keeps one section per device, CPU, capability and allocator. To emulate an AVX2-only
CPU on an AVX-512 one, pin MKL and oneDNN too, so that the base GEMMs do not keep using AVX-512:

    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench_lora.py
"""

import argparse
import functools
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import (
    SavedBytes,
    command_line,
    cpu_memory_events,
    cpu_section,
    machine,
    mib,
    overhead_quartiles,
    paired_overhead,
    time_interleaved,
    write_section,
)
from torch import nn

from d9d.ops import lora_linear, lora_merge_

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Setup:
    """The shared tensors and modules of one benchmark configuration."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Builds x, the frozen base linear and the adapters on the requested device and dtype."""
        torch.manual_seed(0)
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.scale = args.alpha / args.rank
        kwargs = {"device": self.device, "dtype": self.dtype}
        self.x = torch.randn(args.tokens, args.features, requires_grad=True, **kwargs)
        self.grad_y = torch.randn(args.tokens, args.out_features, **kwargs)
        self.base = nn.Linear(args.features, args.out_features, **kwargs).requires_grad_(False)
        self.lora_A = nn.Linear(args.features, args.rank, bias=False, **kwargs)
        self.lora_B = nn.Linear(args.rank, args.out_features, bias=False, **kwargs)
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scratch = self.base.weight.detach().clone()  # what the fold part merges into (it drifts by s B A a call)
        self.seed = torch.zeros((), dtype=torch.int64)  # the parts' dropout seed (CPU, as the op wants)

    def forward(self, variant: str, dropout: float) -> torch.Tensor:
        """One forward of ``variant`` (base, unfused or fused) in training mode."""
        if variant == "base":
            return self.base(self.x)
        if variant == "unfused":
            xd = nn.functional.dropout(self.x, p=dropout, training=True) if dropout > 0 else self.x
            return self.base(self.x) + self.scale * self.lora_B(self.lora_A(xd))
        return lora_linear(
            self.x,
            self.base.weight,
            self.base.bias,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scale,
            dropout,
            training=True,
        )

    def step(self, variant: str, dropout: float) -> None:
        """Forward + backward, then drop the gradients so that no step accumulates into the previous one's."""
        self.forward(variant, dropout).backward(self.grad_y)
        self.x.grad = None
        self.lora_A.weight.grad = None
        self.lora_B.weight.grad = None

    def fused_step_folds(self) -> bool:
        """Whether the fused step folds ``W + s B A`` (twice, without dropout): in float32 and float64 with rows *
        (in + out) >= 2 in out, the rule of ``folding_pays_off`` in csrc/lora.cpp. 16-bit dtypes never fold."""
        rows, out, in_ = self.x.numel() // self.x.shape[-1], *self.base.weight.shape
        return self.dtype in (torch.float32, torch.float64) and rows * (in_ + out) >= 2 * in_ * out

    def part(self, name: str, dropout: float) -> None:
        """One part of the fused step on its own: ``fold`` or ``products`` (the backward's LoRA products, and with
        dropout their mask; without dx, so neither its GEMM nor its LoRA part).

        The op's fold has no op of its own, so ``fold`` times ``lora_merge_`` on a copy of W: the same multiply-adds
        and a read and a write of W's size, in place, where the op's fold writes a separate scratch (and ATen's
        out-of-place addmm took twice as long, copying W first). So it likely costs a little less than the op's fold.
        """
        with torch.no_grad():
            if name == "fold":
                lora_merge_(self.scratch, self.lora_A.weight, self.lora_B.weight, self.scale)
                return
            weights = (self.base.weight, self.lora_A.weight, self.lora_B.weight)
            torch.ops.d9d.lora_backward(self.grad_y, self.x, *weights, self.scale, dropout, self.seed, False)

    def saved_bytes(self, variant: str, dropout: float) -> int:
        """Bytes of the distinct tensors autograd saves for backward, excluding x and the parameters."""
        excluded = (self.x, *self.base.parameters(), self.lora_A.weight, self.lora_B.weight)
        with SavedBytes(exclude=excluded) as saved:
            y = self.forward(variant, dropout)
        y.backward(self.grad_y)
        self.x.grad = None
        return saved.nbytes


def allocated_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Bytes allocated while ``fn`` runs: peak growth on CUDA, the sum of the allocations the profiler saw on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # Each op's own allocations are its positive self memory; frees show up as negative entries.
    return sum(max(0, e.self_cpu_memory_usage) for e in cpu_memory_events(fn))


def merge_bytes(setup: Setup) -> tuple[int, int]:
    """Bytes allocated by the fused merge and by the unfused ``W += s * (B @ A)``, on copies of the base weight."""
    weight = setup.base.weight.detach().clone()
    A = setup.lora_A.weight.detach()
    B = setup.lora_B.weight.detach()

    def unfused() -> None:
        weight.add_(setup.scale * (B @ A))

    fused = allocated_bytes(lambda: lora_merge_(weight, A, B, setup.scale), setup.device)
    return fused, allocated_bytes(unfused, setup.device)


def parts_table(
    times: dict[tuple[str, float], list[float]], parts: list[tuple[str, float]], base: list[float]
) -> list[str]:
    """The fused step's parts, each timed alone, against the base step, and what they add up to per dropout: how
    much of the fused overhead is the work itself (the fold runs in the forward and the backward)."""
    names = {
        "fold": "fold `W + s B A` (as `lora_merge_` in place on a copy of W; twice per step without dropout)",
        "products": "backward's LoRA products",
    }
    lines = [
        "| part of the fused step, timed alone | dropout | median (ms) | share of the base step |",
        "| --- | --- | ---: | ---: |",
    ]
    # Median over repeats of part time / base time; the sums below add these medians, an estimate.
    share = {part: paired_overhead(times[part], base) + 1 for part in parts}
    for name, p in parts:
        detail = " and mask" if name == "products" and p > 0 else ""
        lines.append(
            f"| {names[name]}{detail} | {p:g} | {statistics.median(times[(name, p)]) * 1e3:.2f} | "
            f"{100 * share[(name, p)]:.1f}% |"
        )
    sums = []
    for p in sorted({p for _, p in parts}):
        fold_share = 2 * share[("fold", 0.0)] if p == 0 and ("fold", 0.0) in share else 0.0
        what = "two folds and the products" if fold_share else "the products" + (" and their mask" if p > 0 else "")
        sums.append(f"dropout {p:g}: {what}, about {100 * (fold_share + share[('products', p)]):.1f}%")
    # Where the step does not fold, the forward writes a LoRA term onto y and the backward one onto dx; neither has
    # an op of its own to time.
    untimed = ("with dropout, " if ("fold", 0.0) in share else "") + "the LoRA terms of y and dx are not timed alone"
    lines += [
        "",
        f"The fused step's own work, timed alone, as a share of the base step ({untimed}): "
        f"{'; '.join(sums)}.",
    ]
    return lines


def report(args: argparse.Namespace) -> str:
    """Runs every measurement and returns the markdown table."""
    torch.set_num_threads(args.threads) if args.threads else None
    setup = Setup(args)
    dropouts = [0.0, args.dropout]
    cases = [("base", 0.0)] + [(variant, p) for p in dropouts for variant in ("unfused", "fused")]
    steps = {case: functools.partial(setup.step, *case) for case in cases}
    # The fused step's own work, timed alone in the same repeats: what the base step does not do.
    parts = ([("fold", 0.0)] if setup.fused_step_folds() else []) + [("products", p) for p in sorted(set(dropouts))]
    steps |= {part: functools.partial(setup.part, *part) for part in parts}
    times = time_interleaved(steps, args.repeats, args.warmup, device=setup.device)
    base = times[("base", 0.0)]
    x_bytes = setup.x.numel() * setup.x.element_size()
    lines = [
        f"{machine(setup.device)}; {args.device}, {args.dtype}, x {args.tokens} x {args.features}, "
        f"W {args.out_features} x {args.features}, "
        f"r = {args.rank}, forward + backward with W frozen ({torch.get_num_threads()} threads, torch "
        f"{torch.__version__}); {args.repeats} repeats after {args.warmup} warm-up steps, every case once per repeat "
        "in a shuffled order. Overhead: median over repeats of (step time / base step time of the same repeat) - 1; "
        "the middle half of the repeats' ratios shows the machine's noise. "
        f"Saved bytes exclude x and parameters; x itself is {mib(x_bytes)}.",
        "",
        "| dropout | variant | median step (ms) | overhead over base | middle half of repeats | saved for backward |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        f"| - | base linear | {statistics.median(base) * 1e3:.1f} | - | - | {mib(setup.saved_bytes('base', 0.0))} |",
    ]
    overheads = {}
    for p in dropouts:
        for variant in ("unfused", "fused"):
            overheads[(variant, p)] = paired_overhead(times[(variant, p)], base)
            q1, q3 = overhead_quartiles(times[(variant, p)], base)
            lines.append(
                f"| {p:g} | {variant} | {statistics.median(times[(variant, p)]) * 1e3:.1f} | "
                f"{100 * overheads[(variant, p)]:+.1f}% | {100 * q1:+.1f}% to {100 * q3:+.1f}% | "
                f"{mib(setup.saved_bytes(variant, p))} |"
            )
    lines.append("")
    ratios = "; ".join(
        f"dropout {p:g}: fused overhead / unfused overhead = "
        f"{overheads[('fused', p)] / overheads[('unfused', p)]:.2f}, fused step / unfused step = "
        f"{paired_overhead(times[('fused', p)], times[('unfused', p)]) + 1:.3f}"
        for p in dropouts
    )
    lines.append(f"Ratios: {ratios}.")
    if args.targets:
        targets = [float(t) / 100 for t in args.targets.split(",")]
        verdicts = [
            f"dropout {p:g}: at most +{100 * t:g}%: {'met' if overheads[('fused', p)] <= t else 'NOT met'} "
            f"({100 * overheads[('fused', p)]:+.1f}%)"
            for p, t in zip(dropouts, targets, strict=True)
        ]
        lines.append(f"Targets for the fused overhead: {'; '.join(verdicts)}.")
    lines += ["", *parts_table(times, parts, base)]
    fused, unfused = merge_bytes(setup)
    weight_bytes = setup.base.weight.numel() * setup.base.weight.element_size()
    lines += [
        "",
        "| merge | bytes allocated | in units of W (out x in) |",
        "| --- | ---: | ---: |",
        f"| fused `lora_merge_` | {mib(fused)} | {fused / weight_bytes:.2f} |",
        f"| unfused `W += s * (B @ A)` | {mib(unfused)} | {unfused / weight_bytes:.2f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--out-features", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument(
        "--targets", default="3,8", help="fused overhead targets in percent for dropout 0 and --dropout ('' for none)"
    )
    parser.add_argument("--write", type=Path, help="markdown file whose section gets the table (e.g. BENCHMARKS.md)")
    parser.add_argument(
        "--section",
        default=None,
        help="section heading (default: ## LoRA ops (CPU, <cpu>, <capability>[, <allocator>]) or (GPU))",
    )
    args = parser.parse_args()
    table = report(args)
    print(table)
    if args.write:
        cpu_heading = cpu_section("LoRA ops", torch.backends.cpu.get_cpu_capability())
        heading = args.section or (cpu_heading if args.device == "cpu" else "## LoRA ops (GPU)")
        write_section(args.write, heading, command_line("scripts/bench_lora.py"), table, new_first=True)


if __name__ == "__main__":
    main()
