"""Real multi-process runs under torchrun (gloo on the CPU): sharded load, training, merge and export."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from d9d.model_state.io import load_model_state, save_model_state
from d9d.model_state.mapper.adapters import identity_mapper_from_keys, identity_mapper_from_module
from d9d.parallel import find_free_port
from d9d.peft import inject_peft_and_freeze, merge_peft
from d9d.peft.all import peft_method_from_config
from tests.distributed.worker import data, peft_config
from tests.tiny_llama import TinyLlama, TinyLlamaConfig
from tests.torchrun import Launch, wait_all

pytestmark = pytest.mark.distributed

WORKER = ["-m", "tests.distributed.worker"]  # run from the repository root (tests.torchrun does)
TIMEOUT_S = 150
BAD = {  # case -> what its error message must name
    "missing_key": ["layers.1.ffn_norm.weight", "model.safetensors"],
    "unexpected_key": ["layers.0.attention.extra", "model.safetensors"],
    "shape_mismatch": ["layers.0.attention.q_proj.base.weight", "(32, 16)", "(32, 32)"],
    "unlisted_in_index": ["layers.0.attention.stray", "model-00001-of-00007.safetensors"],
    "truncated_file": ["model-00003-of-00007.safetensors"],
    "index_missing_file": ["model-00002-of-00007.safetensors"],
}


def torchrun(work: Path, tag: str, scenarios: list[str], nproc: int = 2, nnodes: int = 1, node_rank: int = 0,
             port: int | None = None, env: dict[str, str] | None = None) -> Launch:
    """Starts the worker with ``scenarios`` in the background; its output goes to ``<work>/<tag>-node<N>.log``."""
    return Launch([*WORKER, str(work), tag, *scenarios], work / f"{tag}-node{node_rank}.log", nproc=nproc,
                  nnodes=nnodes, node_rank=node_rank, port=port, env=env)


def make_bad_checkpoints(base: Path, bad: Path) -> None:
    state = {}
    for f in base.glob("*.safetensors"):
        state.update(load_file(f))
    for case in ("missing_key", "unexpected_key", "shape_mismatch"):
        (bad / case).mkdir(parents=True)
    save_file({k: v for k, v in state.items() if k != "layers.1.ffn_norm.weight"},
              bad / "missing_key" / "model.safetensors")
    save_file({**state, "layers.0.attention.extra.weight": torch.zeros(2)},
              bad / "unexpected_key" / "model.safetensors")
    save_file({**state, "layers.0.attention.q_proj.weight": torch.zeros(32, 16)},
              bad / "shape_mismatch" / "model.safetensors")
    shutil.copytree(base, bad / "truncated_file")
    victim = bad / "truncated_file" / "model-00003-of-00007.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    shutil.copytree(base, bad / "index_missing_file")
    (bad / "index_missing_file" / "model-00002-of-00007.safetensors").unlink()
    shutil.copytree(base, bad / "unlisted_in_index")
    first = bad / "unlisted_in_index" / "model-00001-of-00007.safetensors"
    save_file({**load_file(first), "layers.0.attention.stray": torch.zeros(1)}, first)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every torchrun launch of this module, batched (startup dominates): results land in one folder."""
    work = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    save_model_state(work / "base", None, TinyLlama(), shard_size_gb=20e-6, show_progress=False)  # 7 files
    make_bad_checkpoints(work / "base", work / "bad")

    single = torchrun(work, "ws2", ["train", "mixed_dtype", "bad", "no_reshard", "root_lora"])
    one = torchrun(work, "ws1", ["train"], nproc=1)
    wait_all(single, one, timeout_s=TIMEOUT_S)

    port = find_free_port()
    nodes = [torchrun(work, "nodes2", ["train"], nproc=1, nnodes=2, node_rank=r, port=port) for r in (0, 1)]
    killed = torchrun(work, "atomic", ["export"], env={"D9D_TEST_KILL_RANK": "1"})
    wait_all(*nodes, timeout_s=TIMEOUT_S)
    wait_all(killed, timeout_s=TIMEOUT_S, expect_ok=False)
    left = sorted(str(p.relative_to(work / "atomic")) for p in (work / "atomic").rglob("*"))
    (work / "atomic_killed.json").write_text(json.dumps(left))
    rerun = torchrun(work, "atomic", ["export"])  # same folder: it must clean the stale temporary folder
    wait_all(rerun, timeout_s=TIMEOUT_S)
    return work


def logits_of_export(export: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = TinyLlama()
    load_model_state(export, identity_mapper_from_module(model), "cpu", model, show_progress=False)
    with torch.no_grad():
        return model(tokens)


def eval_tokens() -> torch.Tensor:
    return data(TinyLlamaConfig().vocab)[1]


def load_export(export: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(export.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.mark.parametrize("tag", ["ws2", "nodes2", "ws1", "ws2/no_reshard", "ws2/root_lora"])
def test_export_reproduces_adapted_model(runs: Path, tag: str) -> None:
    adapted = torch.load(runs / tag / "adapted_logits.pt")
    merged = logits_of_export(runs / tag / "export", eval_tokens())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    index = json.loads((runs / tag / "export" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(TinyLlama().state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in TinyLlama().state_dict().values())


def test_sharded_merge_equals_single_process_merge(runs: Path) -> None:
    model = TinyLlama()
    method = peft_method_from_config(peft_config())
    inject_peft_and_freeze(method, model)
    trained = runs / "ws2" / "trained"
    load_model_state(trained, identity_mapper_from_keys(model.state_dict()), "cpu", model, show_progress=False)
    merge_peft(method, model)
    exported = load_export(runs / "ws2" / "export")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(exported[key], value, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("tag", ["ws2", "nodes2"])
def test_world_size_does_not_change_training(runs: Path, tag: str) -> None:
    losses1 = json.loads((runs / "ws1" / "losses.json").read_text())
    losses2 = json.loads((runs / tag / "losses.json").read_text())
    assert losses1[0] > losses1[-1]
    assert losses2 == pytest.approx(losses1, rel=1e-5)
    export1, export2 = load_export(runs / "ws1" / "export"), load_export(runs / tag / "export")
    assert export1.keys() == export2.keys()
    for key in export1:
        torch.testing.assert_close(export2[key], export1[key], rtol=1e-5, atol=1e-5, msg=key)


def test_mixed_dtype_adapters_train_on_bf16_base(runs: Path) -> None:
    results = json.loads((runs / "ws2" / "mixed_dtype.json").read_text())
    for name, r in results.items():
        assert r["lora_dtype"] == "torch.float32", name
        assert r["norm_dtype"] == "torch.bfloat16", name
        assert r["merged_dtype"] == "torch.bfloat16", name
        assert r["adapter_moved"] > 0, name
        assert all(torch.isfinite(torch.tensor(r["losses"]))), name


@pytest.mark.parametrize("rank", [0, 1])
def test_bad_checkpoints_fail_on_every_rank(runs: Path, rank: int) -> None:
    errors = json.loads((runs / "ws2" / f"bad_errors_rank{rank}.json").read_text())
    for case, needles in BAD.items():
        assert errors[case] is not None, f"{case} loaded without error"
        for needle in needles:
            assert needle in errors[case], f"{case}: {needle!r} not in {errors[case]!r}"


def test_killed_export_leaves_no_complete_folder_and_rerun_succeeds(runs: Path) -> None:
    left = json.loads((runs / "atomic_killed.json").read_text())
    assert any(p.startswith(".export.d9d-tmp/model-") for p in left), left  # it died mid-export
    assert not any(p == "export" or p.startswith("export/") for p in left), left
    export = runs / "atomic" / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert {export / f for f in index["weight_map"].values()} == set(export.glob("*.safetensors"))
    assert not list((runs / "atomic").glob(".*d9d-tmp"))
    logits_of_export(export, eval_tokens())  # the rerun's export is complete and loads


def test_merge_after_forward_without_reshard(runs: Path) -> None:
    out = runs / "ws2" / "no_reshard"
    assert json.loads((out / "facts.json").read_text())["gathered_before_merge"]  # the case under test happened
    adapted = torch.load(out / "adapted_logits.pt")
    torch.testing.assert_close(torch.load(out / "merged_model_logits.pt"), adapted, rtol=1e-5, atol=1e-5)
    # Gathered or not after forward, the same training gives the same merged weights.
    exported, reference = load_export(out / "export"), load_export(runs / "ws2" / "export")
    assert exported.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(exported[key], reference[key], rtol=1e-6, atol=1e-6, msg=key)


def test_lora_in_the_root_group_is_merged(runs: Path) -> None:
    out = runs / "ws2" / "root_lora"
    facts = json.loads((out / "facts.json").read_text())
    assert facts["head_in_root_group"]
    assert facts["head_is_lora"] == "LoRALinear"
    assert facts["head_lora_b_moved"] > 0
    base = load_export(runs / "base")["lm_head.weight"]
    assert not torch.allclose(load_export(out / "export")["lm_head.weight"], base)  # the head's update is merged
