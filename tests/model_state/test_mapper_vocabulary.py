"""The reshaping leaf mappers: each against plain torch on random tensors, dry-run on meta, and argument checks."""

import pytest
import torch

from d9d.model_state.mapper import (
    ModelStateMapperChunkTensors,
    ModelStateMapperConcatenateTensors,
    ModelStateMapperIdentity,
    ModelStateMapperParallel,
    ModelStateMapperSelectChildModules,
    ModelStateMapperSequential,
    ModelStateMapperSqueeze,
    ModelStateMapperStackTensors,
    ModelStateMapperTranspose,
    ModelStateMapperUnsqueeze,
    ModelStateMapperUnstackTensors,
    StateGroup,
    fused_experts_loading_mapper,
    identity_mapper_from_keys,
)

pytestmark = pytest.mark.local


def _meta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}


def _check(mapper, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """``mapper`` gives ``expected`` on real tensors, the same shapes on meta, and declares exactly those keys."""
    assert mapper.input_keys() == state.keys()
    assert mapper.output_keys() == expected.keys()
    got = mapper.apply_all(state)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
        assert got[key].is_contiguous()
    dry = mapper.apply_all(_meta(state))
    assert {k: (v.shape, v.device.type) for k, v in dry.items()} == {k: (v.shape, "meta") for k, v in expected.items()}


def test_identity_takes_one_name_never_iterating_a_str():
    state = {"a.weight": torch.randn(3, 2)}
    mapper = ModelStateMapperIdentity("a.weight")
    assert mapper.state_dependency_groups() == {StateGroup(frozenset({"a.weight"}), frozenset({"a.weight"}))}
    _check(mapper, state, state)
    with pytest.raises(TypeError, match="ModelStateMapperIdentity: name must be one key"):
        ModelStateMapperIdentity(["a.weight"])
    with pytest.raises(TypeError, match="identity_mapper_from_keys: keys must be a collection of keys"):
        identity_mapper_from_keys("a.weight")
    assert identity_mapper_from_keys(["a", "b"]).state_dependency_groups() == {
        StateGroup(frozenset({"a"}), frozenset({"a"})), StateGroup(frozenset({"b"}), frozenset({"b"}))
    }


def test_stack_and_unstack_are_inverse():
    experts = {f"experts.{e}.w": torch.randn(4, 3) for e in range(5)}
    stacked = torch.stack([experts[f"experts.{e}.w"] for e in range(5)], dim=0)
    names = [f"experts.{e}.w" for e in range(5)]
    _check(ModelStateMapperStackTensors(names, "w", dim=0), experts, {"w": stacked})
    _check(ModelStateMapperUnstackTensors("w", names, dim=0), {"w": stacked}, experts)
    _check(ModelStateMapperStackTensors(names, "w", dim=2), experts, {"w": torch.stack(list(experts.values()), 2)})


def test_concatenate_and_chunk_are_inverse():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    _check(ModelStateMapperConcatenateTensors(["gate", "up"], "gate_up", dim=0), {"gate": gate, "up": up},
           {"gate_up": torch.cat([gate, up])})
    _check(ModelStateMapperChunkTensors("gate_up", ["gate", "up"], dim=0), {"gate_up": torch.cat([gate, up])},
           {"gate": gate, "up": up})
    _check(ModelStateMapperChunkTensors("x", ["p", "q"], dim=-1), {"x": torch.cat([gate, up], 1)},
           {"p": gate, "q": up})


def test_chunk_parts_do_not_share_storage():
    source = torch.randn(4, 2)
    parts = ModelStateMapperChunkTensors("x", ["p", "q"], dim=0).apply({"x": source})
    parts["p"].add_(1)
    assert torch.equal(parts["q"], source[2:])
    assert not torch.equal(parts["p"], source[:2])


def test_transpose_squeeze_unsqueeze():
    x = torch.randn(2, 3, 4)
    _check(ModelStateMapperTranspose("x", (1, 2)), {"x": x}, {"x": x.transpose(1, 2)})
    _check(ModelStateMapperUnsqueeze("x", 0), {"x": x}, {"x": x[None]})
    _check(ModelStateMapperSqueeze("x", 1), {"x": x[:, None]}, {"x": x})


def test_select_child_modules_drops_the_prefix():
    state = {"model.layers.0.w": torch.randn(2), "model.layers.0.n.b": torch.randn(3)}
    _check(ModelStateMapperSelectChildModules(["w", "n.b"], "model.layers.0"), state,
           {"w": state["model.layers.0.w"], "n.b": state["model.layers.0.n.b"]})


def test_per_expert_checkpoint_to_fused_experts_through_stack_and_concatenate():
    """The v5 layout: gate_up_proj [E, 2I, H] from per-expert gate/up [I, H], down_proj [E, H, I]."""
    num_experts, inter, hidden = 3, 4, 5
    old = {}
    for e in range(num_experts):
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for proj, shape in shapes.items():
            old[f"experts.{e}.{proj}.weight"] = torch.randn(shape)
    names = {p: [f"experts.{e}.{p}.weight" for e in range(num_experts)] for p in ("gate_proj", "up_proj", "down_proj")}
    mapper = ModelStateMapperSequential([
        ModelStateMapperParallel([
            ModelStateMapperStackTensors(names["gate_proj"], "gate", dim=0),
            ModelStateMapperStackTensors(names["up_proj"], "up", dim=0),
            ModelStateMapperStackTensors(names["down_proj"], "experts.down_proj", dim=0),
        ]),
        ModelStateMapperParallel([
            ModelStateMapperConcatenateTensors(["gate", "up"], "experts.gate_up_proj", dim=1),
            ModelStateMapperIdentity("experts.down_proj"),
        ]),
    ])
    gate_up = torch.stack([torch.cat([old[names["gate_proj"][e]], old[names["up_proj"][e]]]) for e in range(3)])
    down = torch.stack([old[n] for n in names["down_proj"]])
    _check(mapper, old, {"experts.gate_up_proj": gate_up, "experts.down_proj": down})
    assert len(mapper.state_dependency_groups()) == 2  # gate+up in one group, down in another


@pytest.mark.parametrize(("make", "state", "message"), [
    (lambda: ModelStateMapperStackTensors(["a", "b"], "s", 0), {"a": torch.randn(2), "b": torch.randn(3)},
     r"ModelStateMapperStackTensors: cannot join \{'a': \(2,\), 'b': \(3,\)\} into 's'"),
    (lambda: ModelStateMapperUnstackTensors("s", ["a", "b"], 0), {"s": torch.randn(3, 2)},
     r"cannot split 's' of shape \(3, 2\) into 2 along dim 0: dimension 0 has size 3"),
    (lambda: ModelStateMapperChunkTensors("s", ["a", "b"], 0), {"s": torch.randn(3)},
     "not a multiple of 2"),
    (lambda: ModelStateMapperSqueeze("s", 0), {"s": torch.randn(3)}, r"cannot transform 's' of shape \(3,\)"),
    (lambda: ModelStateMapperTranspose("s", (0, 2)), {"s": torch.randn(3, 2)}, "cannot transform 's'"),
])
def test_bad_shapes_name_the_key_also_on_meta(make, state, message):
    for tensors in (state, _meta(state)):
        with pytest.raises(ValueError, match=message):
            make().apply_all(tensors)


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: ModelStateMapperStackTensors("ab", "s", 0), TypeError, "source_names must be a collection"),
    (lambda: ModelStateMapperConcatenateTensors(["a", "a"], "s", 0), ValueError, r"repeats key\(s\) \['a'\]"),
    (lambda: ModelStateMapperChunkTensors("s", [], 0), ValueError, "needs at least 1 key"),
    (lambda: ModelStateMapperSelectChildModules("w", "m"), TypeError, "base_names must be a collection"),
    (lambda: ModelStateMapperTranspose("s", (0,)), ValueError, "dims must name two dimensions"),
    (lambda: ModelStateMapperUnstackTensors(["s"], ["a"], 0), TypeError, "source_name must be one key"),
])
def test_bad_arguments_are_refused_when_built(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_fused_experts_loading_mapper_rebuilds_the_fused_state_from_per_expert_keys(names):
    num_experts, inter, hidden = 3, 4, 5
    fused = {"m.experts.gate_up_proj": torch.randn(num_experts, 2 * inter, hidden),
             "m.experts.down_proj": torch.randn(num_experts, hidden, inter), "m.norm.weight": torch.randn(hidden)}
    per_expert = {"m.norm.weight": fused["m.norm.weight"]}
    for e in range(num_experts):
        gate, up = fused["m.experts.gate_up_proj"][e].chunk(2)
        per_expert |= {f"m.experts.{e}.{names[0]}.weight": gate, f"m.experts.{e}.{names[1]}.weight": up,
                       f"m.experts.{e}.{names[2]}.weight": fused["m.experts.down_proj"][e]}
    model_mapper = identity_mapper_from_keys(fused)
    mapper = fused_experts_loading_mapper(model_mapper, per_expert.keys())
    _check(mapper, per_expert, fused)
    assert fused_experts_loading_mapper(model_mapper, fused.keys()) is model_mapper  # already fused: unchanged
