"""LoRA: low-rank adapters on ``nn.Linear`` layers and on fused Mixture-of-Experts experts."""

from d9d.peft.lora.config import LoRAConfig, LoRAParameters
from d9d.peft.lora.experts import LoRAExperts
from d9d.peft.lora.layer import LoRALinear
from d9d.peft.lora.method import LoRA

__all__ = ["LoRA", "LoRAConfig", "LoRAExperts", "LoRALinear", "LoRAParameters"]
