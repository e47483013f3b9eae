"""LoRA: low-rank adapters on ``nn.Linear`` (optionally DoRA), ``nn.Embedding`` and fused Mixture-of-Experts experts."""

from d9d.peft.lora.config import LoRAConfig, LoRAParameters
from d9d.peft.lora.dora import DoRALinear
from d9d.peft.lora.embedding import LoRAEmbedding
from d9d.peft.lora.experts import LoRAExperts
from d9d.peft.lora.layer import LoRALinear
from d9d.peft.lora.method import LoRA

__all__ = ["DoRALinear", "LoRA", "LoRAConfig", "LoRAEmbedding", "LoRAExperts", "LoRALinear", "LoRAParameters"]
