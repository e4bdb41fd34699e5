"""Turning examples into token sequences and padded batches, shared by training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from offsite.data.types import ChoiceExample

IGNORE = -100  # label of positions that carry no loss


@dataclass(frozen=True)
class Sequence:
    """Token ids and, per position, the id to predict there (IGNORE where nothing is scored)."""

    input_ids: list[int]
    labels: list[int]


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, split the way lm-eval does.

    Encoding the whole string and cutting at the context length keeps the
    tokenizer's merges across the boundary; a trailing space of the context
    belongs to the continuation, as it would in running text.
    """
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    if whole[: len(context_ids)] != context_ids:
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return context_ids, continuation_ids
    return context_ids, whole[len(context_ids):]


def choice_sequence(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, seq_len: int) -> Sequence:
    """Context + continuation with only the continuation scored, cut from the left to `seq_len`.

    labels[t] is the token at t+1 (already shifted), so position t's logits score it.
    """
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = (context_ids + continuation_ids)[-(seq_len + 1):]
    scored = min(len(continuation_ids), len(ids) - 1)
    labels = [IGNORE] * (len(ids) - 1 - scored) + ids[len(ids) - scored:]
    return Sequence(ids[:-1], labels)


def train_choice_sequence(tokenizer: PreTrainedTokenizerBase, example: ChoiceExample, seq_len: int) -> Sequence:
    return choice_sequence(tokenizer, example.context, example.choices[example.label], seq_len)


def lm_sequences(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> list[Sequence]:
    """All texts as one token stream (documents separated by EOS), cut into blocks of `seq_len` predictions."""
    stream: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
    blocks = []
    for start in range(0, max(len(stream) - 1, 0), seq_len):
        window = stream[start: start + seq_len + 1]
        if len(window) >= 2:
            blocks.append(Sequence(window[:-1], window[1:]))
    return blocks


def spread(windows: list[Sequence], count: int) -> list[Sequence]:
    """At most `count` of `windows`, evenly spaced, so a sample covers a whole corpus, not its first documents."""
    return windows[:: max(1, len(windows) // count)][:count]


def collate(sequences: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padded positions are masked and unscored."""
    width = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq.input_ids)
        input_ids[row, :n] = torch.tensor(seq.input_ids)
        labels[row, :n] = torch.tensor(seq.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each scored label, 0 where unscored. logits (B, T, V), labels (B, T) -> (B, T)."""
    scored = labels != IGNORE
    safe = labels.masked_fill(~scored, 0)
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return log_probs * scored


def sequence_totals(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its scored labels, and whether each scored label is the argmax
    (greedy decoding gives it). logits (B, T, V), labels (B, T) -> (B,), (B,)."""
    scored = labels != IGNORE
    greedy = ((logits.argmax(-1) == labels) | ~scored).all(-1)
    return token_log_probs(logits, labels).sum(-1), greedy
