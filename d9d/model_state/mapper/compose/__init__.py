"""Compositions of mappers."""

from d9d.model_state.mapper.compose.parallel import ModelStateMapperParallel
from d9d.model_state.mapper.compose.sequential import ModelStateMapperSequential

__all__ = ["ModelStateMapperParallel", "ModelStateMapperSequential"]
