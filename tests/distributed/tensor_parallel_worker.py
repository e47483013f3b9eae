"""Worker for ``test_tensor_parallel.py``: one ``LoRALinear`` under tensor parallelism on two ranks, against an
independent float64 re-computation with the same dropout masks; then the shard-local merge."""

import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import parallelize_module

from d9d.ops import lora_linear
from d9d.ops._registration import draw_seed
from d9d.ops.lora import dropout_mask
from d9d.ops.sharding import tensor_parallel_seed
from d9d.parallel.tensor_parallel import LoRAColwiseParallel, LoRARowwiseParallel
from d9d.peft.lora import LoRALinear, LoRAParameters

IN, OUT, R, P, SCALE = 8, 6, 3, 0.4, 2.0


def gather_last(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-1)


def run(style_name: str, mesh, dropout: float) -> dict:
    torch.manual_seed(0)  # same weights, input and seeds on every rank
    base = nn.Linear(IN, OUT, bias=True, dtype=torch.float64)
    layer = LoRALinear(base, LoRAParameters(r=R, alpha=R * SCALE, dropout=dropout))  # dtype: the base's
    with torch.no_grad():
        layer.lora_B.normal_()  # a fresh B is zero: make the LoRA term count
    W, b, A, B = (t.detach().clone() for t in (base.weight, base.bias, layer.lora_A, layer.lora_B))
    x_full = torch.randn(2, 5, IN, dtype=torch.float64)
    grad_full = torch.randn(2, 5, OUT, dtype=torch.float64)
    rank, world = dist.get_rank(), dist.get_world_size()
    colwise = style_name == "colwise"
    parallelize_module(layer, mesh, LoRAColwiseParallel() if colwise else LoRARowwiseParallel())
    x = (x_full if colwise else x_full.chunk(world, dim=-1)[rank]).clone().requires_grad_()

    torch.manual_seed(7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)  # colwise: this rank's output columns; rowwise: the whole (reduced) output
        (y * (grad_full.chunk(world, dim=-1)[rank] if colwise else grad_full)).sum().backward()
    implicit = [str(w.message) for w in caught if "implicitly" in str(w.message)]

    # The masks the kernels drew: the same seed (drawn first in the forward), offset per column slice.
    torch.manual_seed(7)
    seed = draw_seed()
    x_dt = DTensor.from_local(x.detach(), mesh, [torch.distributed.tensor.Replicate() if colwise else Shard(-1)],
                              run_check=False)
    local_seed = tensor_parallel_seed(x_dt, seed).to_local() if dropout > 0 else seed
    local_mask = dropout_mask(x.detach(), dropout, local_seed).to(torch.float64)
    mask = local_mask if colwise else gather_last(local_mask)
    masks = [torch.empty_like(local_mask) for _ in range(world)]
    dist.all_gather(masks, local_mask)

    # Independent float64 re-computation with autograd on the whole tensors.
    xr = x_full.clone().requires_grad_()
    Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()
    keep = mask / (1 - dropout)
    ref = xr @ W.T + b + SCALE * ((xr * keep) @ Ar.T) @ Br.T
    (ref * grad_full).sum().backward()

    y_full = gather_last(y.detach()) if colwise else y.detach()
    dx = x.grad if colwise else gather_last(x.grad)
    out = {
        "y": (y_full - ref.detach()).abs().max().item(),
        "dx": (dx - xr.grad).abs().max().item(),
        "dA": (layer.lora_A.grad.full_tensor() - Ar.grad).abs().max().item(),
        "dB": (layer.lora_B.grad.full_tensor() - Br.grad).abs().max().item(),
        "keep_fraction": mask.mean().item(),
        "masks_equal_across_ranks": bool(torch.equal(masks[0], masks[1])),
        "implicit_replication_warnings": implicit,
        "placements": {n: str(p.placements) for n, p in layer.named_parameters()},
    }
    layer.merge_into_base()
    out["merge"] = (layer.base.weight.full_tensor() - (W + SCALE * B @ A)).abs().max().item()
    out["merge_kept_placement"] = str(layer.base.weight.placements)
    return out


def bias_after_reduction(mesh) -> float:
    """Row-wise with a bias, through ``lora_linear`` on DTensors directly: the bias counts once."""
    torch.manual_seed(1)
    x, W, b = torch.randn(4, IN, dtype=torch.float64), torch.randn(OUT, IN, dtype=torch.float64), torch.randn(OUT,
                                                                                                                dtype=torch.float64)
    A, B = torch.randn(R, IN, dtype=torch.float64), torch.randn(OUT, R, dtype=torch.float64)
    from torch.distributed.tensor import Replicate, distribute_tensor

    y = lora_linear(distribute_tensor(x, mesh, [Shard(1)]), distribute_tensor(W, mesh, [Shard(1)]),
                    distribute_tensor(b, mesh, [Replicate()]), distribute_tensor(A, mesh, [Shard(1)]),
                    distribute_tensor(B, mesh, [Replicate()]), SCALE, 0.0, training=True)
    return (y.full_tensor() - (x @ W.T + b + SCALE * x @ A.T @ B.T)).abs().max().item()


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    results = {f"{style}_p{p}": run(style, mesh, p) for style in ("colwise", "rowwise") for p in (0.0, P)}
    results["rowwise_bias_direct"] = bias_after_reduction(mesh)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
