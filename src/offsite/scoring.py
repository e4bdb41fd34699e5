"""Scoring a model: perplexity on text, accuracy on choice tasks (lm-eval's log-likelihood method)."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offsite.data.classified import classifier_items, collate_classified
from offsite.data.tokens import IGNORE, Sequence, collate, encode_pair, lm_sequences, token_log_probs
from offsite.data.types import ChoiceData, ChoiceExample, Data, LabelledData, TextData
from offsite.errors import OffsiteError
from offsite.heads import model_labels
from offsite.loading import pad_id


def batches(lengths: list[int], batch_size: int, batch_tokens: int | None = None) -> list[list[int]]:
    """Indices into `lengths`, longest first (so padding is small), cut into batches.

    `batch_tokens`: each batch holds as many sequences as fit that many padded tokens (at least
    one), instead of `batch_size` sequences.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if batch_tokens is None:
        return [order[start: start + batch_size] for start in range(0, len(order), batch_size)]
    chunks: list[list[int]] = []
    while order:
        count = max(1, batch_tokens // lengths[order[0]])  # the first is the longest: it sets the padded width
        chunks.append(order[:count])
        order = order[count:]
    return chunks


@torch.no_grad()
def sequence_scores(model: PreTrainedModel, sequences: list[Sequence], pad_id: int, batch_size: int,
                    desc: str, batch_tokens: int | None = None) -> list[tuple[float, int]]:
    """(sum of log-probs of the scored tokens, number scored) for each sequence, in order."""
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    chunks = batches([len(s.input_ids) for s in sequences], batch_size, batch_tokens)
    for chunk in tqdm(chunks, desc=desc, leave=False, unit="batch"):
        batch = {name: value.to(model.device) for name, value in collate([sequences[i] for i in chunk], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores = token_log_probs(logits, batch["labels"]).sum(-1)
        counts = (batch["labels"] != IGNORE).sum(-1)
        for row, index in enumerate(chunk):
            results[index] = (float(scores[row]), int(counts[row]))
    return results


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: TextData,
               seq_len: int, batch_size: int, batch_tokens: int | None = None) -> dict[str, Any]:
    """Token-weighted perplexity over non-overlapping windows of `seq_len` tokens."""
    sequences = lm_sequences(tokenizer, data.texts, seq_len)
    if not sequences:
        raise OffsiteError(f"{data.source}: the text is too short to score (needs at least 2 tokens)")
    scores = sequence_scores(model, sequences, tokenizer.pad_token_id, batch_size, "perplexity", batch_tokens)
    total, count = sum(s for s, _ in scores), sum(n for _, n in scores)
    if not math.isfinite(total):
        raise OffsiteError(f"{data.source}: the model's log-likelihood is not finite ({total}); its weights or "
                           "activations overflow, so there is no perplexity to report")
    loss = -total / count
    if loss > math.log(sys.float_info.max):  # exp would overflow: no number to print, not even in JSON
        raise OffsiteError(f"{data.source}: the mean loss is {loss:.1f} nats, so the perplexity is too large to "
                           "represent; the model is broken on this text")
    return {"task": "lm", "n": count, "perplexity": math.exp(loss), "loss": loss}


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
    device = model.device
    out = model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,) predicts each choice's first token
    scores = [float(first[c[0]]) for c in continuations]
    if width == 1:
        return scores
    cache = out.cache
    cache.batch_repeat_interleave(len(continuations))
    batch = {name: value.to(device) for name, value in
             collate([Sequence(c[:-1], c[1:]) for c in continuations], tokenizer.pad_token_id).items()}
    mask = torch.cat([torch.ones(len(continuations), len(context), dtype=torch.long, device=device),
                      batch["attention_mask"]], 1)
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
          batch_size: int, batch_tokens: int | None = None) -> dict[str, Any]:
    """Perplexity for text data, accuracy for choice data (one example at a time: its choices are one batch)."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(data, ChoiceData):
            return choice_accuracy(model, tokenizer, data.examples, seq_len)
        if isinstance(data, LabelledData):
            return classify_accuracy(model, tokenizer, data, seq_len, batch_size)
        return perplexity(model, tokenizer, data, seq_len, batch_size, batch_tokens)
    finally:
        model.train(was_training)


def classify_accuracy(model: PreTrainedModel, preprocessor, data: LabelledData, seq_len: int,
                      batch_size: int) -> dict[str, float | int | str]:
    """Accuracy of the head's most likely label."""
    items = classifier_items(data, preprocessor, seq_len, model_labels(model))
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = collate_classified(items[start: start + batch_size], pad_id(preprocessor))
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            correct += int((logits.argmax(-1).cpu() == labels).sum())
    return {"task": "classify", "n": len(items), "accuracy": correct / len(items)}
