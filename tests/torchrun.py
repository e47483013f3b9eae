"""Launching ``python -m torch.distributed.run`` (and plain ``python``) from tests: a free port, a timeout, and the
output in the failure message."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from d9d.parallel import find_free_port

TAIL_CHARS = 6000
REPO_ROOT = Path(__file__).parents[1]
"""Every launch runs here, so ``-m tests.<module>`` finds the ``tests`` package without editing ``sys.path``."""


def torchrun_command(args: list[str], nproc: int = 2, nnodes: int = 1, node_rank: int = 0,
                     port: int | None = None) -> list[str]:
    """``python -m torch.distributed.run`` on 127.0.0.1 with ``args`` (a script and its arguments, or ``-m mod``).

    Args:
        args: What torchrun launches.
        nproc: Processes on this node.
        nnodes: Nodes of the job; every node's launch must get the same ``port``.
        node_rank: This launch's node.
        port: The rendezvous port; ``None`` picks a free one (single node).
    """
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port or find_free_port()}",
            *args]


def run_checked(cmd: list[str], timeout_s: float, expect_rc: int = 0,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``cmd`` to completion, capturing its output; fails the test (showing the output) on a timeout or an
    exit status other than ``expect_rc``."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})},
                              check=False, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout_s}s; output:\n{out[-TAIL_CHARS:]}")
    if proc.returncode != expect_rc:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode} (expected {expect_rc}); output:\n"
                    f"{proc.stdout[-TAIL_CHARS:]}\n{proc.stderr[-TAIL_CHARS:]}")
    return proc


def torchrun(args: list[str], timeout_s: float, nproc: int = 2, expect_rc: int = 0,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs a single-node torchrun job to completion (see :func:`run_checked`)."""
    return run_checked(torchrun_command(args, nproc=nproc), timeout_s, expect_rc=expect_rc, env=env)


class Launch:
    """A torchrun job started in the background, its output going to ``log``, so several jobs run at once."""

    def __init__(self, args: list[str], log: Path, nproc: int = 2, nnodes: int = 1, node_rank: int = 0,
                 port: int | None = None, env: dict[str, str] | None = None):
        """Starts the job.

        Args:
            args: What torchrun launches.
            log: The file that receives stdout and stderr.
            nproc: Processes on this node.
            nnodes: Nodes of the job.
            node_rank: This launch's node.
            port: The rendezvous port (shared by every node's launch); ``None`` picks a free one.
            env: Variables added to this process's environment.
        """
        self.cmd = torchrun_command(args, nproc=nproc, nnodes=nnodes, node_rank=node_rank, port=port)
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})}, cwd=REPO_ROOT)

    def output(self) -> str:
        return self.log.read_text()[-TAIL_CHARS:]


def wait_all(*launches: Launch, timeout_s: float, expect_ok: bool = True) -> None:
    """Waits for every launch (killing them all if one outlives ``timeout_s``); fails the test with the log of the
    first one that timed out or, with ``expect_ok``, exited non-zero."""
    for launch in launches:
        try:
            rc = launch.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for other in launches:
                other.proc.kill()
            pytest.fail(f"{' '.join(launch.cmd)} timed out after {timeout_s}s; log:\n{launch.output()}")
        if expect_ok and rc != 0:
            pytest.fail(f"{' '.join(launch.cmd)} exited {rc}; log:\n{launch.output()}")
