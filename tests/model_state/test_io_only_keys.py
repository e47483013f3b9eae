"""``load_model_state`` from one ``.safetensors`` file of any name, filling only some model keys."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from d9d.model_state.io import load_model_state
from d9d.model_state.mapper import ModelStateMapperRename

pytestmark = pytest.mark.local


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_one_file_fills_only_the_named_keys_and_leaves_the_rest(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stored = torch.randn(2, 4)
    save_file({"adapter.w": stored}, str(tmp_path / "adapter_model.safetensors"))
    load_model_state(tmp_path / "adapter_model.safetensors", ModelStateMapperRename({"adapter.w": "1.weight"}), "cpu",
                     model, show_progress=False, only_keys=["1.weight"])
    torch.testing.assert_close(model[1].weight, stored, rtol=0, atol=0)
    for key in ("0.weight", "0.bias", "1.bias"):
        assert torch.equal(model.state_dict()[key], before[key])


def test_only_keys_errors_name_the_key_and_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(2, 4), "extra": torch.randn(1)}, str(path))
    with pytest.raises(ValueError, match=r"only_keys names key\(s\) the model does not have: 'nope'"):
        load_model_state(path, ModelStateMapperRename({"a": "1.weight"}), "cpu", _model(), show_progress=False,
                         only_keys=["nope"])
    with pytest.raises(ValueError, match=r"unexpected key\(s\) in checkpoint .*'extra' \(in x\.safetensors\)"):
        load_model_state(path, ModelStateMapperRename({"a": "1.weight"}), "cpu", _model(), show_progress=False,
                         only_keys=["1.weight"])
    with pytest.raises(ValueError, match=r"model key\(s\) that no mapper group produces: '1\.bias'"):
        load_model_state(path, ModelStateMapperRename({"a": "1.weight", "extra": "0.bias"}), "cpu", _model(),
                         show_progress=False, only_keys=["1.weight", "1.bias"])
