"""Benchmarks expert LoRA on one Mixture-of-Experts layer, side by side: the frozen base, d9d, and PEFT.

One transformers v5 ``Qwen3MoeExperts`` layer (E experts, top-k routing, float32, CPU), forward + backward with the
expert weights frozen and the hidden states requiring grad:
  base:  the frozen experts module alone (``_experts_implementation`` as given, default ``grouped_mm``),
  d9d:   ``LoRAExperts`` (per-expert A_e, B_e on both projections; grouped LoRA ops),
  peft:  PEFT's ``target_parameters`` (``lora.ParamWrapper``: it folds B_e A_e into a copy of the weights).
The variants are interleaved so that machine noise hits them alike; the table gives medians and the overhead over
base. It also reports the bytes autograd saves for backward (parameters excluded) and the largest single tensor
allocated (views excluded) against the size of one E x out x in weight.

    python scripts/bench_experts.py
    python scripts/bench_experts.py --write BENCHMARKS.md    # also replace the table in that file
"""

import argparse
import functools
import os
import random
import statistics
import sys
from pathlib import Path

import torch
from bench_common import SavedBytes, cpu_model, mib, paired_ratios, time_interleaved
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from d9d.peft.lora import LoRAExperts, LoRAParameters

BEGIN, END = "<!-- bench_experts begin -->", "<!-- bench_experts end -->"


class Holder(nn.Module):
    """What PEFT wraps: a module with an ``experts`` child (PEFT needs a model around the parameters)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts


def build(args: argparse.Namespace):
    import peft
    import transformers

    config = transformers.Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
                                         num_experts=args.experts, num_experts_per_tok=args.top_k)
    config._experts_implementation = args.implementation
    torch.manual_seed(0)

    def experts() -> nn.Module:
        torch.manual_seed(0)
        module = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
        nn.init.normal_(module.gate_up_proj, std=0.02)
        nn.init.normal_(module.down_proj, std=0.02)
        return module.requires_grad_(False)

    base = experts()
    ours = LoRAExperts(experts(), LoRAParameters(r=args.r, alpha=2 * args.r, dropout=args.dropout)).train()
    lora_config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=[],
                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    theirs = peft.get_peft_model(Holder(experts()), lora_config).base_model.model.experts.train()
    with torch.no_grad():  # the same non-zero adapters everywhere, so that no variant skips work
        for _name, p in ours.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.02)
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(std=0.02)
    x = torch.randn(args.tokens, args.hidden)
    logits = torch.randn(args.tokens, args.experts)
    top_k_weights, top_k_index = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
    return {"base": base, "d9d": ours, "peft": theirs}, x, top_k_index, top_k_weights


def step(module: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    module(x, index, weights).square().sum().backward()
    module.zero_grad(set_to_none=True)


def saved_bytes(module: nn.Module, x, index, weights) -> int:
    with SavedBytes(exclude=module.parameters()) as saved:
        step(module, x, index, weights)
    return saved.nbytes


class LargestAllocation(TorchDispatchMode):
    """The largest tensor any op creates (views, which allocate nothing, excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and not func.is_view and not func._schema.is_mutable:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def largest_allocation(module: nn.Module, x, index, weights) -> int:
    with LargestAllocation() as mode:
        step(module, x, index, weights)
    return mode.largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--implementation", default="grouped_mm", help="the base's _experts_implementation")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--write", type=Path, help="replace the table between the markers in this Markdown file")
    args = parser.parse_args()

    variants, x, index, weights = build(args)
    steps = {name: functools.partial(step, module, x, index, weights) for name, module in variants.items()}
    # One warm-up step each; the orders are drawn afresh on every run (an unseeded generator).
    times = time_interleaved(steps, args.repeats, warmup=1, order=random.Random())
    weight_bytes = args.experts * 2 * args.intermediate * args.hidden * 4  # gate_up_proj, E x out x in, float32
    base_median = statistics.median(times["base"])
    rows = []
    for name, module in variants.items():
        median = statistics.median(times[name])
        ratios = sorted(paired_ratios(times[name], times["base"]))
        quarter = len(ratios) // 4
        overhead = "-" if name == "base" else f"{median / base_median - 1:+.1%}"
        spread = "-" if name == "base" else f"{ratios[quarter] - 1:+.1%} to {ratios[-quarter - 1] - 1:+.1%}"
        largest = largest_allocation(module, x, index, weights)
        saved = mib(saved_bytes(module, x, index, weights), digits=2, smallest="MiB")
        rows.append(f"| {name} | {median * 1e3:.1f} | {overhead} | {spread} | {saved} | "
                    f"{mib(largest, digits=2, smallest='MiB')} "
                    f"({largest / weight_bytes:.2f}) |")
    table = "\n".join([
        f"E = {args.experts}, top-{args.top_k}, {args.tokens} tokens, hidden {args.hidden}, expert intermediate "
        f"{args.intermediate}, r = {args.r} per expert, dropout {args.dropout}, float32; base "
        f"`_experts_implementation = {args.implementation!r}`; {args.repeats} interleaved repeats. CPU: "
        f"{cpu_model(os.uname().machine)}, `get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}`, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| variant | median fwd+bwd (ms) | overhead over base | middle half of paired ratios | saved for backward "
        "(no parameters) | largest allocation (in units of one E x 2I x H weight) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])
    print(table)
    if args.write:
        text = args.write.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        args.write.write_text(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    sys.exit(main())
