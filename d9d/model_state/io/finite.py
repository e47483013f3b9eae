"""Checking a model's state for NaN and Inf (after a load), with one verdict on every rank."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from d9d.model_state.io.model_keys import model_state


@torch.no_grad()
def check_finite(model: nn.Module) -> None:
    """Raises if any floating-point parameter or buffer of ``model`` holds a NaN or an Inf, naming the first one.

    Each rank checks its own shards (nothing is gathered). When a process group is initialized this is a
    collective (call it on every rank): one all-reduce of the first bad key's position gives every rank the same
    verdict and the same key, so no rank trains on while another stops.

    Raises:
        ValueError: Naming the first state key (in state-dict order) with a non-finite value.
    """
    state = model_state(model)
    keys = list(state)
    first = len(keys)
    for i, key in enumerate(keys):
        t = state[key]
        local = t.to_local() if isinstance(t, DTensor) else t
        if (local.is_floating_point() or local.is_complex()) and not torch.isfinite(local).all():
            first = i
            break
    if dist.is_initialized():
        nccl = dist.get_backend() == "nccl"  # NCCL reduces GPU tensors only
        verdict = torch.tensor([first], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
        first = int(verdict.item())
    if first < len(keys):
        raise ValueError(f"non-finite value (NaN or Inf) in {keys[first]!r}; the checkpoint or the load is broken")
