"""Measuring a stage in a process of its own, so its peak memory is its own."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
from pathlib import Path
from typing import Any, Callable


def current_rss_mb() -> float:
    """This process's resident memory now (0 where /proc is missing)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    return 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory.

    VmHWM belongs to the address space, which exec replaces; getrusage's ru_maxrss
    survives exec, so a spawned child would report its parent's peak if that was higher.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def in_fresh_process(isolate: bool, function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`function(*args)` in a freshly spawned process (or here, without `isolate`)."""
    if not isolate:
        return function(*args)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()
