"""Trainable versus total parameter counts."""

import dataclasses

from torch import nn


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a module (global counts for sharded DTensor parameters)."""

    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: " \
               f"{self.trainable_percent:.4f}"


def count_parameters(module: nn.Module) -> ParameterCount:
    """Counts the parameters of ``module`` (each shared parameter once) and how many of them train."""
    params = {id(p): p for p in module.parameters()}.values()
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad), total=sum(p.numel() for p in params)
    )
