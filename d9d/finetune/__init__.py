"""One-command fine-tuning under torchrun: config, data, sharded model loading, training, checkpoints and export."""

from d9d.finetune.cli import load_config, main
from d9d.finetune.config import (
    CheckpointConfig,
    DataConfig,
    ExportConfig,
    FinetuneConfig,
    GeneratedLlamaSource,
    GeneratedQwen3MoeSource,
    LocalModelSource,
    OptimizerConfig,
    PackagedMiniLMSource,
    ParallelConfig,
)

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "ExportConfig",
    "FinetuneConfig",
    "GeneratedLlamaSource",
    "GeneratedQwen3MoeSource",
    "LocalModelSource",
    "OptimizerConfig",
    "PackagedMiniLMSource",
    "ParallelConfig",
    "load_config",
    "main",
]
