"""Scoring agrees with straightforward reference computations."""

import math

import pytest
import torch
from tiny_models import SAMPLE_TEXT
from transformers import AutoModelForCausalLM

from offsite.data.tokens import encode_pair
from offsite.data.types import ChoiceExample, TextData
from offsite.loading import load_tokenizer
from offsite.scoring import choice_accuracy, choice_logliks, perplexity


@pytest.fixture
def llama(model_dirs):
    return family_model(model_dirs, "llama")


def family_model(model_dirs, family):
    return AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval(), load_tokenizer(str(model_dirs[family]))


def naive_loglik(model, tokenizer, context, continuation):
    """One forward per choice, no batching or padding."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    picked = log_probs[torch.arange(len(targets)), targets]
    return float(picked[-len(continuation_ids):].sum())


def test_choice_accuracy_matches_one_forward_per_choice(llama):
    model, tok = llama
    examples = [
        ChoiceExample("The old lighthouse stood at the edge of the", (" harbour", " market", " tea kettle"), 0),
        ChoiceExample("Boil fresh water, warm the", (" pot", " river"), 1),
        ChoiceExample("A heron waited in the shallow", (" water", " soup", " city", " road"), 2),
    ]
    result = choice_accuracy(model, tok, examples, seq_len=128)
    expected = expected_norm = 0
    for ex in examples:
        ll = [naive_loglik(model, tok, ex.context, c) for c in ex.choices]
        norm = [v / len(c.encode()) for v, c in zip(ll, ex.choices)]
        expected += ll.index(max(ll)) == ex.label
        expected_norm += norm.index(max(norm)) == ex.label
    assert result == {"task": "choice", "n": 3, "accuracy": expected / 3, "accuracy_norm": expected_norm / 3}


def test_shared_context_scores_equal_one_forward_per_choice(family, model_dirs):
    """Every family's KV cache (sliding windows, ALiBi, ...) gives the naive scores; context > window of 8."""
    model, tok = family_model(model_dirs, family)
    example = ChoiceExample("Boil fresh water, warm the pot, and add one spoon of leaves for each",
                            (" cup", " tea kettle", " river was quiet that morning"), 0)
    shared = choice_logliks(model, tok, example, seq_len=128)
    naive = [naive_loglik(model, tok, example.context, c) for c in example.choices]
    assert shared == pytest.approx(naive, abs=2e-4)


def test_cut_context_is_the_window_training_sees(llama):
    """With a context longer than the window, the longest choice is scored on training's exact input."""
    from offsite.data.tokens import choice_sequence, collate, token_log_probs
    model, tok = llama
    example = ChoiceExample("Boil fresh water, warm the pot, and add one spoon of leaves for each cup you pour",
                            (" cup", " tea kettle", " river was quiet that morning"), 0)
    longest = max(example.choices, key=lambda c: len(encode_pair(tok, example.context, c)[1]))
    context_ids, longest_ids = encode_pair(tok, example.context, longest)
    seq_len = len(longest_ids) + 3
    assert len(context_ids) > 4  # the context really is cut: 4 of its tokens fit
    batch = collate([choice_sequence(tok, example.context, longest, seq_len)], tok.pad_token_id)
    assert batch["input_ids"].shape[1] == seq_len
    with torch.no_grad():
        trained_view = float(token_log_probs(model(input_ids=batch["input_ids"]).logits, batch["labels"]).sum())
    scores = choice_logliks(model, tok, example, seq_len)
    assert scores[example.choices.index(longest)] == pytest.approx(trained_view, abs=2e-4)


def test_perplexity_matches_transformers_loss(llama):
    model, tok = llama
    ids = tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    result = perplexity(model, tok, TextData([SAMPLE_TEXT], "sample"), seq_len=len(ids) - 1, batch_size=1)
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert result["n"] == len(ids) - 1
    assert math.isclose(result["perplexity"], math.exp(float(reference)), rel_tol=1e-4)


def test_blocked_windows_are_token_weighted(llama):
    model, tok = llama
    whole = perplexity(model, tok, TextData([SAMPLE_TEXT], "s"), seq_len=64, batch_size=4)
    one_by_one = perplexity(model, tok, TextData([SAMPLE_TEXT], "s"), seq_len=64, batch_size=1)
    assert whole["n"] == one_by_one["n"]
    assert math.isclose(whole["perplexity"], one_by_one["perplexity"], rel_tol=1e-4)  # padding changes nothing


def test_loss_with_logits_only_at_scored_positions_is_exact(family, model_dirs):
    from offsite.data.tokens import choice_sequence, collate
    from offsite.training.loss import batch_loss, mean_loss
    model, tok = family_model(model_dirs, family)
    batch = collate([choice_sequence(tok, "The river was quiet that", " morning", 64),
                     choice_sequence(tok, "Boil fresh water, warm the pot", " and add leaves", 64)], tok.pad_token_id)
    with torch.no_grad():
        full = mean_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                         batch["labels"])
        assert float(batch_loss(model, batch)) == pytest.approx(float(full), abs=1e-5)
