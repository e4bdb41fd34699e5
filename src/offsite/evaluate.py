"""Scoring a model: perplexity on text, accuracy on choice tasks (lm-eval's log-likelihood method)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offsite.adapter import apply, load_adapter
from offsite.bundle import MANIFEST, bundle_index, load_bundle
from offsite.chunked_loss import CHUNK_LOGITS, chunked_loss, plain_head
from offsite.config import EvalConfig
from offsite.data import ChoiceData, ChoiceExample, Data, TextData, read_data
from offsite.errors import OffsiteError
from offsite.loading import load_model, load_tokenizer
from offsite.plug import plug_into
from offsite.tokens import IGNORE, Sequence, collate, encode_pair, lm_sequences, token_log_probs

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


@torch.no_grad()
def choice_logliks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, example: ChoiceExample,
                   seq_len: int) -> list[float]:
    """Summed log-likelihood of each choice after the context.

    The shared context runs once; its KV cache is copied for each choice and all
    continuations run as one batch. (lm-eval runs context + choice once per choice.)
    A long context is cut from the left as training cuts it (`tokens.choice_sequence`):
    the longest choice sees exactly the window it was trained with, `seq_len` inputs.
    """
    pairs = [encode_pair(tokenizer, example.context, choice) for choice in example.choices]
    continuations = [continuation for _, continuation in pairs]
    width = max(len(c) for c in continuations)
    context = pairs[0][0][-max(1, seq_len + 1 - width):]
    out = model(input_ids=torch.tensor([context]), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,) predicts each choice's first token
    scores = [float(first[c[0]]) for c in continuations]
    if width == 1:
        return scores
    cache = out.cache
    cache.batch_repeat_interleave(len(continuations))
    batch = collate([Sequence(c[:-1], c[1:]) for c in continuations], tokenizer.pad_token_id)
    mask = torch.cat([torch.ones(len(continuations), len(context), dtype=torch.long), batch["attention_mask"]], 1)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, cache=cache).logits
    rest = token_log_probs(logits, batch["labels"]).sum(-1)
    return [head + float(tail) for head, tail in zip(scores, rest)]


def choice_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[ChoiceExample],
                    seq_len: int) -> dict[str, Any]:
    """Accuracy by summed continuation log-likelihood, and by log-likelihood per byte (acc_norm)."""
    correct = correct_norm = 0
    for ex in tqdm(examples, desc="choices", leave=False, unit="example"):
        loglik = choice_logliks(model, tokenizer, ex, seq_len)
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
            return choice_accuracy(model, tokenizer, data.examples, seq_len)
        return perplexity(model, tokenizer, data, seq_len, batch_size)
    finally:
        model.train(was_training)


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the scored positions; labels are already shifted (see tokens.Sequence)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE)


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss of a batch, with logits computed only where a label is scored.

    The head is the most expensive layer of a small model with a large
    vocabulary; a choice task scores one or two positions of each sequence.
    """
    scored = batch["labels"] != IGNORE  # (B, T)
    if int(scored.sum()) * model.config.vocab_size > CHUNK_LOGITS and plain_head(model):
        return chunked_loss(model, batch, scored)  # e.g. language modelling: a loss on every token
    # Training builds no KV cache: nothing reads it, and checkpointed blocks would fill it twice.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=scored, use_cache=False).logits  # (number scored, V)
    return mean_loss(logits, batch["labels"][scored])


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
    data = read_data(config.data, default_split="test")
    if config.limit is not None:
        data = _limit(data, config.limit)
    model = load_for_eval(config.model, config.adapter)
    tokenizer = load_tokenizer(config.model)
    return score(model, tokenizer, data, config.seq_len, config.batch_size)


def _limit(data: Data, limit: int) -> Data:
    if isinstance(data, ChoiceData):
        return ChoiceData(data.examples[:limit], data.source)
    return TextData(data.texts[:limit], data.source)
