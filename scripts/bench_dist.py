"""Checkpoint I/O at scale, per rank: bytes read by the load, peak memory during load, merge and export.

One command: ``python scripts/bench_dist.py`` writes a checkpoint and launches ``torchrun`` (gloo on the CPU) for

- every layout (1-D FSDP, HSDP ``dp_replicate x dp_shard``, TP x FSDP ``dp x tp`` with the TP placements built
  by hand) at world sizes 1, 2 and 4, through d9d's load (each rank reads its slices), shard-local merge and
  export (each file gathered onto its writer, a file per rank per round);
- side by side at world size 2, 1-D: d9d against gathering the full state dict on rank 0 (what other libraries
  do);

and prints markdown tables. Bytes read are what the loader requested from the files (exact, ``LoadStats``). Each
phase's peak is the largest resident set size (VmRSS, sampled every 2 ms in a thread) during that phase, minus
the rank's resident size before the model was built (interpreter, torch, process group); freed memory is
returned to the OS (``malloc_trim``) between phases.
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

LAYERS, RANK_R = 12, 16
DIM = int(os.environ.get("D9D_BENCH_DIM", "2048"))  # smaller for a quick smoke run of the script
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


def layout_mesh(layout: str):
    """The mesh of ``layout`` over every rank: 1-D; ``(dp_replicate, dp_shard)``; ``(dp, tp)`` with tp = 2."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if layout == "fsdp" or world == 1:
        return init_device_mesh("cpu", (world,))
    if layout == "hsdp":
        return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))


def tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """TP by hand, weights only (what I/O needs): q_proj column-wise (W, B by rows), o_proj row-wise (W, A by
    columns); the other adapter replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def place(module: nn.Module, name: str, placement) -> None:
        setattr(module, name, nn.Parameter(distribute_tensor(getattr(module, name).detach(), tp_mesh, [placement]),
                                           requires_grad=getattr(module, name).requires_grad))

    for block in model.layers:
        place(block.q_proj.base, "weight", Shard(0))
        place(block.q_proj, "lora_B", Shard(0))
        place(block.q_proj, "lora_A", Replicate())
        place(block.o_proj.base, "weight", Shard(1))
        place(block.o_proj, "lora_A", Shard(1))
        place(block.o_proj, "lora_B", Replicate())


def build_sharded(mesh, layers: int = LAYERS, dim: int = DIM, layout: str = "fsdp"):
    from d9d.parallel import init_empty_parameters, materialize_model, shard_model
    from d9d.peft import inject_peft_and_freeze

    torch.manual_seed(0)
    with init_empty_parameters():
        model = BenchModel(layers, dim)
    method = peft_method()
    injection = inject_peft_and_freeze(method, model)
    if layout == "tp_fsdp" and mesh.ndim == 2:
        tensor_parallel(model, mesh["tp"])
        mesh = mesh["dp"]
    shard_model(model, Block, mesh=mesh)
    materialize_model(model, "cpu")
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking adapters, so the merge does real work
        for p in model.parameters():
            if p.requires_grad:
                p.to_local().normal_(std=0.01)
    return model, method, injection


def own_shard_bytes(model: nn.Module) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def run_d9d(ckpt: Path, out: Path, mesh, rss: PeakRss, layout: str) -> dict:
    from d9d.model_state.io import checkpoint_mapper_for, load_model_state, save_model_state
    from d9d.peft import merge_peft

    result = {}
    rss.phase()
    model, method, injection = build_sharded(mesh, layout=layout)
    result["build"] = rss.result()
    result["shards"] = own_shard_bytes(model)
    result["placements"] = str(model.layers[0].q_proj.base.weight.placements)
    rss.phase()
    stats = load_model_state(ckpt, checkpoint_mapper_for(model, injection), "cpu", model, show_progress=False)
    result["load"] = rss.result()
    result["bytes_read"], result["checkpoint_bytes"] = stats.bytes_read, stats.checkpoint_bytes
    a_bytes = lora_a_bytes(model)
    rss.phase()
    try:
        with CommBytes() as comm:
            merge_peft(method, model)
        result["merge"] = rss.result()
        result["merge_comm"], result["a_bytes"] = comm.received, a_bytes
    except Exception as e:  # TP x FSDP merges need the sharding rules of the TP work; the export still runs
        result["merge"] = result["merge_comm"] = None
        result["merge_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        result["a_bytes"] = a_bytes
    dist.barrier()
    rss.phase()
    save_model_state(out, None, model, shard_size_gb=SHARD_GB, show_progress=False)
    result["export"] = rss.result()
    return result


def run_gather(ckpt: Path, out: Path, mesh, rss: PeakRss, layout: str) -> dict:
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
    result["bytes_read"] = 0
    if rank == 0:
        for f in sorted(ckpt.glob("*.safetensors")):
            full.update(load_file(f))
        result["bytes_read"] = sum(v.nbytes for v in full.values())
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

    init_distributed(timeout=timedelta(minutes=10))
    mesh = layout_mesh(args.layout)
    warm, _, _ = build_sharded(mesh, layers=1, dim=64, layout=args.layout)  # imports and caches, unmeasured
    warm.layers[0].q_proj.base.weight.full_tensor()
    del warm
    rss = PeakRss()
    run = run_d9d if args.approach == "d9d" else run_gather
    result = run(Path(args.ckpt), Path(args.out), mesh, rss, args.layout)
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


RUNS = [("d9d", "fsdp", 1), ("d9d", "fsdp", 2), ("d9d", "hsdp", 2), ("d9d", "tp_fsdp", 2), ("d9d", "fsdp", 4),
        ("d9d", "hsdp", 4), ("d9d", "tp_fsdp", 4), ("gather", "fsdp", 2)]
MESHES = {"fsdp": "{w}", "hsdp": "2 x {h} (dp_replicate x dp_shard)", "tp_fsdp": "{h} x 2 (dp x tp)"}


def main(args: argparse.Namespace) -> None:
    from d9d.model_state.io import save_model_state
    from d9d.parallel import find_free_port

    runs = [r for r in RUNS if r[2] in args.worlds and r[1] in args.layouts]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        torch.manual_seed(0)
        save_model_state(tmp / "ckpt", None, BenchModel(), shard_size_gb=SHARD_GB, show_progress=False)
        rows = {}
        for approach, layout, world in runs:
            tag = f"{approach}-{layout}-{world}"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                   "--master-addr=127.0.0.1", f"--master-port={find_free_port()}", __file__, "--worker",
                   "--approach", approach, "--layout", layout, "--ckpt", str(tmp / "ckpt"),
                   "--out", str(tmp / f"out-{tag}"), "--result", str(tmp / f"{tag}.json")]
            subprocess.run(cmd, check=True, timeout=1800, env=_WORKER_ENV)
            rows[(approach, layout, world)] = json.loads((tmp / f"{tag}.json").read_text())
    report(rows)


def report(rows: dict) -> None:
    weight = DIM * DIM * 4
    ckpt = model_bytes()
    print(f"Model: {LAYERS} blocks x 2 Linear({DIM}, {DIM}) fp32 = {mb(ckpt)} MiB; largest tensor {mb(weight)} MiB; "
          f"LoRA r={RANK_R} on every linear; checkpoint and export files of one weight ({mb(weight)} MiB), so one "
          "file = one group = one weight. gloo on the CPU.\n")
    print("| layout | world | mesh | rank | q_proj placements | read (MiB) | read / checkpoint | own shards (MiB) "
          "| peak load (MiB) | peak merge (MiB) | peak export (MiB) | export target (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for (approach, layout, world), per_rank in rows.items():
        if approach != "d9d":
            continue
        mesh = MESHES[layout if world > 1 else "fsdp"].format(w=world, h=max(world // 2, 1))
        target = ckpt // world + 2 * weight  # model / world + one file + one group
        for rank, r in enumerate(per_rank):
            merge = "n/a" if r["merge"] is None else mb(r["merge"])
            print(f"| {layout} | {world} | {mesh} | {rank} | `{r['placements']}` | {mb(r['bytes_read'])} | "
                  f"{r['bytes_read'] / r['checkpoint_bytes']:.3f} | {mb(r['shards'])} | {mb(r['load'])} | {merge} "
                  f"| {mb(r['export'])} | {mb(target)} |")
        export_peak = max(r["export"] for r in per_rank)
        own_target = max(r["shards"] for r in per_rank) + 2 * weight
        verdicts.append(f"- {layout}, world {world}: worst export peak {mb(export_peak)} MiB vs model/world + file "
                        f"+ group = {mb(target)} MiB -> {'met' if export_peak <= target else 'NOT met'}; vs own "
                        f"shards + file + group = {mb(own_target)} MiB -> "
                        f"{'met' if export_peak <= own_target else 'NOT met'}.")
        if layout == "fsdp" and world == 4:
            worst = max(r["bytes_read"] for r in per_rank)
            bound = ckpt / 4 + weight
            verdicts.append(f"- fsdp, world 4: worst bytes read {mb(worst)} MiB vs checkpoint/4 + largest tensor = "
                            f"{mb(bound)} MiB -> {'met' if worst <= bound else 'NOT met'}.")
        errors = {r.get("merge_error") for r in per_rank} - {None}
        if errors:
            verdicts.append(f"- {layout}, world {world}: merge not measured: {sorted(errors)[0]}")
    print("\n" + "\n".join(verdicts))
    if ("gather", "fsdp", 2) in rows and ("d9d", "fsdp", 2) in rows:
        print("\nSide by side at world size 2, 1-D:\n")
        print("| approach | rank | read (MiB) | peak load (MiB) | peak merge (MiB) | peak export (MiB) "
              "| merge: received from other ranks (MiB) | A matrices, full (MiB) |")
        print("|---|---|---|---|---|---|---|---|")
        for approach in ("d9d", "gather"):
            label = "d9d (slices, shard-local merge, export by writer)" if approach == "d9d" else \
                "full state dict on rank 0"
            for rank, r in enumerate(rows[(approach, "fsdp", 2)]):
                print(f"| {label} | {rank} | {mb(r['bytes_read'])} | {mb(r['load'])} | {mb(r['merge'])} "
                      f"| {mb(r['export'])} | {mb(r['merge_comm'])} | {mb(r['a_bytes'])} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--approach", choices=["d9d", "gather"])
    parser.add_argument("--layout", choices=["fsdp", "hsdp", "tp_fsdp"], default="fsdp")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="world sizes to run")
    parser.add_argument("--layouts", nargs="+", default=["fsdp", "hsdp", "tp_fsdp"], help="layouts to run")
    parser.add_argument("--ckpt")
    parser.add_argument("--out")
    parser.add_argument("--result")
    parsed = parser.parse_args()
    worker(parsed) if parsed.worker else main(parsed)
