"""Adapter checkpoints: exact round trip, no code run from the folder, clear refusals, incomplete folders skipped."""

import json
import pickle
import shutil

import pytest
import torch

from d9d.finetune.checkpoint import (
    META_FILE,
    latest_complete_checkpoint,
    load_checkpoint,
    rank_file,
    save_checkpoint,
)
from d9d.peft import inject_peft_and_freeze
from d9d.peft.all import peft_method_from_config
from tests.fixtures import TinyModel, lora_and_norms

pytestmark = pytest.mark.local


def _trained_model(config, steps: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyModel()
    inject_peft_and_freeze(peft_method_from_config(config), model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.95))
    for _ in range(steps):
        model(torch.randn(4, 3, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _fresh(config):
    """The same base model, adapters freshly initialized, optimizer without state."""
    return _trained_model(config, steps=0)


def _continue(model, optimizer, steps: int = 2) -> torch.Tensor:
    torch.manual_seed(99)
    for _ in range(steps):
        model(torch.randn(4, 3, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


@pytest.fixture
def saved(tmp_path):
    config = lora_and_norms(dropout=0.0)
    model, optimizer = _trained_model(config)
    path = save_checkpoint(tmp_path, 3, model, optimizer, keep_last=2, peft_config=config.model_dump(mode="json"))
    return config, model, optimizer, path


def test_round_trip_resumes_exactly(saved):
    config, model, optimizer, path = saved
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, rank_file(0)]
    fresh, fresh_optimizer = _fresh(config)
    assert not torch.equal(fresh.layers[0].attention.q_proj.lora_B, model.layers[0].attention.q_proj.lora_B)
    step = load_checkpoint(path, fresh, fresh_optimizer, peft_config=config.model_dump(mode="json"))
    assert step == 3
    assert fresh_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    torch.testing.assert_close(_continue(fresh, fresh_optimizer), _continue(model, optimizer), rtol=0, atol=0)


def test_nothing_is_unpickled_on_load(saved, monkeypatch):
    config, _, _, path = saved

    def refuse(*args, **kwargs):
        raise AssertionError("resume unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh, fresh_optimizer = _fresh(config)
    assert load_checkpoint(path, fresh, fresh_optimizer) == 3


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickles_in_the_folder_do_not_run(saved, tmp_path):
    config, _, _, path = saved
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    # A torch.distributed.checkpoint folder whose .metadata is the payload (what d9d used to load).
    legacy = tmp_path / "step_00000009"
    legacy.mkdir()
    (legacy / ".metadata").write_bytes(payload)
    (legacy / "__0_0.distcp").write_bytes(payload)
    latest, skipped = latest_complete_checkpoint(tmp_path)
    assert latest == path
    assert len(skipped) == 1
    assert "step_00000009" in skipped[0]
    assert "pickle" in skipped[0]
    fresh, fresh_optimizer = _fresh(config)
    with pytest.raises(ValueError, match=r"no checkpoint\.json"):
        load_checkpoint(legacy, fresh, fresh_optimizer)
    # The payload in place of the JSON and of the tensors: named errors, nothing run.
    (path / META_FILE).write_bytes(payload)
    with pytest.raises(ValueError, match=r"checkpoint\.json is not valid JSON"):
        load_checkpoint(path, fresh, fresh_optimizer)
    assert not marker.exists()


def test_incomplete_newest_checkpoint_falls_back(saved, tmp_path):
    _, model, optimizer, path = saved
    newer = save_checkpoint(tmp_path, 6, model, optimizer, keep_last=3)
    (newer / rank_file(0)).unlink()
    latest, skipped = latest_complete_checkpoint(tmp_path)
    assert latest == path
    assert skipped == [f"checkpoint {str(newer)!r} is incomplete: ['{rank_file(0)}'] missing"]
    shutil.rmtree(path)
    assert latest_complete_checkpoint(tmp_path)[0] is None


def test_changed_rank_is_one_line_naming_parameter_and_shapes(saved):
    _, _, _, path = saved
    other = lora_and_norms(dropout=0.0, r=2)
    fresh, fresh_optimizer = _fresh(other)
    with pytest.raises(ValueError, match="lora_A") as info:
        load_checkpoint(path, fresh, fresh_optimizer, peft_config=other.model_dump(mode="json"))
    message = str(info.value)
    assert "\n" not in message
    assert "'layers.0.attention.q_proj.lora_A' has shape (4, 16) in the checkpoint but (2, 16) in the model" in message
    assert "peft.methods[0].params.r: 4 in the checkpoint, 2 now" in message


@pytest.mark.parametrize(("change", "named"), [
    ({"alpha": 16}, "peft.methods[0].params.alpha: 8.0 in the checkpoint, 16.0 now"),
    ({"dropout": 0.1}, "peft.methods[0].params.dropout: 0.0 in the checkpoint, 0.1 now"),
])
def test_changed_peft_config_is_refused_by_name(saved, change, named):
    _, _, _, path = saved
    other = lora_and_norms(**{"dropout": 0.0, **change})
    fresh, fresh_optimizer = _fresh(other)
    with pytest.raises(ValueError, match="another PEFT config") as info:
        load_checkpoint(path, fresh, fresh_optimizer, peft_config=other.model_dump(mode="json"))
    assert named in str(info.value)


def test_changed_pattern_is_refused_by_name(saved):
    _, _, _, path = saved
    other = lora_and_norms(r".*attention\.q_proj", dropout=0.0)
    fresh, fresh_optimizer = _fresh(other)
    with pytest.raises(ValueError, match=r"module_name_pattern") as info:
        load_checkpoint(path, fresh, fresh_optimizer, peft_config=other.model_dump(mode="json"))
    assert "unexpected ['layers.0.attention.k_proj.lora_A'" in str(info.value)


def test_checkpoint_json_records_the_peft_config(saved):
    config, _, _, path = saved
    meta = json.loads((path / META_FILE).read_text())
    assert meta["peft"] == config.model_dump(mode="json")
    assert meta["step"] == 3
    assert meta["world_size"] == 1
