"""The LoRA wrapper of a Mixture-of-Experts experts module (transformers v5's ``*Experts``: 3-D weights)."""

import math

import torch
from torch import nn

from d9d.adapter import AdapterLayer, PeftAdapterSpec
from d9d.ops.experts import grouped_lora_linear, grouped_lora_merge_
from d9d.peft.lora.config import LoRAParameters

__all__ = ["LoRAExperts", "is_fused_experts"]

# What the wrapper's own forward reproduces of transformers' ``use_experts_implementation`` options.
_SUPPORTED_LAYOUT = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
                     "has_post_expert_norm": False}


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds its experts as 3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3)


class LoRAExperts(AdapterLayer):
    """Per-expert LoRA on both projections of a fused experts module, kept frozen as ``base``.

    Expert ``e`` gets its own ``A_e`` (r x in) and ``B_e`` (out x r) for ``gate_up_proj`` and for ``down_proj``, as
    PEFT's ``target_parameters``; stored stacked, experts first (``gate_up_lora_A`` is E x r x H, ...), so that
    FSDP2 shards them along the experts exactly like the base weights and a merge is shard-local. The LoRA term
    applies only to the tokens routed to ``e``. The forward is the wrapper's own (sort the token-expert pairs by
    expert, two grouped LoRA linears, weighted scatter-add), whatever ``_experts_implementation`` the model picked;
    the router outside it stays untouched.
    """

    def __init__(self, base_layer: nn.Module, params: LoRAParameters):
        """Args:
        base_layer: The experts module; it becomes ``self.base``.
        params: Rank (per expert), scale, dropout and adapter dtype.

        Raises:
            ValueError: If ``base_layer`` is not an experts module the wrapper reproduces (see :meth:`check_base`).
        """
        super().__init__()
        self.check_base(base_layer, type(base_layer).__name__)
        experts, two_inter, hidden = base_layer.gate_up_proj.shape
        self.base = base_layer
        weight = base_layer.gate_up_proj
        dtype = getattr(torch, params.dtype) if params.dtype else weight.dtype
        r, inter = params.r, two_inter // 2

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=weight.device))

        self.gate_up_lora_A, self.gate_up_lora_B = new(experts, r, hidden), new(experts, two_inter, r)
        self.down_lora_A, self.down_lora_B = new(experts, r, inter), new(experts, hidden, r)
        self.num_experts = experts
        self.r = r
        self.alpha = params.alpha
        self.use_rslora = params.use_rslora
        self.scale = params.alpha / (math.sqrt(r) if params.use_rslora else r)
        self.dropout = params.dropout
        self.reset_adapter_parameters()

    @staticmethod
    def check_base(base_layer: nn.Module, name: str) -> None:
        """Raises ``ValueError`` naming ``name`` unless ``base_layer`` is an experts module the wrapper reproduces:
        3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], not transposed, no bias, gate and up
        concatenated, no post-expert norm."""
        if not is_fused_experts(base_layer):
            raise ValueError(f"LoRAExperts: {name!r} ({type(base_layer).__name__}) has no 3-D gate_up_proj and "
                             "down_proj parameters")
        odd = {k: getattr(base_layer, k) for k, v in _SUPPORTED_LAYOUT.items() if getattr(base_layer, k, v) != v}
        if odd:
            raise ValueError(f"LoRAExperts: {name!r} ({type(base_layer).__name__}) has {odd}; supported are experts "
                             f"with {_SUPPORTED_LAYOUT}")
        experts, two_inter, hidden = base_layer.gate_up_proj.shape
        if tuple(base_layer.down_proj.shape) != (experts, hidden, two_inter // 2) or two_inter % 2:
            raise ValueError(f"LoRAExperts: {name!r} has gate_up_proj {tuple(base_layer.gate_up_proj.shape)} and "
                             f"down_proj {tuple(base_layer.down_proj.shape)}, not [E, 2I, H] and [E, H, I]")

    def adapter_parameter_names(self) -> tuple[str, ...]:
        return ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B")

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Each expert's ``A_e`` Kaiming-uniform (as an ``nn.Linear(in, r)`` weight), every ``B`` zero."""
        for a in (self.gate_up_lora_A, self.down_lora_A):
            bound = 1.0 / math.sqrt(a.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on an r x in matrix
            a.uniform_(-bound, bound)
        nn.init.zeros_(self.gate_up_lora_B)
        nn.init.zeros_(self.down_lora_B)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        top_k = top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        with torch.no_grad():
            order = torch.argsort(expert_ids, stable=True)
            token_of = order // top_k
            offsets = torch.cumsum(torch.bincount(expert_ids, minlength=self.num_experts), 0).cpu()
        x = hidden_states[token_of]
        dropout_on = self.training and self.dropout > 0  # draw a seed (consume the RNG) only when it is used
        seed = (torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cpu") if dropout_on
                else torch.zeros(1, dtype=torch.int64))
        base = self.base
        h = grouped_lora_linear(x, base.gate_up_proj, self.gate_up_lora_A, self.gate_up_lora_B, offsets, self.scale,
                                self.dropout, self.training, seed)
        h = base._apply_gate(h) if hasattr(base, "_apply_gate") else _gate(base, h)
        y = grouped_lora_linear(h, base.down_proj, self.down_lora_A, self.down_lora_B, offsets, self.scale,
                                self.dropout, self.training, seed + 1)
        y = y * top_k_weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, token_of, y.to(hidden_states.dtype))

    @torch.no_grad()
    def merge_into_base(self) -> nn.Module:
        """Folds ``scale B_e A_e`` into both 3-D weights, one expert at a time (shard-locally when sharded)."""
        grouped_lora_merge_(self.base.gate_up_proj, self.gate_up_lora_A, self.gate_up_lora_B, self.scale)
        grouped_lora_merge_(self.base.down_proj, self.down_lora_A, self.down_lora_B, self.scale)
        return self.base

    def peft_spec(self) -> PeftAdapterSpec:
        """PEFT's ``target_parameters`` layout: ``lora_A`` [r*E, in] (expert-major rows), ``lora_B`` [out, r*E]
        with column ``k*E + e`` for rank ``k`` of expert ``e``. PEFT wraps ``gate_up_proj`` first and ``down_proj``
        around it, so the ``gate_up_proj`` tensors sit under ``base_layer.``."""
        experts = self.num_experts

        def a_to_peft(a: torch.Tensor) -> torch.Tensor:
            return a.reshape(-1, a.shape[-1])

        def a_from_peft(a: torch.Tensor) -> torch.Tensor:
            return a.reshape(experts, -1, a.shape[-1])

        def b_to_peft(b: torch.Tensor) -> torch.Tensor:  # [E, out, r] -> [out, r, E] -> [out, r*E]
            return b.permute(1, 2, 0).reshape(b.shape[1], -1)

        def b_from_peft(b: torch.Tensor) -> torch.Tensor:
            return b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)

        keys = {"base_layer.lora_A.weight": "gate_up_lora_A", "base_layer.lora_B.weight": "gate_up_lora_B",
                "lora_A.weight": "down_lora_A", "lora_B.weight": "down_lora_B"}
        return PeftAdapterSpec(
            tensors=keys,
            options={"r": self.r, "lora_alpha": self.alpha, "use_rslora": self.use_rslora,
                     "lora_dropout": self.dropout},
            target_parameters=("gate_up_proj", "down_proj"),
            to_peft={k: (a_to_peft if k.endswith("lora_A.weight") else b_to_peft) for k in keys},
            from_peft={k: (a_from_peft if k.endswith("lora_A.weight") else b_from_peft) for k in keys},
        )

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, r={self.r}, scale={self.scale:g}, dropout={self.dropout:g}"


def _gate(base: nn.Module, h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return base.act_fn(gate) * up
