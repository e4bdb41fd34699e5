"""Built-in datasets: split rules on synthetic inputs (fast), and on the real assets (slow)."""

import random
from collections import Counter

import pytest

from offsite.data import builtin as tasks
from offsite.data.read import read_data
from offsite.data.types import ChoiceData, TextData
from offsite.errors import OffsiteError


def test_stratified_split_keeps_topic_shares_and_is_seeded():
    items = [(label, f"{label}-{i}") for label in ("a", "b") for i in range(100)]
    first = tasks._split_stratified(list(items), key=lambda x: x[0], rng=random.Random(1))
    again = tasks._split_stratified(list(items), key=lambda x: x[0], rng=random.Random(1))
    assert first == again
    assert {name: len(v) for name, v in first.items()} == {"train": 150, "validation": 20, "test": 30}
    assert Counter(label for label, _ in first["test"]) == {"a": 15, "b": 15}
    assert not set(first["train"]) & set(first["test"])


def test_quiz_has_one_right_answer_among_distinct_choices():
    pool = [f"word{i}" for i in range(50)]
    rng = random.Random(0)
    for word in pool[:20]:
        quiz = tasks._quiz(word, "a definition", pool, rng)
        assert quiz.choices[quiz.label] == " " + word
        assert len(set(quiz.choices)) == tasks.WORDNET_CHOICES
        assert quiz.context == "Definition: a definition\nWord:"


def test_reflow_joins_wrapped_lines_into_paragraphs():
    assert tasks._reflow("It is a truth\nuniversally acknowledged.\n\n\nChapter 2\n") == \
        "It is a truth universally acknowledged.\n\nChapter 2"


def test_unknown_split_is_refused():
    with pytest.raises(OffsiteError, match="unknown split 'dev'"):
        tasks.load_builtin("bbc-news:dev", "train")


@pytest.mark.slow
def test_real_builtin_splits():
    bbc = {split: read_data(f"bbc-news:{split}") for split in tasks.SPLITS}
    assert [len(bbc[s].examples) for s in tasks.SPLITS] == [1586, 211, 316]
    assert not {e.context for e in bbc["train"].examples} & {e.context for e in bbc["test"].examples}
    wordnet = {split: read_data(f"wordnet:{split}") for split in tasks.SPLITS}
    answers = {s: {e.choices[e.label] for e in wordnet[s].examples} for s in tasks.SPLITS}
    every_choice = {s: {c for e in wordnet[s].examples for c in e.choices} for s in tasks.SPLITS}
    assert not every_choice["train"] & answers["test"]
    assert isinstance(wordnet["test"], ChoiceData) and len(wordnet["test"].examples) == 1000
    austen = {split: read_data(f"austen:{split}") for split in tasks.SPLITS}
    assert isinstance(austen["test"], TextData) and austen["test"].texts[0].startswith("Persuasion")
    assert len(austen["train"].texts) == 4
