"""LoRA configuration."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from d9d.peft.module_match import ModuleNamePattern


class LoRAParameters(BaseModel):
    """Hyper-parameters of one LoRA adapter.

    Attributes:
        r: Rank of the update ``B A``.
        alpha: Scale numerator: the update is ``alpha / r * B A`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: Dropout probability on the adapter's input, in ``[0, 1)``.
        use_rslora: Use the rank-stabilized scale ``alpha / sqrt(r)``.
        dtype: Adapter dtype; ``None`` uses the wrapped layer's weight dtype. ``"float32"`` adapters on a
            ``bfloat16`` base is the usual mixed-precision choice.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class LoRAConfig(BaseModel):
    """Apply LoRA to every ``nn.Linear``, and every fused Mixture-of-Experts experts module (3-D ``gate_up_proj`` and
    ``down_proj``, as transformers v5 stores them: per-expert adapters of rank ``r``), whose qualified name fully
    matches ``module_name_pattern`` (for example the experts of every layer: ``model.layers.*.mlp.experts``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["lora"] = "lora"
    module_name_pattern: ModuleNamePattern
    params: LoRAParameters
