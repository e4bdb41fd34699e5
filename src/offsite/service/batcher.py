"""Requests of many customers batched into one forward pass of the shared full model.

Each request is one sequence and the adapter it runs through. A worker thread takes the first waiting
request, gathers what else arrives within `wait` seconds (up to `max_batch` sequences), runs them as one
right-padded batch through `MultiAdapterModel.logits`, and answers each request with what it asked for:
the summed log-probability of its scored tokens, or its next token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from offsite.data.tokens import IGNORE, Sequence, collate, sequence_totals
from offsite.service.routing import MultiAdapterModel

log = logging.getLogger(__name__)


@dataclass
class Job:
    sequence: Sequence  # labels IGNORE everywhere for a next-token job
    adapter: str | None
    next_token: bool
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, multi: MultiAdapterModel, pad_id: int, max_batch: int = 16, wait: float = 0.005):
        self.multi, self.pad_id, self.max_batch, self.wait = multi, pad_id, max_batch, wait
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batches = self.sequences = 0  # served so far (the load test reads them)
        self.worker = threading.Thread(target=self._run, name="offsite-batcher", daemon=True)
        self.worker.start()

    def score(self, input_ids: list[int], labels: list[int], adapter: str | None) -> Future:
        """Future of (summed log-probability of the labelled tokens, whether each is the greedy choice)."""
        return self._submit(Job(Sequence(input_ids, labels), adapter, False))

    def next_token(self, input_ids: list[int], adapter: str | None) -> Future:
        """Future of (the greedy next token, its log-probability)."""
        return self._submit(Job(Sequence(input_ids, [IGNORE] * len(input_ids)), adapter, True))

    def _submit(self, job: Job) -> Future:
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(job)
            self._answer(batch)

    def _answer(self, batch: list[Job]) -> None:
        try:
            inputs = collate([job.sequence for job in batch], self.pad_id)
            device = self.multi.model.device
            logits = self.multi.logits(inputs["input_ids"].to(device), inputs["attention_mask"].to(device),
                                       [job.adapter for job in batch]).float()
            self.batches, self.sequences = self.batches + 1, self.sequences + len(batch)
        except Exception as error:  # noqa: BLE001 - every waiting request learns of it
            for job in batch:
                job.future.set_exception(error)
            return
        totals, greedy = sequence_totals(logits, inputs["labels"].to(logits.device))
        for row, job in enumerate(batch):
            if job.next_token:
                last = torch.log_softmax(logits[row, len(job.sequence.input_ids) - 1], -1)
                token = int(last.argmax())
                job.future.set_result((token, float(last[token])))
            else:
                job.future.set_result((float(totals[row]), bool(greedy[row])))
