"""Declarative state-dict transforms: interface, leaves, compositions and builders."""

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup

__all__ = ["ModelStateMapper", "StateGroup"]
