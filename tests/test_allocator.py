"""The allocator choice: which library a new process preloads, and that spawned processes really run with it."""

import os
import subprocess
import sys

import pytest

from offsite import allocator
from offsite.errors import OffsiteError
from offsite.processes import in_fresh_process

FOUND = allocator.find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(FOUND is None or allocator.active() == "tcmalloc",
                                    reason="tcmalloc not installed (`offsite setup-assets` fetches it), or already "
                                           "preloaded here")


def _allocator_of_this_process() -> dict[str, str]:
    return {"allocator": allocator.active()}


def test_system_needs_no_preload():
    assert allocator.preload_environment("system") == {}


def test_missing_tcmalloc_is_an_error_only_when_asked_for(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.preload_environment("auto") == {}
    with pytest.raises(OffsiteError, match="setup-assets"):
        allocator.preload_environment("tcmalloc")


def test_preload_keeps_the_users_own(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "active", lambda: "system")
    monkeypatch.setenv("LD_PRELOAD", "/lib/mine.so")
    assert allocator.preload_environment("auto")["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4 /lib/mine.so"


def test_unknown_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(OffsiteError, match=f"{allocator.ENV}='jemalloc'"):
        allocator.requested()


@needs_tcmalloc
@pytest.mark.parametrize("choice", ["tcmalloc", "system"])
def test_spawned_processes_run_with_the_choice(monkeypatch, choice):
    monkeypatch.setenv(allocator.ENV, choice)
    before = os.environ.get("LD_PRELOAD")
    assert in_fresh_process(True, _allocator_of_this_process) == {"allocator": choice}
    assert os.environ.get("LD_PRELOAD") == before  # this process's environment is restored after the spawn


@needs_tcmalloc
@pytest.mark.parametrize("choice", ["tcmalloc", "system"])
def test_the_command_restarts_itself_with_the_allocator(tmp_path, choice):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
    result = subprocess.run([sys.executable, "-m", "offsite.cli", "--debug", "--allocator", choice, "info",
                             str(tmp_path / "nothing")], capture_output=True, text=True, env=env)
    assert f"allocator: {choice}" in result.stderr
