"""LoRA configuration."""

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

from d9d.peft.module_match import ModuleNamePattern

DROPOUT_LEVELS = 65536
"""The dropout mask draws 16 bits per element: the keep probability is resolved to ``1 / DROPOUT_LEVELS``."""

DROPOUT_TOLERANCE = 0.01
"""The largest relative error of the kept fraction that a dropout rate may suffer from that resolution."""

_FLOAT32_MAX = 3.4028234663852886e38


def kept_fraction(dropout: float) -> float:
    """The fraction of inputs the fused ops keep for ``dropout``: ``p`` rounded to a multiple of 1/65536."""
    return (DROPOUT_LEVELS - math.floor(dropout * DROPOUT_LEVELS + 0.5)) / DROPOUT_LEVELS


class LoRAParameters(BaseModel):
    """Hyper-parameters of one LoRA adapter.

    Attributes:
        r: Rank of the update ``B A``.
        alpha: Scale numerator: the update is ``alpha / r * B A`` (or ``alpha / sqrt(r)`` with ``use_rslora``); the
            scale must be finite in float32.
        dropout: Dropout probability on the adapter's input, in ``[0, 1)``. The mask resolves the keep probability
            to 1/65536, so rates whose kept fraction would be off by more than 1% are refused (every rate up to
            0.999 is honoured).
        use_rslora: Use the rank-stabilized scale ``alpha / sqrt(r)``.
        use_dora: Weight-decomposed LoRA (DoRA, PEFT's ``use_dora``): a trainable magnitude per output row rescales
            ``W + scale B A`` to unit row norm times the magnitude. Linear layers only.
        dtype: Adapter dtype; ``None`` uses the wrapped layer's weight dtype. ``"float32"`` adapters on a
            ``bfloat16`` base is the usual mixed-precision choice.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(gt=0)
    alpha: float = Field(gt=0, allow_inf_nan=False)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    use_dora: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    @property
    def scale(self) -> float:
        """The factor of ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @model_validator(mode="after")
    def _check_numbers(self) -> Self:
        if not self.scale < _FLOAT32_MAX:
            raise ValueError(f"alpha={self.alpha:g} with r={self.r} gives the scale {self.scale:g}, which overflows "
                             "float32; use a smaller alpha")
        keep = 1.0 - self.dropout
        kept = kept_fraction(self.dropout)
        if keep and abs(kept - keep) > DROPOUT_TOLERANCE * keep:
            raise ValueError(
                f"dropout={self.dropout!r} cannot be honoured: the mask resolves the keep probability to 1/"
                f"{DROPOUT_LEVELS}, so it would keep {kept:.3g} of the inputs instead of {keep:.3g} (off by more "
                f"than {DROPOUT_TOLERANCE:.0%}); use dropout <= 0.999"
            )
        return self


class LoRAConfig(BaseModel):
    """Apply LoRA to every ``nn.Linear`` (optionally as DoRA), every ``nn.Embedding``, and every fused
    Mixture-of-Experts experts module (3-D ``gate_up_proj`` and ``down_proj``, as transformers v5 stores them:
    per-expert adapters of rank ``r``) whose qualified name fully matches ``module_name_pattern`` (for example the
    experts of every layer: ``model.layers.*.mlp.experts``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["lora"] = "lora"
    module_name_pattern: ModuleNamePattern
    params: LoRAParameters
