"""Helpers that the benchmark scripts share: the machine they ran on, interleaved timing and paired ratios, bytes
saved for backward and allocated, and writing a section of BENCHMARKS.md.

The scripts run as ``python scripts/bench_x.py``, which puts ``scripts/`` on ``sys.path``, so they import this
module as ``bench_common`` from any working directory. It loads d9d's compiled extension only when
``cpu_capabilities`` (or ``machine`` on a CPU) asks for the capability of d9d's kernels.
"""

import os
import platform
import random
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch.autograd.profiler_util import EventList

Key = TypeVar("Key", bound=Hashable)

# Environment variables that pin the instruction set of ATen's, MKL's and oneDNN's CPU kernels;
# D9D_CPU_BF16_KERNELS caps d9d's bfloat16 kernels the same way.
CAPABILITY_PINS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "D9D_CPU_BF16_KERNELS")


def cpu_model(fallback: str | None = None) -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one; otherwise ``fallback`` (by default
    ``platform.processor()``, or ``"unknown CPU"`` when that is empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if fallback is not None:
        return fallback
    return platform.processor() or "unknown CPU"


def cpu_family(model: str | None = None) -> str:
    """A short name of the CPU for a section heading: its model name without trademarks, "Processor", "CPU", core
    counts and clock (``"Intel(R) Xeon(R) Processor"`` -> ``"Intel Xeon"``), so that each CPU keeps its own section."""
    name = cpu_model() if model is None else model
    name = re.sub(r"\((R|TM|tm|r)\)", "", name)
    name = re.sub(r"@.*$|\b\d+-Core\b|\bProcessor\b|\bCPU\b", "", name)
    return " ".join(name.split()) or "unknown CPU"


def cpu_capabilities() -> str:
    """``capability <ATen's> (d9d kernels: <d9d's>, bfloat16 products: <AMX, AVX512_BF16 or ATen>)``: what runs on
    this CPU."""
    from d9d.ops._registration import cpu_bfloat16_kernels, cpu_kernels_capability

    return (
        f"capability {torch.backends.cpu.get_cpu_capability()} (d9d kernels: {cpu_kernels_capability()}, "
        f"bfloat16 products: {cpu_bfloat16_kernels()})"
    )


def memory_allocator() -> str:
    """The C allocator behind this process's CPU tensors: a caching one loaded with ``LD_PRELOAD`` (``tcmalloc``,
    ``jemalloc`` or ``mimalloc``), else ``system malloc``.

    PyTorch has no caching allocator of its own on the CPU, and glibc's malloc maps every tensor above 32 MiB (and
    often smaller ones) anew, so each one costs its page faults again; tcmalloc keeps the pages. Steps that keep more
    memory alive (such as LoRA's, which saves each projection's input) fault more.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system malloc"
    return next((name for name in ("tcmalloc", "jemalloc", "mimalloc") if f"lib{name}" in maps), "system malloc")


def allocator_tag() -> str:
    """``", <allocator>"`` for a caching allocator, ``""`` for the system's: the suffix of a CPU section's heading in
    BENCHMARKS.md, so that ``--write`` keeps one section per allocator."""
    allocator = memory_allocator()
    return "" if allocator == "system malloc" else f", {allocator}"


def cpu_section(what: str, *parts: str) -> str:
    """The BENCHMARKS.md heading of a CPU section: ``## <what> (CPU, <cpu family>[, <part>...][, <allocator>])``, one
    per CPU, capability and allocator, so that a run on another machine adds its own section. A run with d9d's
    bfloat16 kernels capped (``D9D_CPU_BF16_KERNELS``) names the kernels that ran, so it does not replace the
    uncapped run's section."""
    if os.environ.get("D9D_CPU_BF16_KERNELS"):
        from d9d.ops._registration import cpu_bfloat16_kernels

        parts = (*parts, f"bfloat16 products: {cpu_bfloat16_kernels()}")
    return f"## {what} ({', '.join(['CPU', cpu_family(), *parts])}{allocator_tag()})"


def minor_page_faults() -> int:
    """Page faults of this process so far that the kernel served without I/O (0 where the OS does not count them)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def machine(device: torch.device) -> str:
    """The device, and on the CPU its model, the capability that ATen and d9d's kernels run (with any pinning) and the
    memory allocator."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    pins = [f"{name}={os.environ[name]}" for name in CAPABILITY_PINS if name in os.environ]
    pinned = f", pinned with {' '.join(pins)}" if pins else ""
    return f"{cpu_model()}, {cpu_capabilities()}{pinned}, {memory_allocator()}"


def time_interleaved(
    steps: Mapping[Key, Callable[[], object]],
    repeats: int,
    warmup: int,
    *,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
    order: random.Random | None = None,
    lead_in: int = 0,
) -> dict[Key, list[float]]:
    """Seconds of each step per repeat, as measured by ``clock``; each repeat times every step once, shuffled.

    First every step runs ``warmup`` times, untimed. The orders come from ``order.sample`` (by default
    ``random.Random(0)``: the same orders on every run). With ``lead_in``, each timed run of a step comes right after
    that many untimed runs of the same step, so that it starts from the state (heap, caches) its own previous run
    left, as in a loop of that step alone, rather than the state another step left. On a CUDA ``device`` it is
    synchronized before and after each timed step, so that the time covers the step's kernels.
    """
    if lead_in < 0:
        raise ValueError(f"lead_in must be at least 0, got {lead_in}")
    for step in steps.values():
        for _ in range(warmup):
            step()
    cuda = torch.device(device) if device is not None else None
    if cuda is not None and cuda.type != "cuda":
        cuda = None
    order = random.Random(0) if order is None else order
    keys = list(steps)
    times: dict[Key, list[float]] = {key: [] for key in keys}
    for _ in range(repeats):
        for key in order.sample(keys, len(keys)):
            for _ in range(lead_in):
                steps[key]()
            if cuda is not None:
                torch.cuda.synchronize(cuda)
            start = clock()
            steps[key]()
            if cuda is not None:
                torch.cuda.synchronize(cuda)
            times[key].append(clock() - start)
    return times


def paired_ratios(times: list[float], base: list[float]) -> list[float]:
    """Time / base time of the same repeat, per repeat."""
    return [t / b for t, b in zip(times, base, strict=True)]


def paired_overhead(times: list[float], base: list[float]) -> float:
    """Median over repeats of time / base time in the same repeat, minus one: robust to slow phases of the machine."""
    return statistics.median(paired_ratios(times, base)) - 1


def overhead_quartiles(times: list[float], base: list[float]) -> tuple[float, float]:
    """First and third quartile over repeats of time / base time in the same repeat, minus one: the noise."""
    ratios = paired_ratios(times, base)
    if len(ratios) < 2:
        return ratios[0] - 1, ratios[0] - 1
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1 - 1, q3 - 1


class SavedBytes:
    """Counts the bytes of the distinct storages that autograd saves for backward inside a ``with`` block.

    Storages of the tensors in ``exclude`` (inputs, parameters) are left out; ``nbytes`` is the total.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, int] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        # Empty storages (address 0) hold no bytes.
        if storage.data_ptr() not in self.excluded and storage.data_ptr() != 0:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())


def cpu_memory_events(fn: Callable[[], object]) -> EventList:
    """The profiler's events of one call of ``fn``, with each op's CPU memory (``self_cpu_memory_usage``: its own
    allocations minus its frees) recorded."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # keep the profiler's start/stop lines out of the table
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return prof.events()


def mib(n: int, *, digits: int = 1, smallest: str = "B") -> str:
    """Bytes in MiB with ``digits`` decimals, or in KiB / B below 1 MiB / 1 KiB, but no smaller unit than ``smallest``
    (B, KiB or MiB)."""
    if n >= 2**20 or smallest == "MiB":
        return f"{n / 2**20:.{digits}f} MiB"
    if n >= 2**10 or smallest == "KiB":
        return f"{n / 2**10:.{digits}f} KiB"
    return f"{n} B"


def command_line(script: str) -> str:
    """The command that ran this process, as ``[LD_PRELOAD=... and the capability pins] python <script> <arguments>``
    (quoted for a shell), for the "Measured with" line."""
    env = [name for name in ("LD_PRELOAD", *CAPABILITY_PINS) if os.environ.get(name)]
    settings = [f"{name}={shlex.quote(os.environ[name])}" for name in env]
    return " ".join([*settings, "python", script, *map(shlex.quote, sys.argv[1:])])


def write_section(path: Path, heading: str, command: str, body: str, *, new_first: bool = False) -> None:
    """Replaces the body of ``heading`` in ``path`` (up to the next ``## ``), leaving other sections as they are.

    A missing section is appended, or with ``new_first`` inserted before the first other section.
    """
    lines = path.read_text().splitlines() if path.exists() else []
    if heading not in lines:
        if new_first:
            first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
            lines[first:first] = [heading, ""]
        else:
            lines += ["", heading]
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = ["", f"Measured with `{command}`.", "", body, ""]
    path.write_text("\n".join([*lines[:start], *new, *lines[end:]]).rstrip("\n") + "\n")
