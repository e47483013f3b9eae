"""The LoRA wrapper of an ``nn.Linear``."""

import math
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard

from d9d.adapter import AdapterLayer, PeftAdapterSpec
from d9d.ops import lora_linear
from d9d.peft.lora.config import LoRAParameters
from d9d.peft.lora.merge import merge_lora_weight_


class LoRALinear(AdapterLayer):
    """``base(x) + scale * B A dropout(x)`` around a frozen ``nn.Linear`` kept as ``base``.

    ``lora_A`` (r x in) starts Kaiming-uniform and ``lora_B`` (out x r) at zero, so a fresh wrapper computes exactly
    what the base layer computed. A bias stays in ``base``.
    """

    def __init__(self, base_layer: nn.Linear, params: LoRAParameters):
        """Args:
        base_layer: The layer to wrap; it becomes ``self.base`` (same object, same parameters).
        params: Rank, scale, dropout and adapter dtype.
        """
        super().__init__()
        self.base = base_layer
        dtype = getattr(torch, params.dtype) if params.dtype else base_layer.weight.dtype
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(params.r, base_layer.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, params.r, dtype=dtype, device=device))
        self.r = params.r
        self.alpha = params.alpha
        self.use_rslora = params.use_rslora
        self.scale = params.alpha / (math.sqrt(params.r) if params.use_rslora else params.r)
        self.dropout = params.dropout
        self.reset_adapter_parameters()

    def adapter_parameter_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B")

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Kaiming-uniform ``lora_A``, zero ``lora_B`` (also used after a meta-device model is materialized)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(
            x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scale, self.dropout, self.training
        )

    @torch.no_grad()
    def merge_into_base(self) -> nn.Linear:
        """Folds ``scale * B A`` into ``base.weight`` in place (sharded weights stay sharded) and returns ``base``."""
        merge_lora_weight_(self.base.weight, self.lora_A, self.lora_B, self.scale)
        return self.base

    def peft_spec(self) -> PeftAdapterSpec:
        return PeftAdapterSpec(
            tensors={"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"},
            options={"r": self.r, "lora_alpha": self.alpha, "use_rslora": self.use_rslora,
                     "lora_dropout": self.dropout, "use_dora": False},
        )

    def tensor_parallel_placements(self, style: Literal["colwise", "rowwise"]) -> dict[str, Placement]:
        """How tensor parallelism lays out this layer's parameters, by name relative to the layer.

        Column-wise (output features split): ``W``, ``B`` and the bias by rows, ``A`` replicated. Row-wise (input
        features split): ``W`` and ``A`` by columns, ``B`` and the bias replicated (the bias is added once, after
        the partial sums are reduced). ``d9d.parallel``'s styles read this, so they need no LoRA-specific code.
        """
        if style == "colwise":
            return {"base.weight": Shard(0), "base.bias": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)}
        return {"base.weight": Shard(1), "base.bias": Replicate(), "lora_A": Shard(1), "lora_B": Replicate()}

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, dropout={self.dropout:g}"
