"""Chunked cross-entropy through the frozen head: the plain loss and gradients, one chunk of logits at a time."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_model

from offsite.data.tokens import Sequence, collate
from offsite.studies.bench.tensor_memory import TensorPeak, existing_tensors
from offsite.training import chunked_loss as chunked_module
from offsite.training.chunked_loss import ChunkedHeadLoss, plain_head
from offsite.training.loss import batch_loss
from offsite.training.trainer import freeze_all_but


@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_input_gradient_match_cross_entropy(monkeypatch, with_bias):
    monkeypatch.setattr(chunked_module, "CHUNK_POSITIONS", 7)  # 30 positions: chunks of 7, the last of 2
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator)
    bias = torch.randn(50, generator=generator) if with_bias else None
    labels = torch.randint(0, 50, (30,), generator=generator)
    loss = ChunkedHeadLoss.apply(hidden, weight, bias, labels)
    (2 * loss).backward()
    got = hidden.grad.clone()
    hidden.grad = None
    expected = F.cross_entropy(F.linear(hidden, weight, bias), labels)
    (2 * expected).backward()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(got, hidden.grad, atol=1e-6)


def lm_batch(vocab):
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(4, vocab, (n + 1,), generator=generator).tolist() for n in (40, 33, 40)]
    return collate([Sequence(row[:-1], row[1:]) for row in rows], 0)  # every position scored, some padding


def step(model, batch):
    model.zero_grad(set_to_none=True)
    tracker = TensorPeak()
    tracker.add_all(existing_tensors(model) + list(batch.values()))
    with tracker:
        loss = batch_loss(model, batch)
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad], tracker.peak


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batch_loss_chunks_long_losses_with_the_same_gradients_and_less_memory(family, monkeypatch):
    model = make_tiny_model(family)
    freeze_all_but(model, [0, 5])
    model.train()
    batch = lm_batch(model.config.vocab_size)
    plain = step(model, batch)
    monkeypatch.setitem(batch_loss.__globals__, "CHUNK_LOGITS", 0)  # chunk every loss
    monkeypatch.setattr(chunked_module, "CHUNK_POSITIONS", 16)
    chunked = step(model, batch)
    assert plain_head(model)
    assert torch.allclose(chunked[0], plain[0], atol=1e-5)
    for got, want in zip(chunked[1], plain[1]):
        assert torch.allclose(got, want, atol=1e-5)
    assert chunked[2] < plain[2]


def test_models_that_change_their_logits_keep_the_plain_loss(monkeypatch):
    model = make_tiny_model("gemma3_text")  # soft-caps its logits after the head
    model.config.final_logit_softcapping = 5.0
    freeze_all_but(model, [0])
    assert not plain_head(model)
    monkeypatch.setitem(batch_loss.__globals__, "CHUNK_LOGITS", 0)
    batch = lm_batch(model.config.vocab_size)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert torch.allclose(batch_loss(model, batch), expected, atol=1e-5)
