"""Gradient-norm clipping over parameters that live on different device meshes (tensor parallelism + FSDP2)."""

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from d9d.dtensor import full_tensor

__all__ = ["clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for parameters on several meshes; returns the total norm.

    Under tensor parallelism with FSDP2, the split projections' gradients are DTensors on the ``(dp, tp)`` mesh
    while those of replicated modules (norms) are on the ``dp`` mesh alone, and torch's version refuses to combine
    DTensors of different meshes. Here each mesh's gradients give their global norm (a collective on that mesh),
    the norms combine as plain numbers, and each group is scaled on its own. Every rank gets the same total.

    Args:
        parameters: The parameters whose ``.grad`` to clip (those without a gradient are skipped).
        max_norm: The largest total 2-norm.
        foreach: Passed to torch's per-group functions.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    norms = [full_tensor(torch.nn.utils.get_total_norm([p.grad for p in ps], foreach=foreach)).float()
             for ps in groups.values()]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    for ps in groups.values():
        torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total, foreach=foreach)
    return total
