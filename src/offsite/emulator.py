"""How an emulator is made from the full model, and how a bundle's emulator is brought back to life.

The steps of `SplitConfig.method`, in order: choose the kept middle layers
(`uniform` or `similarity`), factorise them (`lowrank`), let them run in place of
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

from offsite.compress import compress, emulator_bytes, rebuild
from offsite.config import EmulateConfig
from offsite.errors import OffsiteError
from offsite.share import collapse, expand, nearest_schedule
from offsite.split import SplitPlan, keep_layers

log = logging.getLogger(__name__)

CALIBRATION_WINDOWS = 16
CALIBRATION_LEN = 256


def calibration_corpus(config: EmulateConfig) -> str:
    corpus = config.split.calibration or (config.distill.corpus if config.distill else None)
    if corpus is None:
        raise OffsiteError("--method similarity measures layer similarity on text: pass --calibration CORPUS "
                           "(a .txt/.jsonl file or a built-in corpus such as austen), or --distill CORPUS")
    return corpus


def choose_layers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: SplitPlan,
                  config: EmulateConfig) -> tuple[SplitPlan, list[int], dict[str, Any]]:
    """(plan with the kept middle layers, the kept layer standing in for each middle layer, what was measured)."""
    middle = list(range(len(plan.bottom), plan.num_layers - len(plan.top)))
    if config.split.selection == "uniform":
        return plan, nearest_schedule(middle, list(plan.emulator)), {}
    from offsite.data import TextData, read_data
    from offsite.distill import corpus_hash
    from offsite.similarity import select_by_similarity
    from offsite.tokens import lm_sequences
    corpus_name = calibration_corpus(config)
    corpus = read_data(corpus_name, "--calibration")
    if not isinstance(corpus, TextData):
        raise OffsiteError(f"--calibration {corpus_name} is a choice dataset; similarity needs plain text")
    sequences = lm_sequences(tokenizer, corpus.texts, CALIBRATION_LEN)[:CALIBRATION_WINDOWS]
    if not sequences:
        raise OffsiteError(f"--calibration {corpus_name} gives no window of text; it needs more text")
    kept, schedule, cka = select_by_similarity(model, middle, len(plan.emulator), sequences, tokenizer.pad_token_id)
    measured = {"calibration": corpus_name, "calibration_sha256": corpus_hash(corpus), "windows": len(sequences),
                "cka": [[round(v, 4) for v in row] for row in cka]}
    return replace(plan, emulator=tuple(kept)), schedule, measured


def build(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: SplitPlan, config: EmulateConfig,
          corpus, checkpoint: Path) -> tuple[PreTrainedModel, SplitPlan, dict[str, Any]]:
    """The bundle's model (stored form), its final plan and the manifest's `emulator` entry."""
    split = config.split
    plan, schedule, measured = choose_layers(model, tokenizer, plan, config)
    emulator_model = copy.deepcopy(model) if config.distill else model
    keep_layers(emulator_model, plan.kept)
    log.info("bundle keeps layers %s of %d (adapter %s)", list(plan.kept), plan.num_layers, list(plan.adapter))
    stored_emulator = [len(plan.bottom) + i for i in range(len(plan.emulator))]
    info: dict[str, Any] = {"method": split.method, "selection": split.selection, "similarity": measured or None,
                            "share": {"schedule": schedule} if split.shares else None,
                            "compression": None, "distill": None}
    if split.compression == "lowrank":  # factorise first, so distillation can repair the truncation
        info["compression"] = compress(emulator_model, stored_emulator, "lowrank", split.rank_fraction)
    stored = expand(emulator_model, executed_positions(plan, info)) if split.shares else None
    if config.distill:
        from offsite.distill import distill
        info["distill"] = distill(model, emulator_model, tokenizer, executed_plan(plan, info), config.distill,
                                  corpus, checkpoint)
        info["method"] = f"{split.method}+distill"
    if stored is not None:
        collapse(emulator_model, stored)
    if split.compression == "int8":  # after distillation: int8 weights are not trained
        info["compression"] = compress(emulator_model, stored_emulator, "int8", split.rank_fraction)
    info["bytes"] = emulator_bytes(emulator_model, stored_emulator)
    return emulator_model, plan, info


def executed_layers(plan: SplitPlan, info: dict[str, Any]) -> list[int]:
    """The original layer that runs at each position of the model a bundle loads as."""
    middle = info["share"]["schedule"] if info.get("share") else list(plan.emulator)
    return list(plan.bottom) + list(middle) + list(plan.top)


def executed_positions(plan: SplitPlan, info: dict[str, Any]) -> list[int]:
    """The stored position that runs at each executed position."""
    stored = {original: position for position, original in enumerate(plan.kept)}
    return [stored[original] for original in executed_layers(plan, info)]


def executed_plan(plan: SplitPlan, info: dict[str, Any]) -> SplitPlan:
    """With sharing, every middle position runs a layer: distillation aligns the full middle block."""
    if not info.get("share"):
        return plan
    return replace(plan, emulator=tuple(range(len(plan.bottom), plan.num_layers - len(plan.top))))


def load_emulator(bundle: Path, info: dict[str, Any], plan: SplitPlan, in_memory: bool = False) -> PreTrainedModel:
    """A bundle's model as it runs: compressed modules rebuilt, shared layers expanded.

    `in_memory`: see offsite.loading.load_model (compressed bundles are always read into memory).
    """
    from offsite.loading import load_model
    model = (_load_compressed(bundle, info["compression"]) if info.get("compression")
             else load_model(str(bundle), in_memory=in_memory))
    if model.config.num_hidden_layers != len(plan.kept):
        raise OffsiteError(f"bundle {bundle}: config.json has {model.config.num_hidden_layers} layers but "
                           f"its manifest lists {len(plan.kept)}")
    if info.get("share"):
        expand(model, executed_positions(plan, info))
    return model


def _load_compressed(bundle: Path, compression: dict[str, Any]) -> PreTrainedModel:
    """Build the architecture without weights, swap in the compressed modules, then load the stored tensors."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(bundle)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    rebuild(model, compression)
    state = {}
    for path in sorted(bundle.glob("*.safetensors")):
        state.update(load_file(str(path)))
    result = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or empty:
        raise OffsiteError(f"bundle {bundle} does not match its manifest's compression: "
                           f"unexpected tensors {result.unexpected_keys[:5]}, missing {empty[:5]}")
    model.eval()
    return model
