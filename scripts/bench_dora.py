"""Benchmarks d9d's DoRA against the frozen base linear and Hugging Face PEFT's DoRA layer, side by side.

Forward + backward (W frozen, x requires grad) of
  base:  the frozen base linear alone,
  peft:  PEFT's ``lora.Linear`` with ``use_dora=True`` (it builds ``B @ A`` through an ``in x in`` identity and the
         ``out x in`` matrix ``W + s B A`` on every forward to take the row norms),
  d9d:   ``d9d.ops.dora_linear`` (row norms over blocks of rows; on the CPU without dropout one fused op,
         ``d9d::dora_forward``, with DoRA's factor folded into the weights; with dropout PEFT's two-GEMM form),
interleaved so that machine noise hits them alike. Reports the median step, the paired overhead over base, the bytes
autograd saves for backward (excluding x and parameters), the peak of the CPU allocations during one step, and the
largest single allocation (an ``out x in`` temporary shows up there).

    python scripts/bench_dora.py                            # CPU, float32, x 4096 x 2048, W 2048 x 2048, r 16
    python scripts/bench_dora.py --write BENCHMARKS.md      # also replace the DoRA section of that file
    python scripts/bench_dora.py --threads 1 --clock process   # CPU time: steadier on a busy shared machine
"""

import argparse
import functools
import statistics
import time
from pathlib import Path

import bench_common
import torch
from bench_common import (
    SavedBytes,
    command_line,
    cpu_memory_events,
    cpu_model,
    overhead_quartiles,
    paired_overhead,
    paired_ratios,
    time_interleaved,
    write_section,
)
from torch import nn

from d9d.ops import dora_linear, dora_weight_norm

VARIANTS = ("base", "peft", "d9d")


class Setup:
    """x, the frozen base linear, d9d's adapters and a PEFT DoRA layer holding the same values."""

    def __init__(self, args: argparse.Namespace) -> None:
        import peft

        torch.manual_seed(0)
        self.scale = args.alpha / args.rank
        self.x = torch.randn(args.tokens, args.features, requires_grad=True)
        self.grad_y = torch.randn(args.tokens, args.out_features)
        self.base = nn.Linear(args.features, args.out_features).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(args.rank, args.features) / args.features**0.5)
        self.lora_B = nn.Parameter(torch.randn(args.out_features, args.rank) * 0.02)
        self.magnitude = nn.Parameter(dora_weight_norm(self.base.weight, self.lora_A, self.lora_B, self.scale))
        holder = nn.Sequential()
        holder.add_module("proj", self.base)
        config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["proj"], use_dora=True,
                                 lora_dropout=args.dropout)
        self.peft_layer = peft.get_peft_model(holder, config).base_model.model.proj
        with torch.no_grad():
            self.peft_layer.lora_A["default"].weight.copy_(self.lora_A)
            self.peft_layer.lora_B["default"].weight.copy_(self.lora_B)
            self.peft_layer.lora_magnitude_vector["default"].weight.copy_(self.magnitude)
        self.params = [self.lora_A, self.lora_B, self.magnitude, *self.peft_layer.parameters()]

    def forward(self, variant: str, dropout: float) -> torch.Tensor:
        if variant == "base":
            return self.base(self.x)
        if variant == "peft":
            self.peft_layer.lora_dropout["default"].p = dropout
            return self.peft_layer(self.x)
        return dora_linear(self.x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.magnitude,
                           self.scale, dropout, training=True)

    def step(self, variant: str, dropout: float) -> None:
        self.forward(variant, dropout).backward(self.grad_y)
        self.x.grad = None
        for p in self.params:
            p.grad = None

    def saved_bytes(self, variant: str, dropout: float) -> int:
        """Bytes of the distinct tensors autograd saves for backward, excluding x and the parameters."""
        with SavedBytes(exclude=(self.x, *self.base.parameters(), *self.params)) as saved:
            y = self.forward(variant, dropout)
        y.backward(self.grad_y)
        self.step("base", 0.0)  # clears the gradients
        return saved.nbytes

    def allocations(self, variant: str, dropout: float) -> tuple[int, int]:
        """(peak of live bytes during one step above the start, largest net allocation of one op), on the CPU.

        From the profiler's per-op memory (allocations minus frees inside each op), walked in start order: the
        peak is at op granularity, and an op's own net allocation shows its biggest temporary or output.
        """
        events = cpu_memory_events(lambda: self.step(variant, dropout))
        live = peak = largest = 0
        for e in sorted(events, key=lambda e: e.time_range.start):
            live += e.self_cpu_memory_usage
            peak = max(peak, live)
            largest = max(largest, e.self_cpu_memory_usage)
        return peak, largest


def mib(n: int) -> str:
    """Bytes in MiB, or in KiB under 1 MiB (never in bytes, unlike ``bench_common.mib``)."""
    return bench_common.mib(n, smallest="KiB")


def report(args: argparse.Namespace) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(args)
    dropouts = [0.0, args.dropout]
    cases = [("base", 0.0)] + [(v, p) for p in dropouts for v in ("peft", "d9d")]
    clock = time.process_time if args.clock == "process" else time.perf_counter
    steps = {case: functools.partial(setup.step, *case) for case in cases}
    times = time_interleaved(steps, args.repeats, args.warmup, clock=clock)
    base = times[("base", 0.0)]
    weight_bytes = setup.base.weight.numel() * setup.base.weight.element_size()
    lines = [
        f"CPU {cpu_model('unknown')}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; float32, x {args.tokens} x {args.features}, "
        f"W {args.out_features} x {args.features} (W itself is {mib(weight_bytes)}), r = {args.rank}, "
        "forward + backward with W frozen. "
        f"Clock: {'CPU time of the process' if args.clock == 'process' else 'wall time'}. "
        f"{args.repeats} repeats after {args.warmup} warm-up steps, every case once per repeat in a shuffled order; "
        "overhead = median over repeats of (step / base step of the same repeat) - 1, with the middle half of the "
        "repeats' ratios as the noise. Saved bytes exclude x and parameters. Peak: live bytes allocated during one "
        "step above what was live before it (op granularity); largest: the largest net allocation of one op.",
        "",
        "| dropout | variant | median step (ms) | overhead over base | middle half | saved for backward | "
        "peak allocated | largest allocation |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    peak, largest = setup.allocations("base", 0.0)
    lines.append(f"| - | frozen base linear | {statistics.median(base) * 1e3:.1f} | - | - | "
                 f"{mib(setup.saved_bytes('base', 0.0))} | {mib(peak)} | {mib(largest)} |")
    overhead = {}
    for p in dropouts:
        for variant in ("peft", "d9d"):
            overhead[(variant, p)] = paired_overhead(times[(variant, p)], base)
            q1, q3 = overhead_quartiles(times[(variant, p)], base)
            peak, largest = setup.allocations(variant, p)
            name = "PEFT DoRA layer" if variant == "peft" else "d9d `dora_linear`"
            lines.append(
                f"| {p:g} | {name} | {statistics.median(times[(variant, p)]) * 1e3:.1f} | "
                f"{100 * overhead[(variant, p)]:+.1f}% | {100 * q1:+.1f}% to {100 * q3:+.1f}% | "
                f"{mib(setup.saved_bytes(variant, p))} | {mib(peak)} | {mib(largest)} |"
            )
    verdict = "met" if overhead[("d9d", 0.0)] <= 0.15 else "NOT met"
    versus_peft = "; ".join(
        f"dropout {p:g}: {statistics.median(paired_ratios(*pair)):.2f}"
        for p, pair in ((p, (times[("d9d", p)], times[("peft", p)])) for p in dropouts)
    )
    lines += ["", f"Target d9d DoRA <= +15% over the frozen base at dropout 0: {verdict} "
                  f"({100 * overhead[('d9d', 0.0)]:+.1f}%). Median of d9d step / PEFT step: {versus_peft}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--out-features", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU time (with --threads 1, less sensitive to other jobs on a shared machine)")
    parser.add_argument("--write", type=Path, help="markdown file whose DoRA section gets the table")
    args = parser.parse_args()
    table = report(args)
    print(table)
    if args.write:
        write_section(args.write, "## DoRA (CPU)", command_line("scripts/bench_dora.py"), table)


if __name__ == "__main__":
    main()
