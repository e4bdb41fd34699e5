"""The memory allocator offsite's training processes run with: tcmalloc where available.

glibc's malloc keeps a training step's freed activations in its heap instead of returning
them, and grows the heap by each step's mix of sizes: on the built-in model an `offsite_lora`
step holds about 350 MB more resident memory than its live tensors. tcmalloc (the
allocator PyTorch's CPU tuning guide recommends) keeps that overhead small and is faster.
Measured with `offsite bench` on the built-in model (README, "Memory"): see there.

An allocator must be chosen before a process starts, so it is set through LD_PRELOAD: the
`offsite` command re-executes itself once with it, and the processes offsite spawns for
its stages inherit it. `--allocator system` (or OFFSITE_ALLOCATOR=system) turns it off.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from pathlib import Path

from offsite.assets import TCMALLOC_PACKAGE, cache_dir
from offsite.errors import OffsiteError

log = logging.getLogger(__name__)

ENV = "OFFSITE_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "system")
LIBRARY = "libtcmalloc_minimal.so.4"
# tcmalloc reports every allocation above 1 GiB on stderr; a full fine-tuning step makes such allocations.
_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}


def requested() -> str:
    choice = os.environ.get(ENV, "auto")
    if choice not in CHOICES:
        raise OffsiteError(f"{ENV}={choice!r} is not known; use one of {', '.join(CHOICES)}")
    return choice


def find_tcmalloc() -> str | None:
    """The tcmalloc library: offsite's cached Debian package, else one the system's linker knows."""
    cached = sorted((cache_dir() / "debs" / TCMALLOC_PACKAGE).glob(f"usr/lib/*/{LIBRARY}"))
    if cached:
        return str(cached[0])
    return ctypes.util.find_library("tcmalloc_minimal")  # a bare soname: the dynamic linker resolves it


def active() -> str:
    """The allocator this process runs with: 'tcmalloc' if that library is mapped, else 'system'."""
    maps = Path("/proc/self/maps")
    if maps.is_file() and "tcmalloc" in maps.read_text():
        return "tcmalloc"
    return "system"


def preload_environment(choice: str | None = None) -> dict[str, str]:
    """Environment variables a new process needs to run with the chosen allocator (empty: none needed)."""
    choice = choice or requested()
    if choice == "system" or active() == "tcmalloc" or not sys.platform.startswith("linux"):
        return {}
    library = find_tcmalloc()
    if library is None:
        if choice == "tcmalloc":
            raise OffsiteError(f"--allocator tcmalloc: {LIBRARY} was not found; run `offsite setup-assets` "
                               f"(it fetches the Debian package {TCMALLOC_PACKAGE}) or install it with your "
                               "package manager, or use --allocator system")
        log.debug("tcmalloc not found; using the system allocator")
        return {}
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    return {"LD_PRELOAD": preload, **_QUIET}
