"""DoRA and embedding LoRA on FSDP2-sharded models under torchrun: init, train step, export and merge."""

import json
from pathlib import Path

import pytest

from tests.torchrun import torchrun

pytestmark = pytest.mark.distributed


def test_dora_and_embedding_lora_on_fsdp2_two_ranks(tmp_path):
    worker = Path(__file__).with_name("dora_embedding_worker.py")
    proc = torchrun([str(worker), str(tmp_path)], timeout_s=180, env={"OMP_NUM_THREADS": "1"})
    assert proc.stdout.count("dora embedding sharded ok") == 2
    assert json.loads((tmp_path / "results.json").read_text()) == {"dora": "ok", "embedding": "ok"}
