"""d9d: parameter-efficient fine-tuning for FSDP2-sharded PyTorch models."""

__version__ = "0.1.0"
