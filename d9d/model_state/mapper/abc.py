"""The mapper interface: declare which keys produce which, then compute them one group at a time."""

import abc
import dataclasses
import re

import torch


@dataclasses.dataclass(frozen=True)
class StateGroup:
    """An atomic unit of a state transform: these input keys produce these output keys.

    Attributes:
        inputs: Every key the group reads from the source state.
        outputs: Every key the group writes to the destination state.
    """

    inputs: frozenset[str]
    outputs: frozenset[str]


class ModelStateMapper(abc.ABC):
    """Base class of every model state transform.

    A mapper separates *declaring* its work from *doing* it. ``state_dependency_groups()`` announces which input
    keys give which output keys without touching data, so a loader can plan file reads, validate a whole plan and
    split the work before it allocates anything. ``apply()`` then computes one group.
    """

    @abc.abstractmethod
    def state_dependency_groups(self) -> frozenset[StateGroup]:
        """Returns the independent groups this mapper handles (each can be computed on its own)."""

    @abc.abstractmethod
    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Computes one group.

        Args:
            group: The source tensors; its keys are exactly the ``inputs`` of one declared group.

        Returns:
            The produced tensors; the keys are exactly that group's ``outputs``.
        """

    def passthrough_sources(self, group: StateGroup) -> dict[str, str] | None:
        """For a group whose outputs are its inputs unchanged (renamed or repeated at most): each output key's
        input key. ``None`` (the default) when the group computes its outputs.

        A loader reads a pass-through output's input only where the output is needed (a sharded rank: its shard's
        rows or columns); it reads the inputs of any other group whole and applies the group.

        Args:
            group: One of this mapper's ``state_dependency_groups()``.
        """
        del group
        return None

    def input_keys(self) -> frozenset[str]:
        """Every key this mapper reads."""
        return frozenset().union(*(g.inputs for g in self.state_dependency_groups()))

    def output_keys(self) -> frozenset[str]:
        """Every key this mapper produces."""
        return frozenset().union(*(g.outputs for g in self.state_dependency_groups()))

    def apply_all(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Applies every group to a whole in-memory state dict (convenient for small models and tests).

        Raises:
            KeyError: If ``state`` lacks a key that some group needs; the message names the key.
        """
        result: dict[str, torch.Tensor] = {}
        for group in sorted(self.state_dependency_groups(), key=group_order_key):
            missing = sorted(group.inputs - state.keys())
            if missing:
                raise KeyError(f"state is missing key(s) {missing} needed to produce {sorted(group.outputs)}")
            result.update(self.apply({k: state[k] for k in group.inputs}))
        return result


def natural_key(key: str) -> tuple[str | int, ...]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


def group_order_key(group: StateGroup) -> tuple[tuple[str | int, ...], ...]:
    """The one deterministic order of groups (every rank walks them identically), keeping layers consecutive."""
    return tuple(sorted(natural_key(k) for k in group.outputs))
