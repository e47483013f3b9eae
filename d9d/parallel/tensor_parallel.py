"""Tensor parallelism of injected models: ``ParallelStyle``s for adapter layers and a plan for Llama-shaped models.

Adapter layers (``LoRALinear``) declare how their parameters split through ``tensor_parallel_placements(style)``;
the styles here read that, so this module depends on no PEFT layer class.
"""

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

__all__ = ["LoRAColwiseParallel", "LoRARowwiseParallel", "apply_tensor_parallel", "tensor_parallel_plan"]

# Llama / Qwen / Mistral names (and d9d's demo models): the projections into heads and into the MLP split their
# output features, the projections back into the residual stream split their input features.
COLWISE_NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE_NAMES = ("o_proj", "down_proj")


def _placements(module: nn.Module, style: str) -> dict[str, Placement] | None:
    """The module's own tensor-parallel layout (adapter layers declare one), or None for a plain layer."""
    declared = getattr(module, "tensor_parallel_placements", None)
    return declared(style) if callable(declared) else None


def _partition_by(placements: dict[str, Placement], src_data_rank: int | None):
    """A ``distribute_module`` partition function that places the root module's parameters by qualified name."""

    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:  # called for every submodule: the root places them all
            return
        for qualified, placement in placements.items():
            owner_name, _, param_name = qualified.rpartition(".")
            owner = module.get_submodule(owner_name)
            param = owner._parameters.get(param_name)
            if param is None:  # a layer without bias
                continue
            dist = distribute_tensor(param.data, mesh, [placement], src_data_rank=src_data_rank)
            owner.register_parameter(param_name, nn.Parameter(dist, requires_grad=param.requires_grad))

    return partition


class LoRAColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` that also takes adapter layers (``LoRALinear``: ``W``, ``B`` and the bias split by rows,
    ``A`` replicated, as the layer's ``tensor_parallel_placements("colwise")`` says). The input is replicated, the
    output split on its last dim (a local tensor by default, as for ``ColwiseParallel``). Plain ``nn.Linear`` /
    ``nn.Embedding`` modules are handled by ``ColwiseParallel`` itself."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        placements = _placements(module, "colwise")
        if placements is None:
            return super()._apply(module, device_mesh)
        return distribute_module(
            module, device_mesh, _partition_by(placements, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class LoRARowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` that also takes adapter layers (``LoRALinear``: ``W`` and ``A`` split by columns, ``B``
    and the bias replicated, as the layer's ``tensor_parallel_placements("rowwise")`` says). The input is split on
    its last dim; the op's partial sums are reduced to a replicated output (the bias added once, after the
    reduction). Plain ``nn.Linear`` / ``nn.Embedding`` modules are handled by ``RowwiseParallel`` itself."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        placements = _placements(module, "rowwise")
        if placements is None:
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)  # RowwiseParallel sets it in _apply, per module type
        return distribute_module(
            module, device_mesh, _partition_by(placements, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


def tensor_parallel_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The tensor-parallel plan of a Llama-shaped model (Hugging Face Llama, Qwen2/3, Mistral; d9d's demo models).

    Attention and MLP projections split over the tp ranks (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``,
    ``up_proj`` column-wise; ``o_proj``, ``down_proj`` row-wise), whether injected with LoRA or plain linear layers
    (frozen or fully tuned). Attention then runs on each rank's heads, the MLP on its slice of the intermediate
    features; embeddings, norms and the LM head stay replicated over the tp ranks. The modules' forwards must size
    their head views from the tensor (``view(..., -1, head_dim)``), as Hugging Face's do.

    Raises:
        ValueError: If the model has none of these projections, or one of them is neither an ``nn.Linear`` nor an
            adapter layer that declares ``tensor_parallel_placements``; the message names it.
    """
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in COLWISE_NAMES + ROWWISE_NAMES:
            continue
        if not isinstance(module, nn.Linear) and _placements(module, "colwise") is None:
            raise ValueError(f"tensor_parallel_plan: {name!r} is a {type(module).__name__}; expected nn.Linear or "
                             "an adapter layer with tensor_parallel_placements (LoRALinear)")
        plan[name] = LoRAColwiseParallel() if leaf in COLWISE_NAMES else LoRARowwiseParallel()
    if not plan:
        raise ValueError(f"tensor_parallel_plan: {type(model).__name__} has no module named one of "
                         f"{COLWISE_NAMES + ROWWISE_NAMES}")
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh,
                          plan: dict[str, ParallelStyle] | None = None) -> nn.Module:
    """Parallelizes ``model`` over ``tp_mesh`` in place (after PEFT injection, before ``shard_model``).

    Call it on the ``meta``-device model or on real weights identical on every rank; then shard the result on the
    data-parallel mesh (``shard_model(model, blocks, mesh=parallel_mesh.dp)``), which is FSDP2 on top of tensor
    parallelism. Every rank of a tp group must see the same input batch and draw the same dropout seeds (seed
    torch's default generator identically on them).

    Args:
        model: The injected model.
        tp_mesh: The tensor-parallel mesh (``ParallelMesh.tp``).
        plan: Module name -> style; ``None`` uses :func:`tensor_parallel_plan`.

    Returns:
        ``model``.
    """
    if tp_mesh.size() == 1:
        return model
    return parallelize_module(model, tp_mesh, plan if plan is not None else tensor_parallel_plan(model))
