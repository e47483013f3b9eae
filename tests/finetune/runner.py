"""Launching ``python -m d9d.finetune`` under torchrun (or plain python) from tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 240

# A small generated model and short sequences: a few seconds per step on two CPU cores.
SMALL_MODEL = {"kind": "generated_llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
               "intermediate_size": 128, "max_shard_size_mb": 2.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config, indent=2))
    return path


def finetune(config: Path, *args: str, nproc: int | None = 2, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Runs the fine-tune CLI; ``nproc=None`` runs it with plain python (world size 1)."""
    if nproc is None:
        cmd = [sys.executable, "-m", "d9d.finetune"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "d9d.finetune"]
    cmd += ["--config", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} timed out after {TIMEOUT_S}s; output:\n{(e.stdout or '')[-3000:]}")
    if proc.returncode != expect_rc:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode} (expected {expect_rc}); output:\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def summary(work_dir: Path) -> dict:
    return json.loads((work_dir / "summary.json").read_text())
