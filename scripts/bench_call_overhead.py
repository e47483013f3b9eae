"""Benchmarks what a LoRA layer costs per call where fixed costs dominate: small inputs, forward + backward.

At the shapes of bench_lora.py a layer's step takes hundreds of milliseconds and a fixed cost of tens of
microseconds per call is lost in the noise; here it is most of the step. For each shape it times, interleaved,
forward + backward (W frozen, x requiring grad) of
  base:  the frozen ``nn.Linear`` alone,
  PEFT:  PEFT's LoRA layer around the same linear (made by ``get_peft_model``, called directly),
  d9d:   d9d's ``LoRALinear`` around the same linear,
each call repeated ``--calls`` times per timed step, and reports the median time per call and what the LoRA layer
adds over the base layer, in microseconds.

    python scripts/bench_call_overhead.py
    python scripts/bench_call_overhead.py --write BENCHMARKS.md      # also replace the table in that file
"""

import argparse
import statistics
from pathlib import Path

import torch
from bench_common import command_line, cpu_section, machine, time_interleaved, write_section
from peft import LoraConfig, get_peft_model
from torch import nn

from d9d.peft.lora import LoRAParameters
from d9d.peft.lora.layer import LoRALinear

SHAPES = ((8, 256), (64, 512), (256, 1024))  # (tokens, features), square W


def layers(features: int, rank: int, dropout: float) -> dict[str, nn.Module]:
    """The base linear and the PEFT and d9d LoRA layers around copies of it, with the same nonzero adapters."""
    base = nn.Linear(features, features)
    base.requires_grad_(False)
    peft_model = get_peft_model(
        nn.Sequential(nn.Linear(features, features)),
        LoraConfig(target_modules=["0"], r=rank, lora_alpha=2 * rank, lora_dropout=dropout),
    )
    peft_layer = peft_model.base_model.model[0]
    ours = LoRALinear(nn.Linear(features, features), LoRAParameters(r=rank, alpha=2 * rank, dropout=dropout))
    with torch.no_grad():
        for layer in (peft_layer.base_layer, ours.base):
            layer.weight.copy_(base.weight)
            layer.bias.copy_(base.bias)
        ours.lora_B.normal_(0, 0.02)
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
    ours.base.requires_grad_(False)
    return {"base": base, "PEFT": peft_layer, "d9d": ours}


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, calls: int):
    """``calls`` forward + backward passes of ``module`` on ``x``."""

    def run() -> None:
        for _ in range(calls):
            module(x).backward(grad)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calls", type=int, default=50, help="forward + backward passes per timed step")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--write", type=Path, help="markdown file whose section gets the table (e.g. BENCHMARKS.md)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for tokens, features in SHAPES:
        for dropout in (0.0, 0.05):
            modules = layers(features, args.rank, dropout)
            x = torch.randn(tokens, features, requires_grad=True)
            grad = torch.randn(tokens, features)
            times = time_interleaved({name: step(m, x, grad, args.calls) for name, m in modules.items()},
                                     args.repeats, args.warmup)
            per_call = {name: statistics.median(t) / args.calls * 1e6 for name, t in times.items()}
            rows.append(
                f"| {tokens} x {features} | {dropout:g} | {per_call['base']:.0f} | {per_call['PEFT']:.0f} "
                f"(+{per_call['PEFT'] - per_call['base']:.0f}) | {per_call['d9d']:.0f} "
                f"(+{per_call['d9d'] - per_call['base']:.0f}) | {per_call['PEFT'] / per_call['d9d']:.2f}x |")

    header = (
        f"{machine(torch.device('cpu'))}; float32, r = {args.rank}, square W, forward + backward with W frozen and x "
        f"requiring grad ({torch.get_num_threads()} threads, torch {torch.__version__}); median over {args.repeats} "
        f"interleaved repeats of {args.calls} calls each. Microseconds per call; in brackets, what the LoRA layer "
        "adds over the base layer."
    )
    table = "\n".join([
        header, "",
        "| x | dropout | base linear (us) | PEFT (us) | d9d (us) | d9d speed / PEFT |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *rows,
    ])
    print(table)
    if args.write:
        heading = cpu_section("LoRA layer per call, small inputs", torch.backends.cpu.get_cpu_capability())
        write_section(args.write, heading, command_line("scripts/bench_call_overhead.py"), table)
        print(f"\nwrote the table to {args.write}")


if __name__ == "__main__":
    main()
