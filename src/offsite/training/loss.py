"""The training loss: cross-entropy at the scored positions only, with logits computed only there."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offsite.data.tokens import IGNORE
from offsite.training.chunked_loss import CHUNK_LOGITS, chunked_loss, plain_head


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the scored positions; labels are already shifted (see data.tokens.Sequence)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE)


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss of a batch, with logits computed only where a label is scored.

    The head is the most expensive layer of a small model with a large
    vocabulary; a choice task scores one or two positions of each sequence.
    """
    if batch["labels"].dim() == 1:  # a classifier: one label per example (offsite.training.classify)
        return classification_loss(model, batch)
    scored = batch["labels"] != IGNORE  # (B, T)
    if int(scored.sum()) * model.config.vocab_size > CHUNK_LOGITS and plain_head(model):
        return chunked_loss(model, batch, scored)  # e.g. language modelling: a loss on every token
    # Training builds no KV cache: nothing reads it, and checkpointed blocks would fill it twice.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=scored, use_cache=False).logits  # (number scored, V)
    return mean_loss(logits, batch["labels"][scored])


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    return F.cross_entropy(model(**inputs).logits.float(), batch["labels"])
