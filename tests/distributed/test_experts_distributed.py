"""Expert LoRA on a FSDP2-sharded MoE model under torchrun: a per-expert checkpoint loads into the fused layout
through stack + concatenate mappers, experts and adapters are sharded, the merge is shard-local, and the export and
the PEFT adapter both reproduce the adapted model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from d9d.model_state.io import load_model_state
from d9d.model_state.mapper import identity_mapper_from_module
from tests.moe_model import per_expert_state, tiny_moe
from tests.torchrun import torchrun

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("experts")
    base = tiny_moe(seed=5)
    (work / "per_expert").mkdir()
    save_file({k: v.contiguous() for k, v in per_expert_state(base.state_dict()).items()},
              str(work / "per_expert" / "model.safetensors"))
    g = torch.Generator().manual_seed(11)
    torch.save(torch.randint(0, 64, (2, 10), generator=g), work / "eval_tokens.pt")
    torch.save(torch.randint(0, 64, (4, 11), generator=g), work / "train_tokens.pt")
    torchrun([str(Path(__file__).with_name("experts_worker.py")), str(work)], timeout_s=240,
             env={"OMP_NUM_THREADS": "1"})
    return work


def _logits(model, work: Path) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.load(work / "eval_tokens.pt")).logits


def test_per_expert_checkpoint_loads_into_the_sharded_fused_model(run: Path):
    loaded = torch.load(run / "logits.pt")["loaded"]
    torch.testing.assert_close(loaded, _logits(tiny_moe(seed=5), run), rtol=1e-5, atol=1e-5)


def test_experts_and_adapters_are_sharded_along_the_experts_and_the_router_is_frozen(run: Path):
    facts = json.loads((run / "facts.json").read_text())
    assert set(facts["placements"].values()) == {"(Shard(dim=0),)"}
    assert facts["base_placements"] == "(Shard(dim=0),)"
    assert facts["local_experts"] == 2
    assert facts["router_trains"] is False
    assert facts["down_lora_B_moved"] > 0
    assert facts["losses"][0] > facts["losses"][-1]
    assert facts["merged_in_place"] is True


def test_merged_export_reproduces_the_adapted_model(run: Path):
    model = tiny_moe(seed=1)  # other weights: everything must come from the export
    load_model_state(run / "export", identity_mapper_from_module(model), "cpu", model, show_progress=False)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 16, 16)  # the original 3-D layout
    torch.testing.assert_close(_logits(model, run), torch.load(run / "logits.pt")["adapted"], rtol=1e-5, atol=1e-5)


def test_peft_adapter_of_the_sharded_run_reproduces_it_in_peft(run: Path):
    peft_model = peft.PeftModel.from_pretrained(tiny_moe(seed=5), str(run / "adapter"))
    torch.testing.assert_close(_logits(peft_model, run), torch.load(run / "logits.pt")["adapted"],
                               rtol=1e-5, atol=1e-5)
