"""Timing and memory helpers shared by the benchmark scripts.

- `timed`: best-of-n wall times of several functions, runs interleaved.
- `load`: the machine's load average, printed next to every figure (timings
  on a busy shared machine measure the queue, not the code).
- `peak_memory`: peak resident memory of a function, measured in a fresh
  subprocess: after its setup the process's resident-set high-water mark
  is reset to the current resident memory (Linux: ``echo 5 >
  /proc/self/clear_refs``), the function runs, and the new ``VmHWM``
  (``/proc/self/status``) minus the reset value is what it added. Where the reset is not possible it falls back to
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, whose high-water mark then
  includes the setup's own transients. torch allocates outside Python's
  allocator, so ``tracemalloc`` would miss it; the resident set sees
  everything the process touched.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any


def timed(*fns: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    """Best-of-``repeats`` wall time of each function in seconds, runs interleaved.

    Interleaving exposes every function to the same machine noise; the best
    run is the least disturbed one, as timeit reports.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def once(fn: Callable[[], object]) -> float:
    """Wall time of one call, seconds."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def load() -> str:
    """``load 1.23/1.10/0.95 on 2 cores``: the 1, 5 and 15 minute load averages."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} cores"


def machine() -> str:
    """CPU, core count and torch build, for the header of a benchmark's output."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _measure(setup: Callable[..., Any], work: Callable[[Any], object], args: tuple,
             threads: int | None) -> tuple[int, int]:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    state = setup(*args)
    gc.collect()
    if _reset_peak():
        resident = _status_bytes("VmHWM")  # the peak just reset: the resident memory now
        if resident is not None:
            work(state)
            return resident, (_status_bytes("VmHWM") or resident) - resident
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux and BSD report KiB
    work(state)
    return before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def peak_memory(setup: Callable[..., Any], work: Callable[[Any], object], *args: Any,
                threads: int | None = None) -> tuple[int, int]:
    """Peak memory of ``work(setup(*args))`` in a fresh process: (resident after setup, peak added by work), bytes.

    ``setup`` and ``work`` must be importable module-level functions (the
    subprocess is spawned, not forked, so it starts from a clean heap).
    """
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure, setup, work, args, threads).result()


def mib(n: float) -> str:
    """Bytes as ``123 MiB``."""
    return f"{n / 2**20:,.0f} MiB"
