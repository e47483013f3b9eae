"""Mappers: declared groups match what apply computes; compositions validate and fuse correctly."""

import pytest
import torch

from d9d.model_state.mapper import ModelStateMapper, StateGroup
from d9d.model_state.mapper.abc import group_order_key
from d9d.model_state.mapper.adapters import identity_mapper_from_keys, identity_mapper_from_module
from d9d.model_state.mapper.compose import ModelStateMapperParallel, ModelStateMapperSequential
from d9d.model_state.mapper.leaf import ModelStateMapperDuplicate, ModelStateMapperIdentity, ModelStateMapperRename
from tests.fixtures import TinyModel

pytestmark = pytest.mark.local


class Concat(ModelStateMapper):
    """A many-to-one mapper: concatenates inputs along dim 0."""

    def __init__(self, inputs: list[str], output: str):
        self.inputs, self.output = inputs, output

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset([StateGroup(inputs=frozenset(self.inputs), outputs=frozenset([self.output]))])

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.output: torch.cat([group[k] for k in self.inputs])}


def test_identity_and_rename():
    state = {"a": torch.randn(2), "b": torch.randn(3)}
    assert identity_mapper_from_keys(["a", "b"]).apply_all(state).keys() == {"a", "b"}
    renamed = ModelStateMapperRename({"a": "x.a", "b": "x.b"}).apply_all(state)
    assert torch.equal(renamed["x.a"], state["a"])
    assert torch.equal(renamed["x.b"], state["b"])
    groups = ModelStateMapperRename({"a": "x.a", "b": "x.b"}).state_dependency_groups()
    assert StateGroup(frozenset({"a"}), frozenset({"x.a"})) in groups
    assert len(groups) == 2


def test_rename_rejects_colliding_destinations():
    with pytest.raises(ValueError, match=r"both 'a' and 'b' to 'c'"):
        ModelStateMapperRename({"a": "c", "b": "c"})


def test_parallel_rejects_shared_inputs_and_outputs():
    with pytest.raises(ValueError, match="both read input key 'a'"):
        ModelStateMapperParallel([ModelStateMapperIdentity("a"), ModelStateMapperRename({"a": "b"})])
    with pytest.raises(ValueError, match="both produce output key 'b'"):
        ModelStateMapperParallel([ModelStateMapperIdentity("b"), ModelStateMapperRename({"a": "b"})])


def test_parallel_dispatches_each_group_to_its_part():
    mapper = ModelStateMapperParallel([ModelStateMapperIdentity("a"), Concat(["b", "c"], "bc")])
    state = {k: torch.randn(2) for k in "abc"}
    out = mapper.apply_all(state)
    assert out.keys() == {"a", "bc"}
    assert torch.equal(out["bc"], torch.cat([state["b"], state["c"]]))


def test_sequential_fuses_groups_across_stages():
    first = ModelStateMapperRename({"a": "a1", "b": "b1", "c": "c1", "d": "d1"})
    second = ModelStateMapperParallel([Concat(["a1", "b1"], "ab"), identity_mapper_from_keys(["c1", "d1"])])
    third = ModelStateMapperParallel([Concat(["ab", "c1"], "abc"), ModelStateMapperRename({"d1": "d2"})])
    mapper = ModelStateMapperSequential([first, second, third])
    groups = mapper.state_dependency_groups()
    assert groups == {
        StateGroup(frozenset("abc"), frozenset({"abc"})),
        StateGroup(frozenset("d"), frozenset({"d2"})),
    }
    state = {k: torch.randn(2) for k in "abcd"}
    out = mapper.apply_all(state)
    torch.testing.assert_close(out["abc"], torch.cat([state["a"], state["b"], state["c"]]))
    assert torch.equal(out["d2"], state["d"])


def test_passthrough_sources_compose_through_every_mapper():
    first = ModelStateMapperParallel([ModelStateMapperRename({"a": "a1", "b": "b1", "c": "c1"}),
                                      ModelStateMapperDuplicate("t", ["t_copy"])])
    second = ModelStateMapperParallel([Concat(["a1", "b1"], "ab"), ModelStateMapperRename({"c1": "c2"}),
                                       identity_mapper_from_keys(["t", "t_copy"])])
    mapper = ModelStateMapperSequential([first, second])
    sources = {tuple(sorted(g.outputs)): mapper.passthrough_sources(g) for g in mapper.state_dependency_groups()}
    assert sources == {("ab",): None, ("c2",): {"c2": "c"}, ("t", "t_copy"): {"t": "t", "t_copy": "t"}}
    # What a loader reads for a pass-through group is what apply gives.
    state = {k: torch.randn(3) for k in ("a", "b", "c", "t")}
    out = mapper.apply_all(state)
    for group in mapper.state_dependency_groups():
        for output, source in (mapper.passthrough_sources(group) or {}).items():
            assert torch.equal(out[output], state[source])
    assert Concat(["a"], "x").passthrough_sources(next(iter(Concat(["a"], "x").state_dependency_groups()))) is None


def test_group_order_keeps_layers_in_numeric_order():
    mapper = identity_mapper_from_keys([f"layers.{i}.w" for i in (10, 2, 1)])
    assert [sorted(g.outputs) for g in sorted(mapper.state_dependency_groups(), key=group_order_key)] == [
        ["layers.1.w"], ["layers.2.w"], ["layers.10.w"]]


def test_sequential_rejects_a_broken_chain():
    with pytest.raises(ValueError, match=r"stage 1 reads key\(s\) \['zzz'\]"):
        ModelStateMapperSequential([ModelStateMapperIdentity("a"), ModelStateMapperRename({"zzz": "y"})])


def test_apply_all_names_missing_key():
    with pytest.raises(KeyError, match="missing key"):
        ModelStateMapperRename({"a": "b"}).apply_all({"c": torch.randn(1)})


def test_identity_from_module_covers_state_dict():
    model = TinyModel()
    model.register_buffer("running", torch.randn(3))
    model.register_buffer("scratch", torch.randn(3), persistent=False)
    mapper = identity_mapper_from_module(model)
    assert mapper.output_keys() == set(model.state_dict())
    assert "scratch" not in mapper.output_keys()
