"""The example configs for DoRA and embedding LoRA, shortened, under torchrun: loss falls and the exports reproduce."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.finetune.runner import SMALL_MODEL, finetune, summary, write_config

pytestmark = pytest.mark.distributed

CONFIGS = Path(__file__).parents[2] / "configs"


# DoRA on two ranks (the magnitude's init after the sharded load); the embedding config in one process (its sharded
# path is in tests/distributed/test_dora_embedding_sharded.py), to keep the suite fast.
@pytest.mark.parametrize(("name", "key", "nproc"), [("dora.json", "lora_magnitude_vector", 2),
                                                   ("lora_embeddings.json", "embed_tokens.lora_embedding_A", None)])
def test_example_config_trains_and_exports(tmp_path, name, key, nproc):
    config = json.loads((CONFIGS / name).read_text())
    work = tmp_path / "run"
    config.update({"work_dir": str(work), "model": SMALL_MODEL, "steps": 3, "log_interval": 1,
                   "data": {**config["data"], "seq_len": 32, "global_batch_size": 4}})
    finetune(write_config(tmp_path / name, config), nproc=nproc)
    s = summary(work)
    assert s["last_loss"] < s["first_loss"], s["losses"]
    # The PEFT adapter (reloaded by peft) and the merged checkpoint (reloaded by transformers) give the adapted
    # model's outputs.
    assert [r["ok"] for r in s["reproduction"]] == [True, True], s["reproduction"]
    adapter_config = json.loads((work / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is (name == "dora.json")
    assert any(k.endswith(key) for k in load_file(str(work / "adapter" / "adapter_model.safetensors")))
