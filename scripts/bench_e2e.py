"""Whole-model LoRA training steps: d9d against Hugging Face PEFT and the frozen model without adapters.

A transformers ``LlamaForCausalLM`` (built from a config, nothing downloaded) gets LoRA on all seven projections
(q, k, v, o, gate, up, down), once through PEFT's ``get_peft_model`` and once through d9d, with the same base and
adapter weights. Each step is forward (causal LM loss) + backward. The variants
  frozen:  the model without adapters, every parameter frozen (the floor),
  peft:    PEFT's LoRA, at each dropout rate,
  d9d:     d9d's LoRA (the fused ops), at each dropout rate,
run interleaved, every variant once per repeat in a shuffled order; ratios are the median over repeats of the
ratio within the same repeat, with the smallest and largest ratio as the spread. Each timed step comes right after
an untimed step of the same variant (``--lead-in``), so that it starts from the heap that its own previous step
left, as in training, rather than from another variant's. The bytes that autograd saves for
backward (``saved_tensors_hooks``, parameters excluded) are counted on one extra step, and the page faults of each
timed step too.

On the CPU the memory allocator matters as much as the kernels. With glibc's malloc, every large tensor comes as
fresh pages on every step: 200 to 330 thousand page faults per float32 step here, a sizeable share of the step and
of the run-to-run noise (without the lead-in, more or fewer depending on the variant that ran before). tcmalloc
keeps its pages, so a step faults about a thousand times. The table names the allocator, and ``--write``
keeps a section per CPU and allocator (Debian's libtcmalloc-minimal4 has it):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python scripts/bench_e2e.py

    python scripts/bench_e2e.py                               # fp32 and bf16, 2 threads, 5 repeats
    python scripts/bench_e2e.py --dtypes float32 --repeats 3  # cheaper
    python scripts/bench_e2e.py --write BENCHMARKS.md         # also replace the table in that file
    python scripts/bench_e2e.py --device cuda --threads 0 --tokens 8192
"""

import argparse
import re
import statistics
from pathlib import Path

import torch
from bench_common import (
    SavedBytes,
    command_line,
    cpu_capabilities,
    cpu_model,
    cpu_section,
    memory_allocator,
    mib,
    minor_page_faults,
    paired_ratios,
    time_interleaved,
    write_section,
)
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from d9d.peft import inject_peft_and_freeze
from d9d.peft.all import peft_method_from_config
from d9d.peft.lora import LoRAConfig, LoRAParameters
from d9d.peft.lora.layer import LoRALinear

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_model(args: argparse.Namespace, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()


def clone_of(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A model that shares every base tensor with ``model`` (the weights are frozen, so one copy serves all)."""
    twin = LlamaForCausalLM(model.config).to(device=model.device, dtype=model.dtype)
    twin.load_state_dict(model.state_dict(), assign=True)
    twin.requires_grad_(False)
    # Gradients flow down to the embeddings' output in every variant alike (the frozen one has nothing else).
    twin.enable_input_require_grads()
    return twin


def peft_variant(model: LlamaForCausalLM, args: argparse.Namespace, dropout: float) -> torch.nn.Module:
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=dropout, target_modules=PROJECTIONS)
    return get_peft_model(clone_of(model), config)


def d9d_variant(model: LlamaForCausalLM, args: argparse.Namespace, dropout: float, peft_model) -> torch.nn.Module:
    twin = clone_of(model)
    # PEFT keeps adapters in float32 on a 16-bit base (autocast_adapter_dtype); d9d gets the same.
    params = LoRAParameters(r=args.rank, alpha=args.alpha, dropout=dropout, dtype="float32")
    pattern = re.compile(rf".*\.({'|'.join(PROJECTIONS)})")
    inject_peft_and_freeze(peft_method_from_config(LoRAConfig(module_name_pattern=pattern, params=params)), twin)
    twin.enable_input_require_grads()
    # The same adapter weights as PEFT's, with B non-zero so that the adapters act.
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A")
    }
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in twin.named_modules():
            if isinstance(layer, LoRALinear):
                source = peft_layers[name]
                source.lora_B["default"].weight.copy_(
                    torch.randn(source.lora_B["default"].weight.shape, generator=generator) * 0.01
                )
                layer.lora_A.copy_(source.lora_A["default"].weight)
                layer.lora_B.copy_(source.lora_B["default"].weight)
    return twin


class Step:
    """One forward + backward of a variant on a fixed batch."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor) -> None:
        self.model = model.train()
        self.input_ids = input_ids
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.page_faults: list[int] = []  # per call

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.input_ids, labels=self.input_ids).loss

    def __call__(self) -> None:
        before = minor_page_faults()
        self.loss().backward()
        for p in self.trainable:
            p.grad = None
        self.page_faults.append(minor_page_faults() - before)

    def saved_bytes(self) -> int:
        with SavedBytes(exclude=self.model.parameters()) as saved:
            loss = self.loss()
        loss.backward()
        for p in self.trainable:
            p.grad = None
        return saved.nbytes


def check_same_outputs(steps: dict[str, Step], dropouts: list[float]) -> float:
    """Largest relative difference of the eval-mode logits of PEFT and d9d (dropout off): the same model."""
    worst = 0.0
    with torch.no_grad():
        for p in dropouts:
            outputs = []
            for name in (f"peft {p:g}", f"d9d {p:g}"):
                model = steps[name].model.eval()
                outputs.append(model(input_ids=steps[name].input_ids[:, :64]).logits.float())
                model.train()
            worst = max(worst, ((outputs[0] - outputs[1]).abs().max() / outputs[0].abs().max()).item())
    return worst


def run(args: argparse.Namespace, dtype_name: str) -> str:
    dtype = DTYPES[dtype_name]
    model = base_model(args, dtype)
    dropouts = [0.0, args.dropout]
    torch.manual_seed(2)
    input_ids = torch.randint(0, args.vocab, (args.tokens // args.seq, args.seq), device=args.device)
    steps = {"frozen": Step(clone_of(model), input_ids)}
    for p in dropouts:
        peft_model = peft_variant(model, args, p)
        steps[f"d9d {p:g}"] = Step(d9d_variant(model, args, p, peft_model), input_ids)
        steps[f"peft {p:g}"] = Step(peft_model, input_ids)
    difference = check_same_outputs(steps, dropouts)
    saved = {name: step.saved_bytes() for name, step in steps.items()}
    times = time_interleaved(steps, args.repeats, args.warmup, device=args.device, lead_in=args.lead_in)

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        """Speed of a over b: median, min and max over repeats of b's time / a's time in the same repeat."""
        ratios = paired_ratios(times[b], times[a])
        return statistics.median(ratios), min(ratios), max(ratios)

    def fmt(r: tuple[float, float, float]) -> str:
        return f"{r[0]:.3f}x ({r[1]:.2f} to {r[2]:.2f})"

    def faults(name: str) -> str:
        """Median page faults of the timed steps (4 KiB each on x86-64 Linux)."""
        timed = steps[name].page_faults[args.warmup :][args.lead_in :: args.lead_in + 1]  # each after its lead-in
        return f"{statistics.median(timed):,.0f}"

    frozen_tps = args.tokens / statistics.median(times["frozen"])
    untimed = "an untimed step" if args.lead_in == 1 else f"{args.lead_in} untimed steps"
    lead_in = f", each timed step right after {untimed} of the same variant" if args.lead_in else ""
    lines = [
        f"### {dtype_name}",
        "",
        f"{args.device}, {dtype_name}, {cpu_model() if args.device == 'cpu' else torch.cuda.get_device_name()}, "
        f"{cpu_capabilities()}, {memory_allocator()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. LlamaForCausalLM: hidden {args.hidden}, "
        f"{args.layers} layers, intermediate {args.intermediate}, {args.heads} heads, vocab {args.vocab}; "
        f"{args.tokens} tokens per step ({args.tokens // args.seq} x {args.seq}); LoRA r = {args.rank}, alpha = "
        f"{args.alpha:g} on {', '.join(PROJECTIONS)} (float32 adapters). {args.repeats} repeats after {args.warmup} "
        f"warm-up step(s), every variant once per repeat in a shuffled order{lead_in}; ratios are medians of "
        f"per-repeat ratios (smallest to largest in parentheses). PEFT and d9d eval-mode logits differ by at most "
        f"{difference:.1e} of their largest magnitude (same weights).",
        "",
        "| dropout | variant | tokens/s | speed vs PEFT | speed vs frozen | saved for backward "
        "| page faults per step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| - | frozen (no adapters) | {frozen_tps:.0f} | - | 1 | {mib(saved['frozen'], digits=0, smallest='MiB')} | "
        f"{faults('frozen')} |",
    ]
    verdicts = []
    for p in dropouts:
        for variant in ("peft", "d9d"):
            name = f"{variant} {p:g}"
            tps = args.tokens / statistics.median(times[name])
            vs_peft = fmt(ratio(name, f"peft {p:g}")) if variant == "d9d" else "1"
            lines.append(
                f"| {p:g} | {variant} | {tps:.0f} | {vs_peft} | {fmt(ratio(name, 'frozen'))} | "
                f"{mib(saved[name], digits=0, smallest='MiB')} | {faults(name)} |"
            )
        target = 1.3 if p > 0 else 1.1
        vs_peft, vs_frozen = ratio(f"d9d {p:g}", f"peft {p:g}")[0], ratio(f"d9d {p:g}", "frozen")[0]
        verdicts.append(
            f"dropout {p:g}: d9d >= {target}x PEFT: {'met' if vs_peft >= target else 'NOT met'} ({vs_peft:.2f}x); "
            f"within 5% of frozen: {'met' if vs_frozen >= 0.95 else 'NOT met'} ({vs_frozen:.3f}x)"
        )
    lines += ["", f"Targets: {'; '.join(verdicts)}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step")
    parser.add_argument("--seq", type=int, default=512, help="sequence length (tokens / seq sequences per step)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--lead-in",
        type=int,
        default=1,
        help="untimed steps of a variant right before each timed one (0: time it right after another variant)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--write", type=Path, help="markdown file whose section gets the tables (e.g. BENCHMARKS.md)")
    args = parser.parse_args()
    if args.lead_in < 0:
        parser.error(f"--lead-in must be at least 0, got {args.lead_in}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = []
    for name in args.dtypes.split(","):
        tables.append(run(args, name))
        print(tables[-1] + "\n", flush=True)  # each table as soon as it is measured
    body = "\n\n".join(tables)
    if args.write:
        heading = cpu_section("Whole model") if args.device == "cpu" else "## Whole model (GPU)"
        write_section(args.write, heading, command_line("scripts/bench_e2e.py"), body)


if __name__ == "__main__":
    main()
