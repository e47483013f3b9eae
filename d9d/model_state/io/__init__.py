"""Checkpoint I/O in the Hugging Face safetensors layout, streamed through mappers, for sharded or plain models."""

from d9d.model_state.io.finite import check_finite
from d9d.model_state.io.layout import INDEX_FILE, SINGLE_FILE, TensorInfo, read_layout
from d9d.model_state.io.load import LoadStats, load_model_state
from d9d.model_state.io.model_keys import adapter_state_keys, checkpoint_mapper_for
from d9d.model_state.io.save import save_model_state

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "LoadStats",
    "TensorInfo",
    "adapter_state_keys",
    "check_finite",
    "checkpoint_mapper_for",
    "load_model_state",
    "read_layout",
    "save_model_state",
]
