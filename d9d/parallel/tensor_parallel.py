"""Tensor parallelism of injected models: ``ParallelStyle``s for ``LoRALinear`` and a plan for Llama-shaped models."""

from collections.abc import Callable
from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from d9d.peft.lora import LoRALinear

__all__ = ["LoRAColwiseParallel", "LoRARowwiseParallel", "apply_tensor_parallel", "tensor_parallel_plan"]

# Llama / Qwen / Mistral names (and d9d's demo models): the projections into heads and into the MLP split their
# output features, the projections back into the residual stream split their input features.
COLWISE_NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE_NAMES = ("o_proj", "down_proj")


def _distribute_params(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Placement],
                       src_data_rank: int | None) -> None:
    for name, placement in placements.items():
        param = module._parameters.get(name)
        if param is None:
            continue
        dist = distribute_tensor(param.data, mesh, [placement], src_data_rank=src_data_rank)
        module.register_parameter(name, nn.Parameter(dist, requires_grad=param.requires_grad))


def _lora_partition_fn(weight: Placement, bias: Placement, lora_A: Placement, lora_B: Placement,
                       src_data_rank: int | None) -> Callable[[str, nn.Module, DeviceMesh], None]:
    """A ``distribute_module`` partition function for a ``LoRALinear`` (called on it and on its ``base``)."""

    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if isinstance(module, LoRALinear):
            _distribute_params(module, mesh, {"lora_A": lora_A, "lora_B": lora_B}, src_data_rank)
        elif name == "base":
            _distribute_params(module, mesh, {"weight": weight, "bias": bias}, src_data_rank)

    return partition


class LoRAColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` that also takes a ``LoRALinear``: ``W``, ``B`` and the bias split by rows (output
    features), ``A`` replicated. The input is replicated, the output split on its last dim (a local tensor by
    default, as for ``ColwiseParallel``). Plain ``nn.Linear`` / ``nn.Embedding`` modules are handled by
    ``ColwiseParallel`` itself."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, LoRALinear):
            return super()._apply(module, device_mesh)
        return distribute_module(
            module, device_mesh,
            _lora_partition_fn(Shard(0), Shard(0), Replicate(), Shard(0), self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class LoRARowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` that also takes a ``LoRALinear``: ``W`` and ``A`` split by columns (input features),
    ``B`` and the bias replicated. The input is split on its last dim; the op's partial sums are reduced to a
    replicated output (the bias added once, after the reduction). Plain ``nn.Linear`` / ``nn.Embedding`` modules
    are handled by ``RowwiseParallel`` itself."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, LoRALinear):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)  # RowwiseParallel sets it in _apply, per module type
        return distribute_module(
            module, device_mesh,
            _lora_partition_fn(Shard(1), Replicate(), Shard(1), Replicate(), self.src_data_rank),
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
        ValueError: If the model has none of these projections, or one of them is neither ``LoRALinear`` nor
            ``nn.Linear``; the message names it.
    """
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in COLWISE_NAMES + ROWWISE_NAMES:
            continue
        if not isinstance(module, LoRALinear | nn.Linear):
            raise ValueError(f"tensor_parallel_plan: {name!r} is a {type(module).__name__}; expected nn.Linear or "
                             "LoRALinear")
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
