"""Peak memory per rank and merge communication: d9d's streaming load / shard-local merge / streaming export
versus gathering the full state dict on rank 0 (what other libraries do).

One command: ``python scripts/bench_dist.py`` writes a checkpoint, launches ``torchrun`` (world size 2, gloo on
the CPU) once per approach, and prints a markdown table. Each phase's peak is the largest resident set size
(VmRSS, sampled every 2 ms in a thread) during that phase, minus the rank's resident size before the model was
built (interpreter, torch, process group); freed memory is returned to the OS (``malloc_trim``) between phases.
"""

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

LAYERS, DIM, RANK_R = 12, 2048, 16
SHARD_GB = DIM * DIM * 4 / 1e9  # one weight per file, so load and export go one layer at a time


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o_proj(torch.tanh(self.q_proj(x)))


class BenchModel(nn.Module):
    def __init__(self, layers: int = LAYERS, dim: int = DIM):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def model_bytes() -> int:
    return LAYERS * 2 * DIM * DIM * 4


def peft_method():
    from d9d.peft.lora import LoRA, LoRAConfig, LoRAParameters

    return LoRA(LoRAConfig(module_name_pattern=re.compile(r"layers\.\d+\.(q|o)_proj"),
                           params=LoRAParameters(r=RANK_R, alpha=2 * RANK_R)))


class PeakRss:
    """Samples VmRSS in a background thread; ``phase()`` resets the peak."""

    def __init__(self):
        self.peak = self.baseline = self.now()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def phase(self) -> None:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.peak = self.now()

    def result(self) -> int:
        self.peak = max(self.peak, self.now())
        return self.peak - self.baseline

    def stop(self) -> None:
        self._stop = True
        self._thread.join()


class CommBytes:
    """Bytes this rank receives through the functional collectives that DTensor uses (``full_tensor``, and the
    redistributions its sharding rules ask for), counted by wrapping them for the duration of the block."""

    _GATHERS = ("all_gather_tensor", "all_gather_single")
    _OTHERS = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single", "broadcast")

    def __init__(self):
        self.received = 0
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str, gather: bool):
        original = getattr(funcol, name, None)
        if original is None:  # not in this torch version
            return

        def counted(tensor, *args, **kwargs):
            out = original(tensor, *args, **kwargs)
            own = tensor.numel() * tensor.element_size() if gather else 0
            self.received += out.numel() * out.element_size() - own
            return out

        self._saved[name] = original
        setattr(funcol, name, counted)

    def __enter__(self) -> "CommBytes":
        for name in self._GATHERS:
            self._wrap(name, gather=True)
        for name in self._OTHERS:
            self._wrap(name, gather=False)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(funcol, name, original)


def lora_a_bytes(model: nn.Module) -> int:
    from d9d.peft.lora import LoRALinear

    return sum(m.lora_A.numel() * m.lora_A.element_size() for m in model.modules() if isinstance(m, LoRALinear))


def build_sharded(mesh, layers: int = LAYERS, dim: int = DIM):
    from d9d.parallel import init_empty_parameters, materialize_model, shard_model
    from d9d.peft import inject_peft_and_freeze

    torch.manual_seed(0)
    with init_empty_parameters():
        model = BenchModel(layers, dim)
    method = peft_method()
    injection = inject_peft_and_freeze(method, model)
    shard_model(model, Block, mesh=mesh)
    materialize_model(model, "cpu")
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking adapters, so the merge does real work
        for p in model.parameters():
            if p.requires_grad:
                p.to_local().normal_(std=0.01)
    return model, method, injection


def run_d9d(ckpt: Path, out: Path, mesh, rss: PeakRss) -> dict:
    from d9d.model_state.io import checkpoint_mapper_for, load_model_state, save_model_state
    from d9d.peft import merge_peft

    result = {}
    rss.phase()
    model, method, injection = build_sharded(mesh)
    result["build"] = rss.result()
    rss.phase()
    load_model_state(ckpt, checkpoint_mapper_for(model, injection), "cpu", model, show_progress=False)
    result["load"] = rss.result()
    a_bytes = lora_a_bytes(model)
    rss.phase()
    with CommBytes() as comm:
        merge_peft(method, model)
    result["merge"] = rss.result()
    result["merge_comm"], result["a_bytes"] = comm.received, a_bytes
    rss.phase()
    save_model_state(out, None, model, shard_size_gb=SHARD_GB, show_progress=False)
    result["export"] = rss.result()
    return result


def run_gather(ckpt: Path, out: Path, mesh, rss: PeakRss) -> dict:
    """Rank 0 holds the full state dict: load it and broadcast; gather it back to merge and save."""
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from d9d.model_state.io import INDEX_FILE
    from d9d.peft.lora import LoRALinear

    rank = dist.get_rank()
    result = {}
    rss.phase()
    model, _, _ = build_sharded(mesh)
    result["build"] = rss.result()
    rss.phase()
    full = {}
    if rank == 0:
        for f in sorted(ckpt.glob("*.safetensors")):
            full.update(load_file(f))
        full = {re.sub(r"(q|o)_proj\.weight$", r"\1_proj.base.weight", k): v for k, v in full.items()}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, full, options=options)
    del full
    result["load"] = rss.result()
    a_bytes = lora_a_bytes(model)
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    rss.phase()
    with CommBytes() as comm:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            for n in names:
                w = state.pop(f"{n}.base.weight")
                w.addmm_(state.pop(f"{n}.lora_B"), state.pop(f"{n}.lora_A"), alpha=2.0)
                state[f"{n}.weight"] = w
    result["merge"] = rss.result()
    result["merge_comm"], result["a_bytes"] = comm.received, a_bytes
    rss.phase()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        files, current, size = [], {}, 0
        for k in sorted(state):
            nbytes = state[k].numel() * 4
            if current and size + nbytes > SHARD_GB * 1e9:
                files.append(current)
                current, size = {}, 0
            current[k], size = state[k], size + nbytes
        files.append(current)
        weight_map = {}
        for i, part in enumerate(files):
            name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            save_file(part, out / name)
            weight_map.update(dict.fromkeys(part, name))
        (out / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    del state
    dist.barrier()
    result["export"] = rss.result()
    return result


def worker(args: argparse.Namespace) -> None:
    from d9d.parallel import init_distributed

    mesh = init_distributed(timeout=timedelta(minutes=5))
    warm, _, _ = build_sharded(mesh, layers=1, dim=64)  # lazy imports and caches, outside the measurement
    warm.layers[0].q_proj.base.weight.full_tensor()
    del warm
    rss = PeakRss()
    run = run_d9d if args.approach == "d9d" else run_gather
    result = run(Path(args.ckpt), Path(args.out), mesh, rss)
    rss.stop()
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(results))
    dist.destroy_process_group()


# A fixed glibc mmap threshold returns every freed large buffer to the OS, so RSS shows live memory only
# (glibc's adaptive threshold otherwise keeps freed 16 MiB buffers in the heap).
_WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}


def mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    from d9d.model_state.io import save_model_state
    from d9d.parallel import find_free_port

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        torch.manual_seed(0)
        save_model_state(tmp / "ckpt", None, BenchModel(), shard_size_gb=SHARD_GB, show_progress=False)
        rows = {}
        for approach in ("d9d", "gather"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                   f"--master-port={find_free_port()}", __file__, "--worker", "--approach", approach,
                   "--ckpt", str(tmp / "ckpt"), "--out", str(tmp / f"out-{approach}"),
                   "--result", str(tmp / f"{approach}.json")]
            subprocess.run(cmd, check=True, timeout=900, env=_WORKER_ENV)
            rows[approach] = json.loads((tmp / f"{approach}.json").read_text())

    layer = 2 * DIM * DIM * 4
    target = model_bytes() // 2 + layer
    print(f"Model: {LAYERS} blocks x 2 Linear({DIM}, {DIM}) fp32 = {mb(model_bytes())} MiB; largest layer (block) "
          f"{mb(layer)} MiB; LoRA r={RANK_R} on every linear; world size 2 (gloo, CPU); checkpoint and export "
          "files of one weight (16 MiB).")
    print(f"Target per rank: model/2 + largest layer = {mb(target)} MiB.\n")
    print("| approach | rank | sharded model (MiB) | peak load (MiB) | peak merge (MiB) | peak export (MiB) "
          "| merge: received from other ranks (MiB) | A matrices, full (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for approach, per_rank in rows.items():
        label = "d9d (stream, shard-local merge)" if approach == "d9d" else "full state dict on rank 0"
        for rank, r in enumerate(per_rank):
            print(f"| {label} | {rank} | {mb(r['build'])} | {mb(r['load'])} | {mb(r['merge'])} | {mb(r['export'])} "
                  f"| {mb(r['merge_comm'])} | {mb(r['a_bytes'])} |")
    d9d_peak = max(max(r["load"], r["merge"], r["export"]) for r in rows["d9d"])
    d9d_comm = max(r["merge_comm"] for r in rows["d9d"])
    print(f"\nd9d: worst rank peak {mb(d9d_peak)} MiB vs target {mb(target)} MiB -> "
          f"{'met' if d9d_peak < target else 'NOT met'}; merge received {mb(d9d_comm)} MiB vs A matrices "
          f"{mb(rows['d9d'][0]['a_bytes'])} MiB -> {'met' if d9d_comm <= rows['d9d'][0]['a_bytes'] else 'NOT met'}.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--approach", choices=["d9d", "gather"])
    parser.add_argument("--ckpt")
    parser.add_argument("--out")
    parser.add_argument("--result")
    parsed = parser.parse_args()
    worker(parsed) if parsed.worker else main()
