"""How the model owner makes an emulator from the full model.

The steps of `SplitConfig.method`, in order: choose the kept middle layers
(`uniform`, `similarity` or `gradient`), factorise them (`lowrank`), let them run in place of
the dropped layers (`share`), distil (optional), quantise (`int8`). Each step is
its own module; this one only orders them and records what was done in the
manifest's `emulator` entry, which is all a loader needs to rebuild the model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offsite.config import EmulateConfig
from offsite.data.read import read_text_corpus
from offsite.data.tokens import lm_sequences, spread
from offsite.data.types import TextData
from offsite.emulator.compress import COMPRESSIONS, compress, emulator_bytes
from offsite.emulator.distill import distill
from offsite.emulator.share import collapse, executed_plan, executed_positions, expand, nearest_schedule
from offsite.emulator.gradient_selection import select_by_gradient
from offsite.emulator.similarity import select_by_similarity
from offsite.emulator.split import SplitPlan
from offsite.emulator.surgery import keep_layers
from offsite.errors import OffsiteError
from offsite.parallel import ONE, Processes

log = logging.getLogger(__name__)

CALIBRATION_WINDOWS = 16
CALIBRATION_LEN = 256
# The gradient selection runs the model forwards and backwards once per candidate layer (hundreds of times):
# fewer, shorter windows, spread over the corpus.
GRADIENT_WINDOWS = 8
GRADIENT_LEN = 128


def calibration_corpus(config: EmulateConfig) -> str:
    corpus = config.split.calibration or (config.distill.corpus if config.distill else None)
    if corpus is None:
        raise OffsiteError(f"--method {config.split.selection} measures the layers on text: pass --calibration "
                           "CORPUS (a .txt/.jsonl file or a built-in corpus such as austen), or --distill CORPUS")
    return corpus


def choose_layers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, plan: SplitPlan,
                  config: EmulateConfig) -> tuple[SplitPlan, list[int], dict[str, Any]]:
    """(plan with the kept middle layers, the kept layer standing in for each middle layer, what was measured)."""
    middle = list(range(len(plan.bottom), plan.num_layers - len(plan.top)))
    if config.split.selection == "uniform":
        return plan, nearest_schedule(middle, list(plan.emulator)), {}
    corpus_name = calibration_corpus(config)
    corpus = read_calibration(corpus_name)
    gradient = config.split.selection == "gradient"
    if gradient:
        sequences = spread(lm_sequences(tokenizer, corpus.texts, GRADIENT_LEN), GRADIENT_WINDOWS)  # across the corpus
    else:
        sequences = lm_sequences(tokenizer, corpus.texts, CALIBRATION_LEN)[:CALIBRATION_WINDOWS]
    if not sequences:
        raise OffsiteError(f"--calibration {corpus_name} gives no window of text; it needs more text")
    measured: dict[str, Any] = {"calibration": corpus_name, "calibration_sha256": corpus.sha256(),
                                "windows": len(sequences)}
    if gradient:
        kept, measured["eliminated"] = select_by_gradient(model, list(plan.bottom), middle, list(plan.top),
                                                          len(plan.emulator), sequences, tokenizer.pad_token_id)
        schedule = nearest_schedule(middle, kept)
    else:
        kept, schedule, cka = select_by_similarity(model, middle, len(plan.emulator), sequences,
                                                   tokenizer.pad_token_id)
        measured["cka"] = [[round(v, 4) for v in row] for row in cka]
    return replace(plan, emulator=tuple(kept)), schedule, measured


def read_calibration(corpus: str) -> TextData:
    return read_text_corpus(corpus, "--calibration", "layer selection")


def streams(config: EmulateConfig) -> bool:
    """Whether the bundle is made from the kept layers alone (no model runs: nothing is distilled or
    measured), so only their tensors need reading: copied as they are, or compressed once loaded."""
    return config.split.selection == "uniform" and not config.distill


def _reduce(model: PreTrainedModel, plan: SplitPlan, config: EmulateConfig, schedule: list[int],
            measured: dict[str, Any]) -> dict[str, Any]:
    """Reduce `model` to the bundle's layers in place; the manifest's `emulator` entry so far."""
    keep_layers(model, plan.kept)
    log.info("bundle keeps layers %s of %d (adapter %s)", list(plan.kept), plan.num_layers, list(plan.adapter))
    if plan.keeps_whole_middle:
        log.warning("the emulator keeps all %d middle layers: this bundle carries the whole full model",
                    len(plan.emulator))
    split = config.split
    return {"method": split.method, "selection": split.selection,
            "similarity": measured if split.selection == "similarity" else None,
            **({"gradient": measured} if split.selection == "gradient" else {}),
            "share": {"schedule": schedule} if split.shares else None, "compression": None, "distill": None,
            "keeps_every_middle_layer": plan.keeps_whole_middle}


def reduce_skeleton(skeleton: PreTrainedModel, plan: SplitPlan, config: EmulateConfig
                    ) -> tuple[SplitPlan, dict[str, Any]]:
    """`build_emulator` for a bundle that `streams`: the weightless model reduced in place, the plan and entry."""
    assert streams(config)
    plan, schedule, measured = choose_layers(skeleton, None, plan, config)
    info = _reduce(skeleton, plan, config, schedule, measured)
    info["bytes"] = emulator_bytes(skeleton, [len(plan.bottom) + i for i in range(len(plan.emulator))])
    return plan, info


def compress_reduced(model: PreTrainedModel, plan: SplitPlan, config: EmulateConfig, info: dict[str, Any]) -> None:
    """What `build_emulator` does after `reduce_skeleton` without distillation: compress the emulator layers
    of `model` (already reduced to the bundle's layers and loaded) in place, and count its bytes again."""
    stored_emulator = [len(plan.bottom) + i for i in range(len(plan.emulator))]
    info["compression"] = compress(model, stored_emulator, config.split.compression, config.split.rank_fraction)
    info["bytes"] = emulator_bytes(model, stored_emulator)


def build_emulator(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: SplitPlan,
                   config: EmulateConfig, corpus: TextData | None, checkpoint: Path,
                   base_fingerprint: str = "", processes: Processes = ONE
                   ) -> tuple[PreTrainedModel, SplitPlan, dict[str, Any]]:
    """The bundle's model (stored form), its final plan and the manifest's `emulator` entry."""
    split = config.split
    plan, schedule, measured = choose_layers(model, tokenizer, plan, config)
    emulator_model = copy.deepcopy(model) if config.distill else model
    info = _reduce(emulator_model, plan, config, schedule, measured)
    stored_emulator = [len(plan.bottom) + i for i in range(len(plan.emulator))]
    compression = COMPRESSIONS[split.compression] if split.compression else None
    if compression and compression.before_distillation:  # e.g. lowrank: distillation repairs the truncation
        info["compression"] = compress(emulator_model, stored_emulator, compression.name, split.rank_fraction)
    stored = expand(emulator_model, executed_positions(plan, info)) if split.shares else None
    if config.distill:
        # A checkpoint left by an interrupted run resumes only into the same full model, split and method.
        placement = processes.placement(config.runtime)
        identity = {"fingerprint": base_fingerprint, "split": split.identity(), "kept": list(plan.kept),
                    "dtype": str(placement.dtype)}
        info["distill"] = distill(model, emulator_model, tokenizer, executed_plan(plan, info), config.distill,
                                  corpus, checkpoint, identity, placement, processes, config.shard_full_model)
        info["method"] = f"{split.method}+distill"
    if stored is not None:
        collapse(emulator_model, stored)
    if compression and not compression.before_distillation:  # e.g. int8: its weights do not train
        info["compression"] = compress(emulator_model, stored_emulator, compression.name, split.rank_fraction)
    info["bytes"] = emulator_bytes(emulator_model, stored_emulator)
    return emulator_model, plan, info
