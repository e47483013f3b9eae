"""Checkpoint I/O against bad input: indexes pointing outside, lossy dtypes, non-finite weights, destinations that
an export would destroy; and the config an export can carry."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from d9d.model_state.io import INDEX_FILE, SINGLE_FILE, check_finite, load_model_state, save_model_state
from d9d.model_state.io.atomic import temporary_sibling
from d9d.model_state.mapper.adapters import identity_mapper_from_module

pytestmark = pytest.mark.local


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))


def sharded_checkpoint(folder: Path, weight_map: object) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in Small().state_dict().items()}, folder / "part.safetensors")
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return folder


def load(folder: Path) -> None:
    model = Small()
    load_model_state(folder, identity_mapper_from_module(model), "cpu", model, show_progress=False)


@pytest.mark.parametrize("entry", ["../outside/part.safetensors", "/etc/passwd", "sub/../../part.safetensors"])
def test_index_entry_outside_the_folder_is_refused_by_key(tmp_path: Path, entry: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({k: v.contiguous() for k, v in Small().state_dict().items()}, outside / "part.safetensors")
    keys = list(Small().state_dict())
    folder = sharded_checkpoint(tmp_path / "ckpt", {**dict.fromkeys(keys, "part.safetensors"), "a.weight": entry})
    with pytest.raises(ValueError, match=r"'a\.weight'.*outside the checkpoint folder"):
        load(folder)


def test_index_entry_symlinked_outside_the_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    save_file({k: v.contiguous() for k, v in Small().state_dict().items()}, outside)
    folder = sharded_checkpoint(tmp_path / "ckpt", dict.fromkeys(Small().state_dict(), "link.safetensors"))
    os.symlink(outside, folder / "link.safetensors")
    with pytest.raises(ValueError, match=r"maps '(steps|a\.weight|a\.bias)' to 'link\.safetensors'.*outside"):
        load(folder)


@pytest.mark.parametrize(("weight_map", "needle"), [
    (["part.safetensors"], "no 'weight_map' object"),
    ({"a.weight": 3, "a.bias": "part.safetensors", "steps": "part.safetensors"}, r"'a\.weight' to 3"),
    ({"a.weight": None}, r"'a\.weight' to None"),
])
def test_malformed_index_is_a_named_error(tmp_path: Path, weight_map: object, needle: str) -> None:
    folder = sharded_checkpoint(tmp_path / "ckpt", weight_map)
    with pytest.raises(ValueError, match=needle):
        load(folder)
    (folder / INDEX_FILE).write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(folder)


def test_integer_checkpoint_into_float_parameter_is_refused_by_key(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in Small().state_dict().items()}
    (tmp_path / "ckpt").mkdir()
    save_file({**state, "a.weight": torch.tensor([[1, 4, 2], [0, 3, 5]])}, tmp_path / "ckpt" / SINGLE_FILE)
    model = Small()
    before = model.a.weight.detach().clone()
    with pytest.raises(ValueError, match=r"lossy dtype for 'a\.weight'.*torch\.int64.*torch\.float32"):
        load_model_state(tmp_path / "ckpt", identity_mapper_from_module(model), "cpu", model, show_progress=False)
    assert torch.equal(model.a.weight, before)  # refused before anything was copied
    save_file({**state, "steps": torch.tensor([1.5, 2.0])}, tmp_path / "ckpt" / SINGLE_FILE)  # float into int
    with pytest.raises(ValueError, match=r"lossy dtype for 'steps'"):
        load(tmp_path / "ckpt")


def test_float_to_float_casts_stay(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in Small().state_dict().items()}
    (tmp_path / "ckpt").mkdir()
    weight = torch.randn(2, 3, dtype=torch.float64)
    save_file({**state, "a.weight": weight}, tmp_path / "ckpt" / SINGLE_FILE)
    model = Small()
    load_model_state(tmp_path / "ckpt", identity_mapper_from_module(model), "cpu", model, show_progress=False)
    torch.testing.assert_close(model.a.weight.detach(), weight.float())


def test_check_finite_names_the_first_bad_key() -> None:
    model = Small()
    check_finite(model)  # a finite model passes
    with torch.no_grad():
        model.a.bias[1] = float("inf")
        with pytest.raises(ValueError, match=r"non-finite value .* in 'a\.bias'"):
            check_finite(model)
        model.a.weight[0, 2] = float("nan")
        with pytest.raises(ValueError, match=r"'a\.weight'"):
            check_finite(model)


def test_destination_that_is_a_file_is_refused_before_writing(tmp_path: Path) -> None:
    dest = tmp_path / "model.bin"
    dest.write_text("precious")
    with pytest.raises(ValueError, match="existing file"):
        save_model_state(dest, None, Small(), show_progress=False)
    assert dest.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


@pytest.mark.parametrize("dest", [".", "..", "./"])
def test_destination_holding_the_working_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               dest: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="working directory"):
        save_model_state(dest, None, Small(), show_progress=False)
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert not temporary_sibling(work).exists()


def test_config_is_written_into_the_export(tmp_path: Path) -> None:
    save_model_state(tmp_path / "a", None, Small(), show_progress=False, config={"model_type": "small", "n": 2})
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == {"model_type": "small", "n": 2}
    with pytest.raises(TypeError, match="config"):
        save_model_state(tmp_path / "b", None, Small(), show_progress=False, config=3)
    assert not (tmp_path / "b").exists()


def test_export_with_config_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    save_model_state(tmp_path / "out", None, model, show_progress=False, config=model.config)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 32, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits)


def test_peft_adapter_destination_that_is_a_file_or_the_working_directory_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from d9d.peft import inject_peft_and_freeze
    from d9d.peft.lora import LoRA, LoRAConfig, LoRAParameters
    from d9d.peft.lora.peft_format import save_peft_adapter

    model = Small()
    inject_peft_and_freeze(LoRA(LoRAConfig(module_name_pattern=re.compile("a"), params=LoRAParameters(r=1, alpha=1))),
                           model)
    dest = tmp_path / "adapter"
    dest.write_text("precious")
    with pytest.raises(ValueError, match="existing file"):
        save_peft_adapter(model, dest)
    assert dest.read_text() == "precious"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="working directory"):
        save_peft_adapter(model, ".")
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "work"]
