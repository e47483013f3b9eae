"""Launching ``python -m d9d.finetune`` under torchrun (or plain python) from tests."""

import json
import subprocess
import sys
from pathlib import Path

from tests.torchrun import run_checked, torchrun_command

TIMEOUT_S = 240

# A small generated model and short sequences: a few seconds per step on two CPU cores.
SMALL_MODEL = {"kind": "generated_llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
               "intermediate_size": 128, "max_shard_size_mb": 2.0}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config, indent=2))
    return path


def finetune(config: Path, *args: str, nproc: int | None = 2, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Runs the fine-tune CLI; ``nproc=None`` runs it with plain python (world size 1)."""
    target = ["-m", "d9d.finetune", "--config", str(config), *args]
    cmd = [sys.executable, *target] if nproc is None else torchrun_command(target, nproc=nproc)
    return run_checked(cmd, TIMEOUT_S, expect_rc=expect_rc, env={"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})


def summary(work_dir: Path) -> dict:
    return json.loads((work_dir / "summary.json").read_text())
