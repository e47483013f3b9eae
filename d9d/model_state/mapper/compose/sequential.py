"""Composition: mappers applied one after another."""

from collections.abc import Sequence

import torch

from d9d.model_state.mapper.abc import ModelStateMapper, StateGroup


class ModelStateMapperSequential(ModelStateMapper):
    """Applies mappers in order, each one to what the previous produced.

    Groups of consecutive stages are fused: a group of the composition is the smallest set of first-stage inputs
    that, through every stage, yields a closed set of last-stage outputs. So the composition still declares
    independent groups and can be streamed.
    """

    def __init__(self, mappers: Sequence[ModelStateMapper]):
        """Args:
        mappers: The stages, first applied first. Every key a stage reads must be produced by the stage before.

        Raises:
            ValueError: If ``mappers`` is empty, or a stage reads a key the previous stage does not produce.
        """
        if not mappers:
            raise ValueError("ModelStateMapperSequential needs at least one mapper")
        for i in range(1, len(mappers)):
            missing = mappers[i].input_keys() - mappers[i - 1].output_keys()
            if missing:
                raise ValueError(f"stage {i} reads key(s) {sorted(missing)} that stage {i - 1} does not produce")
        self._mappers = list(mappers)
        self._groups = self._fuse_groups()
        self._by_inputs = {g.inputs: history for g, history in self._groups.items()}

    def _fuse_groups(self) -> dict[StateGroup, list[list[StateGroup]]]:
        # Connected components of "stage i+1 group reads what stage i group produced"; each component is one
        # fused group that remembers, per stage, which of that stage's groups it runs.
        nodes = [(i, g) for i, m in enumerate(self._mappers) for g in m.state_dependency_groups()]
        parent = {n: n for n in nodes}

        def find(n: tuple[int, StateGroup]) -> tuple[int, StateGroup]:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for i in range(1, len(self._mappers)):
            producer = {k: (i - 1, g) for g in self._mappers[i - 1].state_dependency_groups() for k in g.outputs}
            for g in self._mappers[i].state_dependency_groups():
                for k in g.inputs:
                    parent[find(producer[k])] = find((i, g))

        components: dict[tuple[int, StateGroup], list[list[StateGroup]]] = {}
        for i, g in nodes:
            components.setdefault(find((i, g)), [[] for _ in self._mappers])[i].append(g)
        fused = {}
        for history in components.values():
            inputs = frozenset().union(*(g.inputs for g in history[0]))
            outputs = frozenset().union(*(g.outputs for g in history[-1]))
            if outputs:  # a first-stage group whose outputs no later stage reads produces nothing
                fused[StateGroup(inputs=inputs, outputs=outputs)] = history
        return fused

    @property
    def mappers(self) -> list[ModelStateMapper]:
        """The stages, in order."""
        return list(self._mappers)

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset(self._groups)

    def passthrough_sources(self, group: StateGroup) -> dict[str, str] | None:
        """Pass-through when every stage's part of the group is: the sources compose, last stage first."""
        sources = {k: k for k in group.outputs}
        for mapper, stage_groups in reversed(list(zip(self._mappers, self._groups[group], strict=True))):
            stage: dict[str, str] = {}
            for g in stage_groups:
                part = mapper.passthrough_sources(g)
                if part is None:
                    return None
                stage.update(part)
            sources = {out: stage[mid] for out, mid in sources.items()}
        return sources

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        history = self._by_inputs.get(frozenset(group))
        if history is None:
            raise KeyError(f"no sequential group has inputs {sorted(group)}")
        state = dict(group)
        for mapper, stage_groups in zip(self._mappers, history, strict=True):
            produced: dict[str, torch.Tensor] = {}
            for g in stage_groups:
                produced.update(mapper.apply({k: state[k] for k in g.inputs}))
            state = produced
        return state
