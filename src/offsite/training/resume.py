"""Resumable tuning: a killed or stopped `offsite tune` resumes, and ends with the same adapter, bit for bit.

Every few steps (and on SIGTERM) the run saves what the next step depends on: the trainable
weights, the optimizer's and the scheduler's state, torch's random state, the best validation
result so far and the metrics written. The data position is the step: the batch stream is
seeded, so the resumed run skips exactly the batches already trained on.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from offsite.checkpoints import (
    load_optimizer,
    load_tensors,
    optimizer_groups,
    optimizer_tensors,
    read_state,
    save_checkpoint,
)

log = logging.getLogger(__name__)

METRICS_COPY = "metrics.jsonl"


@dataclass
class StopRequest:
    requested: bool = False


@dataclass
class Resumable:
    """Where a run keeps its checkpoint, and what must match for a rerun to resume from it."""

    directory: Path
    identity: dict[str, Any]
    every: int | None = None  # steps between checkpoints (default: see trainer._train)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, best: Any,
               metrics_path: Path, scaler: torch.amp.GradScaler | None = None) -> int:
        """Restore the last checkpoint into the run; return its step (0: none, start from the beginning).

        `scaler`: float16's loss scaler, which resumes at the scale it had reached (not the initial 2^16,
        which would cost the resumed run its first steps to overflows)."""
        state = read_state(self.directory, self.identity)
        if state is None:
            return 0
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_tensors(self.directory, "weights").items():
                params[name].copy_(value)
        load_optimizer(optimizer, load_tensors(self.directory, "optimizer"), state["optimizer_groups"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(load_tensors(self.directory, "rng")["torch"])
        best.metric, best.step, best.result = state["best"]["metric"], state["best"]["step"], state["best"]["result"]
        best.weights = load_tensors(self.directory, "best") if state["best"]["step"] is not None else None
        shutil.copyfile(self.directory / METRICS_COPY, metrics_path)
        log.info("resuming training from step %d (%s)", state["step"], self.directory)
        return int(state["step"])

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, best: Any,
             metrics_path: Path, scaler: torch.amp.GradScaler | None = None) -> None:
        tensors = {"weights": {n: p for n, p in model.named_parameters() if p.requires_grad},
                   "optimizer": optimizer_tensors(optimizer), "rng": {"torch": torch.get_rng_state()}}
        if best.weights is not None:
            tensors["best"] = best.weights
        self.directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(metrics_path, self.directory / METRICS_COPY)
        save_checkpoint(self.directory, tensors, {
            "identity": self.identity, "step": step, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "optimizer_groups": optimizer_groups(optimizer),
            "best": {"metric": best.metric, "step": best.step, "result": best.result}})

    @contextlib.contextmanager
    def saved_on_sigterm(self) -> Iterator[StopRequest]:
        """SIGTERM asks the loop to save a checkpoint after the current step and stop."""
        stop = StopRequest()
        if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
            yield stop
            return

        def request(signum, frame):
            stop.requested = True

        previous = signal.signal(signal.SIGTERM, request)
        try:
            yield stop
        finally:
            signal.signal(signal.SIGTERM, previous)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
