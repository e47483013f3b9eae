"""The fine-tune job with each ``parallel`` setting (HSDP, tensor parallelism, both) under torchrun: it trains, and
the merged export and the PEFT adapter reload in transformers / PEFT and reproduce the adapted model."""

import json

import pytest

from tests.finetune.runner import SMALL_MODEL, TIMEOUT_S, summary, write_config
from tests.torchrun import Launch, wait_all

pytestmark = pytest.mark.distributed

SETTINGS = {  # name -> (processes, parallel)
    "hsdp": (2, {"dp_replicate": 2}),
    "tp": (2, {"tp": 2}),
    "tp_hsdp": (4, {"dp_replicate": 2, "tp": 2}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Every setting launched at once (a few steps each, the default PEFT stack with dropout)."""
    root = tmp_path_factory.mktemp("finetune_parallel")
    launches = []
    for name, (nproc, parallel) in SETTINGS.items():
        config = write_config(root / f"{name}.json", {
            "work_dir": str(root / name), "model": SMALL_MODEL, "steps": 3, "log_interval": 1,
            "data": {"seq_len": 32, "global_batch_size": 4}, "parallel": parallel,
        })
        launches.append(Launch(["-m", "d9d.finetune", "--config", str(config)], root / f"{name}.log", nproc=nproc,
                               env={"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}))
    wait_all(*launches, timeout_s=2 * TIMEOUT_S)
    return root


@pytest.mark.parametrize("name", list(SETTINGS))
def test_finetune_runs_with_parallel_setting(runs, name: str) -> None:
    nproc, parallel = SETTINGS[name]
    s = summary(runs / name)
    assert s["world_size"] == nproc
    assert s["last_loss"] < s["first_loss"], s["losses"]
    assert [r["ok"] for r in s["reproduction"]] == [True, True], s["reproduction"]
    log = (runs / f"{name}.log").read_text()
    replicas, tp = parallel.get("dp_replicate", 1), parallel.get("tp", 1)
    assert f"dp_replicate {replicas} x dp_shard {nproc // (replicas * tp)} x tp {tp}" in log
    assert f"({4 * tp // nproc} per data-parallel rank)" in log
    merged = json.loads((runs / name / "merged" / "config.json").read_text())
    assert merged["architectures"] == ["LlamaForCausalLM"]
