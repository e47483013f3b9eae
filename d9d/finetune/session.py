"""The fine-tune job's process group: created and destroyed in one place, with one line per node and every failure
reported once.

A plain ``python`` run becomes a world of one (an in-memory store; the environment is left alone). Under
``torchrun`` the group comes from its environment. When a rank fails, it records its message in the group's store
(which the launcher hosts, so it outlives the rank): the first rank to record an error prints it, every other
rank stays quiet. A rank that loses contact with its peers asks the store which ranks are still there, so the one
line it prints says which rank died, when that can be known.
"""

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from d9d.parallel import ParallelMesh, init_parallel

FIRST_ERROR_KEY = "d9d/first_error"
ALIVE_PREFIX = "d9d/alive/"
ROLL_CALL_S = 1.0
"""How long a rank that lost its peers waits for the others to answer the roll call."""


class RunFailedError(Exception):
    """A failure already turned into one message; ``print_here`` tells whether this rank is the one to print it."""

    def __init__(self, message: str, print_here: bool):
        super().__init__(message)
        self.message = message
        self.print_here = print_here


@dataclasses.dataclass(frozen=True)
class Session:
    """Where this process runs: the named mesh over all ranks, its device, its rank and the world size."""

    mesh: ParallelMesh
    device: torch.device
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, text: str) -> None:
        """Prints ``text`` on rank 0 only."""
        if self.main:
            print(text, flush=True)


def _ranges(ranks: list[int]) -> str:
    spans, start = [], ranks[0]
    for prev, cur in zip(ranks, [*ranks[1:], None], strict=False):
        if cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(spans)


def announce_nodes(session: Session) -> None:
    """The first local rank of every node prints one line: the node, its ranks and the world (a collective)."""
    node = (os.environ.get("GROUP_RANK", "0"), socket.gethostname())
    everyone: list = [None] * session.world
    dist.all_gather_object(everyone, node)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        ranks = [r for r, other in enumerate(everyone) if other == node]
        nodes = len(set(everyone))
        print(f"[d9d] node {node[0]} ({node[1]}): ranks {_ranges(ranks)} of world size {session.world} on {nodes} "
              f"node(s), device {session.device.type}", flush=True)


def _store():
    # The default group's store: under torchrun the launcher's TCPStore, which outlives a failed rank.
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        return store
    except Exception:  # no group, or the store is gone: report locally
        return None


def _claim_first(message: str) -> bool:
    """Records ``message`` as the job's first error; True if this rank's message is the one recorded."""
    store = _store()
    if store is None:
        return True
    try:
        return store.compare_set(FIRST_ERROR_KEY, "", message).decode() == message
    except Exception:
        return True


def _unanswered_ranks(rank: int, world: int) -> list[int] | None:
    """The ranks that do not answer a roll call through the store within ``ROLL_CALL_S``; None if unknowable."""
    store = _store()
    if store is None:
        return None
    try:
        store.set(f"{ALIVE_PREFIX}{rank}", "1")
        time.sleep(ROLL_CALL_S)
        return [r for r in range(world) if not store.check([f"{ALIVE_PREFIX}{r}"])]
    except Exception:
        return None


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` comes from a collective whose peer died or hung (gloo / NCCL / the store)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(w in text for w in ("gloo", "NCCL", "Connection closed",
                                                                        "Connection reset", "Timed out"))


def _describe(error: BaseException, rank: int, world: int) -> str:
    if not is_communication_error(error):
        return f"rank {rank}: {error}" if world > 1 else str(error)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    missing = _unanswered_ranks(rank, world)
    who = (f"rank(s) {_ranges(missing)} did not answer (dead or hung; their launcher's log says why)" if missing
           else "which rank failed is not known")
    return f"rank {rank} lost contact with the other ranks: {who}. The collective failed with: {first_line}"


@contextlib.contextmanager
def distributed_session(timeout_s: float, dp_replicate: int = 1, tp: int = 1) -> Iterator[Session]:
    """Creates the process group (torchrun's, or a world of one), yields the session, and destroys the group.

    Failures inside are re-raised as :class:`RunFailedError` with a one-line message that exactly one rank prints:
    d9d's own errors (``ValueError``, ``FloatingPointError``) and lost peers (communication errors). Anything else
    propagates unchanged, with its traceback.

    Args:
        timeout_s: How long a collective may wait for the other ranks.
        dp_replicate: Data-parallel replicas of the mesh (see :class:`d9d.parallel.ParallelDims`).
        tp: Tensor-parallel ranks of the mesh.
    """
    created = not dist.is_initialized()
    timeout = timedelta(seconds=timeout_s)
    if created and "RANK" not in os.environ:  # a plain python run: a world of one, as launch_world_size says
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        mesh = init_parallel(dp_replicate=dp_replicate, tp=tp, timeout=timeout)
        device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                  else torch.device("cpu"))
        session = Session(mesh, device, dist.get_rank(), dist.get_world_size())
        try:
            yield session
        except (ValueError, FloatingPointError, RuntimeError) as e:
            if not (isinstance(e, ValueError | FloatingPointError) or is_communication_error(e)):
                raise
            message = _describe(e, session.rank, session.world)
            raise RunFailedError(message, _claim_first(message)) from e
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
