"""FedBiOT's server step: after a round, the model owner re-aligns the emulator with the global adapter in the loop.

The emulator layers are re-distilled (the distillation of `offsite align`) on the model owner's
public corpus, with the round's global adapter in both the full model and the bundle, so that the
bundle with this adapter behaves like the full model with it. The new emulator weights travel to
the data owners with the next round's adapter, and they train through them; they never send
emulator weights back. Each round's distillation starts from the previous round's emulator.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from offsite.api import check_alignable, distill_placement
from offsite.config import FederateConfig
from offsite.emulator.distill import distill, read_corpus, read_heldout
from offsite.exchange.adapter import Adapter, apply, extract, plug_into
from offsite.exchange.bundle import bundle_index, emulator_positions, open_bundle
from offsite.federation.updates import flat
from offsite.loading import check_window, load_model

log = logging.getLogger(__name__)

# What rounds.jsonl keeps of each alignment's summary
LOGGED = ("steps", "seconds", "final_kd", "final_kl", "heldout_standin_error_before", "heldout_standin_error_best",
          "best_step")


class Aligner:
    """The model owner's full model and own copy of the bundle, re-aligned after every round."""

    def __init__(self, config: FederateConfig) -> None:
        assert config.alignment is not None and config.model is not None  # FederateConfig checks both
        self.settings = config.alignment
        self.corpus = read_corpus(self.settings)  # a bad corpus fails before the first round
        read_heldout(self.settings)
        self.placement = distill_placement(config.runtime)
        self.student, self.tokenizer, self.manifest = open_bundle(config.bundle, in_memory=True)
        check_alignable(self.manifest, config.bundle)
        check_window(self.student.config, self.settings.seq_len, "--distill-seq-len")
        log.info("loading full model %s for the per-round alignment", config.model)
        self.full = load_model(config.model)
        self.positions = bundle_index(self.manifest)
        self.checked = False

    def __call__(self, server_round: int, adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The emulator re-aligned with `adapter` (by bundle position, as `api.tune` takes it) and a summary."""
        if self.checked:
            apply(self.full, adapter, {i: i for i in adapter.layers}, "the global adapter")
        else:  # checked once: the fingerprint and layers do not change between rounds
            plug_into(self.full, adapter, "the global adapter", self.manifest.plan.adapter)
            self.checked = True
        apply(self.student, adapter, self.positions, "the global adapter")
        settings = dataclasses.replace(self.settings, seed=self.settings.seed + server_round)  # fresh windows
        with tempfile.TemporaryDirectory(prefix="offsite-align-") as scratch:  # nothing to resume across rounds
            summary = distill(self.full, self.student, self.tokenizer, self.manifest.plan, settings, self.corpus,
                              Path(scratch) / "checkpoint", placement=self.placement)
        log.info("round %d: emulator re-aligned in %.0f s (held-out stand-in error %s -> %s)", server_round,
                 summary["seconds"], _rounded(summary.get("heldout_standin_error_before")),
                 _rounded(summary.get("heldout_standin_error_best")))
        emulator = flat(extract(self.student, emulator_positions(self.manifest)))
        return emulator, {key: summary.get(key) for key in LOGGED}


def _rounded(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
