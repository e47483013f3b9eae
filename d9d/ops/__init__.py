"""LoRA compute ops. ``lora_linear`` is what ``LoRALinear.forward`` calls; ``lora_merge_`` folds adapters in place."""

from d9d.ops import sharding as _sharding  # noqa: F401  (registers the DTensor sharding rules)
from d9d.ops.dora import dora_linear, dora_merge_, dora_weight_norm
from d9d.ops.lora import lora_linear, lora_merge_

__all__ = ["dora_linear", "dora_merge_", "dora_weight_norm", "lora_linear", "lora_merge_"]
