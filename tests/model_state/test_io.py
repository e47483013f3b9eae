"""Single-process tests of checkpoint I/O: layout, validation, streaming load, sharded save, PEFT mapper."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from d9d.model_state.io import INDEX_FILE, SINGLE_FILE, checkpoint_mapper_for, load_model_state, save_model_state
from d9d.model_state.mapper.adapters import identity_mapper_from_keys, identity_mapper_from_module
from d9d.model_state.mapper.leaf import ModelStateMapperRename
from d9d.peft import inject_peft_and_freeze
from d9d.peft.lora import LoRA, LoRAConfig, LoRAParameters

pytestmark = pytest.mark.local


class Stack(nn.Module):
    def __init__(self, layers: int = 12, dim: int = 8, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(10, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.head = nn.Linear(dim, 10, bias=False)
        self.register_buffer("scale", torch.tensor(2.0))
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x) * self.scale


def state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_save_single_file_round_trip(tmp_path: Path) -> None:
    model = Stack()
    save_model_state(tmp_path / "ckpt", None, model, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [SINGLE_FILE]
    fresh = Stack()
    load_model_state(tmp_path / "ckpt", identity_mapper_from_module(fresh), "cpu", fresh, show_progress=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


def test_save_shards_like_hugging_face_with_consecutive_layers(tmp_path: Path) -> None:
    model = Stack()
    layer_bytes = (8 * 8 + 8) * 4
    save_model_state(tmp_path / "ckpt", None, model, shard_size_gb=2 * layer_bytes / 1e9, show_progress=False)
    index = json.loads((tmp_path / "ckpt" / INDEX_FILE).read_text())
    files = sorted({*index["weight_map"].values()})
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert {p.name for p in (tmp_path / "ckpt").glob("*.safetensors")} == set(files)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in model.state_dict().values())
    order = [index["weight_map"][f"layers.{i}.weight"] for i in range(12)]
    assert order == sorted(order)  # natural order: layers.2 before layers.10, two layers per file
    assert index["weight_map"]["layers.2.weight"] == index["weight_map"]["layers.3.weight"]
    for f in files:
        assert (tmp_path / "ckpt" / f).stat().st_size < 2 * layer_bytes + 1024


def test_save_through_a_mapper_and_replace_existing(tmp_path: Path) -> None:
    model = Stack(layers=1)
    renames = {k: f"model.{k}" for k in model.state_dict()}
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    (tmp_path / ".ckpt.d9d-tmp").mkdir()  # a killed run's leftovers
    (tmp_path / ".ckpt.d9d-tmp" / "model-00001-of-00009.safetensors").write_text("junk")
    save_model_state(dest, ModelStateMapperRename(renames), model, show_progress=False)
    assert sorted(p.name for p in dest.iterdir()) == [SINGLE_FILE]
    assert set(state(dest)) == set(renames.values())
    assert not (tmp_path / ".ckpt.d9d-tmp").exists()


def test_tied_weights_saved_once_and_loaded_into_both(tmp_path: Path) -> None:
    model = Stack(layers=1, tied=True)
    save_model_state(tmp_path / "ckpt", None, model, show_progress=False)
    assert "head.weight" not in state(tmp_path / "ckpt")
    fresh = Stack(layers=1, tied=True)
    mapper = checkpoint_mapper_for(fresh, identity_mapper_from_keys([]))
    load_model_state(tmp_path / "ckpt", mapper, "cpu", fresh, show_progress=False)
    torch.testing.assert_close(fresh.head.weight, model.embed.weight)
    # An identity over every key (tied ones twice) still saves: the duplicate is written as its own tensor.
    save_model_state(tmp_path / "both", identity_mapper_from_module(model), model, show_progress=False)
    assert {"head.weight", "embed.weight"} <= set(state(tmp_path / "both"))


def test_load_casts_to_model_dtype(tmp_path: Path) -> None:
    model = Stack(layers=2)
    save_model_state(tmp_path / "ckpt", None, model, show_progress=False)
    fresh = Stack(layers=2).to(torch.bfloat16)
    load_model_state(tmp_path / "ckpt", identity_mapper_from_module(fresh), "cpu", fresh, show_progress=False)
    assert fresh.layers[1].weight.dtype == torch.bfloat16
    torch.testing.assert_close(fresh.layers[1].weight, model.layers[1].weight.to(torch.bfloat16))


def test_checkpoint_mapper_for_loads_original_checkpoint_into_injected_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = Stack(layers=3)
    save_model_state(tmp_path / "ckpt", None, original, shard_size_gb=300e-9, show_progress=False)
    model = Stack(layers=3)
    config = LoRAConfig(module_name_pattern=re.compile(r"layers\.[02]"), params=LoRAParameters(r=2, alpha=4))
    mapper = checkpoint_mapper_for(model, inject_peft_and_freeze(LoRA(config), model))
    load_model_state(tmp_path / "ckpt", mapper, "cpu", model, show_progress=False)
    tokens = torch.arange(6).view(2, 3)
    torch.testing.assert_close(model(tokens), original(tokens), rtol=1e-6, atol=1e-6)
    assert "layers.0.base.bias" in mapper.output_keys()
    assert not any("lora" in k for k in mapper.output_keys())


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    save_model_state(tmp_path / "ckpt", None, Stack(layers=2), shard_size_gb=300e-9, show_progress=False)
    return tmp_path / "ckpt"


def load_fails(path: Path, model: nn.Module, mapper=None) -> str:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_model_state(path, mapper or identity_mapper_from_module(model), "cpu", model, show_progress=False)
    for key, value in model.state_dict().items():  # validated before anything was copied
        assert torch.equal(value, before[key]), key
    return str(info.value)


def test_missing_key_named(ckpt: Path) -> None:
    model = Stack(layers=3)
    message = load_fails(ckpt, model)
    assert "layers.2.weight" in message
    assert INDEX_FILE in message


def test_unexpected_key_named_with_file(ckpt: Path) -> None:
    message = load_fails(ckpt, Stack(layers=1))
    assert "unexpected key" in message
    assert "layers.1.weight" in message
    assert ".safetensors" in message


def test_unproduced_and_unknown_keys_named(ckpt: Path) -> None:
    model = Stack(layers=2)
    keys = [k for k in model.state_dict() if k != "head.weight"]
    mapper = ModelStateMapperRename({**{k: k for k in keys}, "head.weight": "head.w"})
    message = load_fails(ckpt, model, mapper)
    assert "'head.w'" in message
    assert "no mapper group produces: 'head.weight'" in message


def test_shape_mismatch_names_key_and_shapes(ckpt: Path) -> None:
    model = Stack(layers=2)
    model.layers[1] = nn.Linear(8, 4)
    message = load_fails(ckpt, model)
    assert "layers.1.weight" in message
    assert "(8, 8)" in message
    assert "(4, 8)" in message


def test_truncated_file_named(ckpt: Path) -> None:
    victim = sorted(ckpt.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-7])
    assert victim.name in load_fails(ckpt, Stack(layers=2))


def test_index_naming_missing_file(ckpt: Path) -> None:
    victim = sorted(ckpt.glob("model-*.safetensors"))[0]
    victim.unlink()
    assert victim.name in load_fails(ckpt, Stack(layers=2))


def test_tensor_missing_from_its_file(ckpt: Path) -> None:
    index = json.loads((ckpt / INDEX_FILE).read_text())
    index["weight_map"]["ghost"] = sorted(set(index["weight_map"].values()))[0]
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    assert "'ghost'" in load_fails(ckpt, Stack(layers=2))


def test_no_checkpoint(tmp_path: Path) -> None:
    assert str(tmp_path) in load_fails(tmp_path, Stack(layers=1))


def test_single_file_layout_loads(tmp_path: Path) -> None:
    model = Stack(layers=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / SINGLE_FILE)
    fresh = Stack(layers=1)
    load_model_state(tmp_path, identity_mapper_from_module(fresh), "cpu", fresh, show_progress=False)
    torch.testing.assert_close(fresh.head.weight, model.head.weight)


def test_bad_shard_size() -> None:
    with pytest.raises(ValueError, match="shard_size_gb"):
        save_model_state("unused", None, Stack(layers=1), shard_size_gb=0)


def test_loading_into_a_model_left_on_meta_is_refused(tmp_path: Path) -> None:
    save_model_state(tmp_path / "ckpt", None, Stack(layers=2), show_progress=False)
    with torch.device("meta"):
        model = Stack(layers=2)
    with pytest.raises(ValueError, match=r"still on the meta device.*'embed\.weight'.*materialize_model"):
        load_model_state(tmp_path / "ckpt", identity_mapper_from_module(model), "cpu", model, show_progress=False)
