"""The duplicate leaf mapper: one stored tensor fills its tied copies."""

import pytest
import torch

from d9d.model_state.mapper import ModelStateMapperDuplicate as FromPackage
from d9d.model_state.mapper import StateGroup
from d9d.model_state.mapper.leaf import ModelStateMapperDuplicate

pytestmark = pytest.mark.local


def test_duplicate_declares_one_group_and_clones() -> None:
    assert FromPackage is ModelStateMapperDuplicate
    mapper = ModelStateMapperDuplicate("embed.weight", ["lm_head.weight"])
    assert mapper.state_dependency_groups() == frozenset(
        [StateGroup(inputs=frozenset(["embed.weight"]), outputs=frozenset(["embed.weight", "lm_head.weight"]))]
    )
    source = torch.randn(3, 2)
    out = mapper.apply({"embed.weight": source})
    assert out["embed.weight"] is source
    torch.testing.assert_close(out["lm_head.weight"], source)
    assert out["lm_head.weight"].untyped_storage().data_ptr() != source.untyped_storage().data_ptr()


@pytest.mark.parametrize("copies", [[], ["embed.weight"], ["a", "a"]])
def test_duplicate_rejects_bad_copies(copies: list[str]) -> None:
    with pytest.raises(ValueError, match=r"embed\.weight"):
        ModelStateMapperDuplicate("embed.weight", copies)
