"""LoRA: low-rank adapters on ``nn.Linear`` layers."""

from d9d.peft.lora.config import LoRAConfig, LoRAParameters
from d9d.peft.lora.layer import LoRALinear
from d9d.peft.lora.method import LoRA

__all__ = ["LoRA", "LoRAConfig", "LoRALinear", "LoRAParameters"]
