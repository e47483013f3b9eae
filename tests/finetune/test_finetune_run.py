"""The fine-tune command end to end under torchrun: loss falls, exports reproduce, resume is exact."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from d9d.finetune.config import default_peft_config
from tests.finetune.runner import SMALL_MODEL, finetune, summary, write_config

pytestmark = pytest.mark.distributed


def test_default_run_two_processes(tmp_path):
    """The default config (only shortened): loss falls, PEFT adapter and merged export reproduce the model."""
    work = tmp_path / "run"
    config = write_config(tmp_path / "cfg.json", {"work_dir": str(work), "steps": 12, "log_interval": 4})
    out = finetune(config).stdout
    s = summary(work)
    assert s["world_size"] == 2
    assert s["last_loss"] < s["first_loss"] - 0.5, s["losses"]
    assert "step 12/12" in out
    assert [r["ok"] for r in s["reproduction"]] == [True, True], s["reproduction"]
    adapter = work / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert "lm_head" in adapter_config["target_modules"]
    merged = work / "merged"
    assert (merged / "model.safetensors.index.json").is_file() or (merged / "model.safetensors").is_file()
    assert (merged / "config.json").is_file()
    assert (merged / "tokenizer_config.json").is_file()
    base_files = list((work / "base_model").glob("model-*.safetensors"))
    assert len(base_files) > 1  # the generated base checkpoint is sharded

    # The PEFT adapter imports back into a fresh sharded model: it starts where the first run ended.
    again = tmp_path / "again"
    config = write_config(tmp_path / "again.json", {
        "work_dir": str(again), "steps": 1, "init_adapter_dir": str(adapter), "export": {"verify": False},
        "model": {"kind": "local", "path": str(work / "base_model")},
    })
    finetune(config)
    assert summary(again)["first_loss"] < s["first_loss"] - 0.5


def _adapter(work) -> dict[str, torch.Tensor]:
    return load_file(str(work / "adapter" / "adapter_model.safetensors"))


def test_resume_matches_uninterrupted_run(tmp_path):
    base = {"model": SMALL_MODEL, "steps": 6, "data": {"seq_len": 32, "global_batch_size": 4},
            "export": {"verify": False}, "checkpoint": {"interval": 3}}
    straight = tmp_path / "straight"
    finetune(write_config(tmp_path / "a.json", {**base, "work_dir": str(straight)}))

    resumed = tmp_path / "resumed"
    cfg = write_config(tmp_path / "b.json", {**base, "work_dir": str(resumed)})
    finetune(cfg, "--steps", "3")
    assert summary(resumed)["losses"].keys() == {"0", "1", "2"}
    finetune(cfg, "--resume")
    s = summary(resumed)
    assert s["start_step"] == 3
    assert s["losses"].keys() == {"3", "4", "5"}
    straight_losses = summary(straight)["losses"]
    for step, loss in s["losses"].items():
        assert loss == pytest.approx(straight_losses[step], abs=1e-5)

    expected, got = _adapter(straight), _adapter(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(expected[next(k for k in expected if "lora_B" in k)], torch.zeros(1))

    # A fresh run into a folder holding another run's checkpoints is refused, not silently mixed with them.
    refused = finetune(cfg, nproc=None, expect_rc=1)
    assert "already holds checkpoints" in refused.stderr
    assert "--resume" in refused.stderr

    # Resuming a finished run trains nothing, says so, and exports what it has; a newer incomplete checkpoint
    # folder is skipped with a warning naming it.
    (resumed / "checkpoints" / "step_00000099").mkdir()
    again = finetune(cfg, "--resume", nproc=None)
    assert "warning: skipping an incomplete checkpoint: checkpoint" in again.stdout
    assert "step_00000099' has no checkpoint.json" in again.stdout
    assert "resumed from" in again.stdout
    assert "step_00000006 at step 6" in again.stdout
    assert "nothing to train" in again.stdout
    assert summary(resumed)["losses"] == {}

    # A resume with another LoRA rank: one line, printed once, naming the parameter, both shapes and the field.
    peft = default_peft_config().model_dump(mode="json")
    peft["methods"][0]["params"]["r"] = 4
    changed = write_config(tmp_path / "c.json", {**base, "work_dir": str(resumed), "peft": peft})
    err = finetune(changed, "--resume", expect_rc=1).stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "'model.layers.0.self_attn.q_proj.lora_A' has shape (8, 64) in the checkpoint but (4, 64) in the " \
           "model; the PEFT config changed: peft.methods[0].params.r: 8 in the checkpoint, 4 now" in errors[0]
    assert "CheckpointException" not in err

    # A NaN in the pretrained checkpoint stops the run after the load, naming the key, before any step.
    broken = tmp_path / "broken_base"
    shutil.copytree(straight / "base_model", broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    nan_cfg = write_config(tmp_path / "nan.json", {**base, "work_dir": str(tmp_path / "nan"),
                                                   "model": {"kind": "local", "path": str(broken)}})
    failed = finetune(nan_cfg, nproc=None, expect_rc=1)
    assert f"non-finite value (NaN or Inf) in '{key}'" in failed.stderr
    assert not (tmp_path / "nan" / "summary.json").exists()


@pytest.mark.local
def test_pretrained_bert_masked_lm_single_process(tmp_path):
    """The packaged all-MiniLM-L6-v2 (tied embeddings, MLM head added) trains and exports with plain python."""
    work = tmp_path / "mlm"
    config = write_config(tmp_path / "mlm.json", {
        "work_dir": str(work), "model": {"kind": "packaged_minilm"}, "steps": 4, "log_interval": 2,
        "data": {"seq_len": 32, "global_batch_size": 2},
    })
    finetune(config, nproc=None)
    s = summary(work)
    assert s["world_size"] == 1
    assert s["last_loss"] < s["first_loss"], s["losses"]
    assert [r["ok"] for r in s["reproduction"]] == [True, True], s["reproduction"]
    merged_config = json.loads((work / "merged" / "config.json").read_text())
    assert merged_config["architectures"] == ["BertForMaskedLM"]
    assert merged_config["tie_word_embeddings"] is False
