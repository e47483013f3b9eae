"""The DoRA wrapper of an ``nn.Linear``: LoRA with a learned magnitude per output row."""

import torch
from torch import nn

from d9d.adapter import PeftAdapterSpec
from d9d.dtensor import is_meta
from d9d.ops import dora_linear
from d9d.peft.lora.config import LoRAParameters
from d9d.peft.lora.layer import LoRALinear
from d9d.peft.lora.merge import init_dora_magnitude_, merge_dora_weight_


class DoRALinear(LoRALinear):
    """``m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b`` around a frozen ``nn.Linear`` (DoRA, arXiv 2402.09353).

    Exactly Hugging Face PEFT's DoRA (``use_dora=True``), including what it detaches: the row norm is a constant for
    autograd, and dropout applies as PEFT applies it (see :func:`d9d.ops.dora_linear`). ``lora_magnitude`` (out)
    starts as the row norms of the loaded base weight, so a fresh wrapper computes what the base layer computed.
    Wrapping a layer whose weights are loaded does that at once; a model built on ``meta`` gets it from
    ``d9d.adapter.init_adapters_from_base`` after ``load_model_state`` (until then the magnitude is NaN).
    """

    def __init__(self, base_layer: nn.Linear, params: LoRAParameters):
        """Args:
        base_layer: The layer to wrap; it becomes ``self.base`` (same object, same parameters).
        params: Rank, scale, dropout and adapter dtype (``use_dora`` is implied).
        """
        super().__init__(base_layer, params)
        self.lora_magnitude = nn.Parameter(
            torch.full((base_layer.out_features,), float("nan"), dtype=self.lora_A.dtype, device=self.lora_A.device)
        )
        if not is_meta(base_layer.weight):
            self.init_from_base()

    # No tensor-parallel layout: the magnitude and the row-norm ops have no split rule, so tensor_parallel_plan
    # refuses a DoRA layer by name instead of inheriting LoRALinear's layout (FSDP2 and HSDP shard DoRA fine).
    tensor_parallel_placements = None

    def adapter_parameter_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B", "lora_magnitude")

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """LoRA's init of ``lora_A`` and ``lora_B``; the magnitude becomes NaN until :meth:`init_from_base` runs.

        The base weights are not loaded yet when this runs after meta materialization, so no magnitude derived from
        them could be right; NaN makes a forgotten :meth:`init_from_base` fail loudly rather than train wrongly.
        """
        super().reset_adapter_parameters()
        magnitude = self._parameters.get("lora_magnitude")
        if magnitude is not None:
            magnitude.fill_(float("nan"))

    @torch.no_grad()
    def init_from_base(self) -> None:
        """``lora_magnitude <- ||W + s B A||_row`` from the current weights (shard-locally when sharded)."""
        init_dora_magnitude_(self.lora_magnitude, self.base.weight, self.lora_A, self.lora_B, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.lora_magnitude,
                           self.scale, self.dropout, self.training)

    @torch.no_grad()
    def merge_into_base(self) -> nn.Linear:
        """Writes ``m / ||W + s B A|| * (W + s B A)`` into ``base.weight`` (shard-locally) and returns ``base``."""
        merge_dora_weight_(self.base.weight, self.lora_A, self.lora_B, self.lora_magnitude, self.scale)
        return self.base

    def peft_spec(self) -> PeftAdapterSpec:
        spec = super().peft_spec()
        return PeftAdapterSpec(
            tensors={**spec.tensors, "lora_magnitude_vector": "lora_magnitude"},
            options={**spec.options, "use_dora": True},
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora=True"
