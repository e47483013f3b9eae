"""The fine-tune job on a generated Mixture-of-Experts model (the example config configs/qwen3_moe_expert_lora.json)."""

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.finetune.runner import finetune, summary, write_config

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.distributed


def test_generated_moe_with_expert_and_attention_lora_two_processes(tmp_path):
    """The MoE example config (shortened): expert LoRA + attention LoRA train on 2 processes; the PEFT adapter
    (target_parameters for the experts) and the merged export reproduce the adapted model."""
    example = json.loads((Path(__file__).parents[2] / "configs" / "qwen3_moe_expert_lora.json").read_text())
    work = tmp_path / "run"
    config = write_config(tmp_path / "cfg.json", {
        **example, "work_dir": str(work), "steps": 8, "log_interval": 4,
        "data": {**example["data"], "seq_len": 32, "global_batch_size": 4},
    })
    proc = finetune(config)
    s = summary(work)
    assert s["world_size"] == 2
    # The experts' rank and alpha differ from attention's: PEFT's spurious pattern warning is kept out of the check.
    assert "did not match any targeted module" not in proc.stderr
    assert s["last_loss"] < s["first_loss"], s["losses"]
    assert [r["ok"] for r in s["reproduction"]] == [True, True], s["reproduction"]
    adapter_config = json.loads((work / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_parameters"] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")
    ]
    assert "model.layers.0.self_attn.q_proj" in adapter_config["target_modules"]
    assert set(adapter_config["rank_pattern"]) == set(map(re.escape, adapter_config["target_parameters"]))
    merged = {k: v for f in (work / "merged").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    experts = {k: v for k, v in merged.items() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert len(experts) == 4
    assert all(v.dim() == 3 for v in experts.values())  # the original fused layout
