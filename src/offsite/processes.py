"""Measuring a stage in a process of its own, so its peak memory is its own."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import resource
from pathlib import Path
from typing import Any, Callable, Iterator

from transformers.utils import logging as transformers_logging

from offsite import allocator


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status in MB, or None where /proc is missing."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    return None


def current_rss_mb() -> float:
    """This process's resident memory now (0 where /proc is missing)."""
    return _status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory.

    VmHWM belongs to the address space, which exec replaces; getrusage's ru_maxrss
    survives exec, so a spawned child would report its parent's peak if that was higher.
    """
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def in_fresh_process(isolate: bool, function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`function(*args)` in a freshly spawned process (or here, without `isolate`)."""
    if not isolate:
        return function(*args)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_quiet_loading) as pool:
        with _environment(allocator.preload_environment()):  # the process starts on the first submit
            future = pool.submit(function, *args)
        return future.result()


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """`extra` set in os.environ (which spawned processes inherit) for the duration, then restored."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _quiet_loading() -> None:
    """The parent has shown the model loading once; a stage's own process need not show it again."""
    transformers_logging.disable_progress_bar()
