"""The mapper interface: declare which keys produce which, then compute them one group at a time."""

import abc
import dataclasses

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
        for group in sorted(self.state_dependency_groups(), key=group_sort_key):
            missing = sorted(group.inputs - state.keys())
            if missing:
                raise KeyError(f"state is missing key(s) {missing} needed to produce {sorted(group.outputs)}")
            result.update(self.apply({k: state[k] for k in group.inputs}))
        return result


def group_sort_key(group: StateGroup) -> tuple[str, ...]:
    """A deterministic order for groups, so every rank walks them identically."""
    return tuple(sorted(group.outputs))
