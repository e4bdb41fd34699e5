"""Scoring a model: perplexity on text, accuracy on choice tasks (lm-eval's log-likelihood method)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offsite.adapter import apply, load_adapter
from offsite.bundle import MANIFEST, bundle_index, load_bundle
from offsite.config import EvalConfig
from offsite.data import ChoiceData, ChoiceExample, Data, TextData, read_data
from offsite.errors import OffsiteError
from offsite.loading import load_model, load_tokenizer
from offsite.plug import plug_into
from offsite.tokens import IGNORE, Sequence, choice_sequence, collate, lm_sequences, token_log_probs

log = logging.getLogger(__name__)


@torch.no_grad()
def sequence_scores(model: PreTrainedModel, sequences: list[Sequence], pad_id: int, batch_size: int,
                    desc: str) -> list[tuple[float, int]]:
    """(sum of log-probs of the scored tokens, number scored) for each sequence, in order.

    Sequences are batched longest first so padding is small.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch"):
        chunk = order[start: start + batch_size]
        batch = collate([sequences[i] for i in chunk], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores = token_log_probs(logits, batch["labels"]).sum(-1)
        counts = (batch["labels"] != IGNORE).sum(-1)
        for row, index in enumerate(chunk):
            results[index] = (float(scores[row]), int(counts[row]))
    return results


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: TextData,
               seq_len: int, batch_size: int) -> dict[str, Any]:
    """Token-weighted perplexity over non-overlapping windows of `seq_len` tokens."""
    sequences = lm_sequences(tokenizer, data.texts, seq_len)
    if not sequences:
        raise OffsiteError(f"{data.source}: the text is too short to score (needs at least 2 tokens)")
    scores = sequence_scores(model, sequences, tokenizer.pad_token_id, batch_size, "perplexity")
    total, count = sum(s for s, _ in scores), sum(n for _, n in scores)
    return {"task": "lm", "n": count, "perplexity": math.exp(-total / count), "loss": -total / count}


def choice_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[ChoiceExample],
                    seq_len: int, batch_size: int) -> dict[str, Any]:
    """Accuracy by summed continuation log-likelihood, and by log-likelihood per byte (acc_norm)."""
    pairs = [(ex, choice) for ex in examples for choice in ex.choices]
    sequences = [choice_sequence(tokenizer, ex.context, choice, seq_len) for ex, choice in pairs]
    scores = iter(sequence_scores(model, sequences, tokenizer.pad_token_id, batch_size, "choices"))
    correct = correct_norm = 0
    for ex in examples:
        loglik = [next(scores)[0] for _ in ex.choices]
        per_byte = [ll / max(len(c.encode()), 1) for ll, c in zip(loglik, ex.choices)]
        correct += int(max(range(len(loglik)), key=loglik.__getitem__) == ex.label)
        correct_norm += int(max(range(len(per_byte)), key=per_byte.__getitem__) == ex.label)
    n = len(examples)
    return {"task": "choice", "n": n, "accuracy": correct / n, "accuracy_norm": correct_norm / n}


def score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: Data, seq_len: int,
          batch_size: int) -> dict[str, Any]:
    """Perplexity for text data, accuracy for choice data."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(data, ChoiceData):
            return choice_accuracy(model, tokenizer, data.examples, seq_len, batch_size)
        return perplexity(model, tokenizer, data, seq_len, batch_size)
    finally:
        model.train(was_training)


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the scored positions; labels are already shifted (see tokens.Sequence)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def load_for_eval(model_path: str, adapter_path: str | None) -> PreTrainedModel:
    """A full model, bundle or plugged model, with an adapter file applied in memory if given."""
    is_bundle = (Path(model_path) / MANIFEST).is_file()
    if not is_bundle:
        model = load_model(model_path)
        if adapter_path:
            plug_into(model, load_adapter(adapter_path), adapter_path)
        return model
    model, manifest = load_bundle(model_path)
    if adapter_path:
        adapter = load_adapter(adapter_path)
        if adapter.fingerprint != manifest.fingerprint:
            raise OffsiteError(
                f"adapter {adapter_path} was not trained for bundle {model_path}: fingerprints "
                f"{adapter.fingerprint[:16]}… and {manifest.fingerprint[:16]}… differ"
            )
        apply(model, adapter, bundle_index(manifest), adapter_path)
    return model


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Score `config.model` (optionally with `config.adapter`) on `config.data`."""
    data = read_data(config.data)
    if config.limit is not None:
        data = _limit(data, config.limit)
    model = load_for_eval(config.model, config.adapter)
    tokenizer = load_tokenizer(config.model)
    return score(model, tokenizer, data, config.seq_len, config.batch_size)


def _limit(data: Data, limit: int) -> Data:
    if isinstance(data, ChoiceData):
        return ChoiceData(data.examples[:limit], data.source)
    return TextData(data.texts[:limit], data.source)
