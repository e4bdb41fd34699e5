"""The built-in datasets, with fixed seeded splits: bbc-news, wordnet and austen.

Each is built from the raw assets (see `offsite.assets` and `offsite.data.raw`) the same way on every
machine, so a split is defined by its name, its seed and the rules below, and
`offsite data export` shows exactly what is trained and scored on.

- bbc-news: 5-way topic classification of BBC articles (a choice task). The
  context is the article's first `BBC_WORDS` words; articles with the same
  context are kept once; split stratified by topic.
- wordnet: "definition -> word" with 4 choices (a knowledge task). Split by
  lemma, so no answer word of the test split is ever trained on.
- austen: language modelling, split by novel: train on four novels, validate
  on Northanger Abbey, test on Persuasion.
- fashion-pretrain, fashion-transfer: Fashion-MNIST images of classes 0-4 (what the
  built-in vision model is pretrained on) and of classes 5-9 (a transfer task it never
  saw); validation is 1,000 seeded images of the training file, test the t10k file.
"""

from __future__ import annotations

import functools
import random
import re
from collections import defaultdict
from typing import Any, Callable

from offsite.data.labelled import read_idx
from offsite.data.raw import FASHION_MNIST_CLASSES, fashion_mnist_file, read_austen, read_bbc_news, read_wordnet_nouns
from offsite.data.types import ChoiceData, ChoiceExample, Data, LabelledData, LabelledExample, TextData
from offsite.errors import OffsiteError

SPLITS = ("train", "validation", "test")
SEED = 1234
BBC_WORDS = 100
BBC_TOPICS = {"business": " business", "entertainment": " entertainment", "politics": " politics",
              "sports": " sport", "tech": " tech"}
BBC_FRACTIONS = {"validation": 0.10, "test": 0.15}
WORDNET_SIZES = {"train": 6000, "validation": 400, "test": 1000}
WORDNET_CHOICES = 4
AUSTEN_SPLITS = {
    "train": ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma"],
    "validation": ["Northanger Abbey"],
    "test": ["Persuasion"],
}


def _split_stratified(items: list[Any], key: Callable[[Any], str], rng: random.Random) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    splits: dict[str, list[Any]] = {name: [] for name in SPLITS}
    for label in sorted(groups):
        members = groups[label]
        rng.shuffle(members)
        n_val = round(len(members) * BBC_FRACTIONS["validation"])
        n_test = round(len(members) * BBC_FRACTIONS["test"])
        splits["validation"] += members[:n_val]
        splits["test"] += members[n_val:n_val + n_test]
        splits["train"] += members[n_val + n_test:]
    for members in splits.values():
        rng.shuffle(members)  # interleave topics
    return splits


@functools.lru_cache(maxsize=None)
def bbc_news() -> dict[str, ChoiceData]:
    topics = list(BBC_TOPICS)
    choices = tuple(BBC_TOPICS[t] for t in topics)
    # The corpus repeats some articles; a context seen in training must never be scored in test.
    unique: dict[str, str] = {}
    for label, text in read_bbc_news():
        unique.setdefault(" ".join(text.split()[:BBC_WORDS]), label)
    articles = [(label, words) for words, label in unique.items()]
    splits = _split_stratified(articles, key=lambda article: article[0], rng=random.Random(SEED))

    def example(article: tuple[str, str]) -> ChoiceExample:
        label, words = article
        return ChoiceExample(f"Article: {words}\nTopic:", choices, topics.index(label))

    return {name: ChoiceData([example(a) for a in members], f"bbc-news:{name}") for name, members in splits.items()}


_WORD = re.compile(r"[a-z]{3,}")


def _wordnet_items() -> list[tuple[str, str]]:
    """(word, definition) for noun synsets with a plain one-word lemma that the definition does not give away.

    A definition that contains the word's first five letters ("liquidates" for
    liquidator) is dropped: it would test spelling, not knowledge.
    """
    items = []
    for lemmas, gloss in read_wordnet_nouns():
        word = next((lemma for lemma in lemmas if _WORD.fullmatch(lemma)), None)
        definition = gloss.split('; "')[0].split(";")[0].strip()  # drop the usage examples, which quote the word
        if word and definition and word[:5] not in definition.lower():
            items.append((word, definition))
    return items


@functools.lru_cache(maxsize=None)
def wordnet() -> dict[str, ChoiceData]:
    rng = random.Random(SEED)
    by_word: dict[str, list[str]] = defaultdict(list)
    for word, definition in _wordnet_items():
        by_word[word].append(definition)
    words = sorted(by_word)
    rng.shuffle(words)
    splits, start = {}, 0
    for name in ("test", "validation", "train"):
        split_words = words[start:start + WORDNET_SIZES[name]]
        start += WORDNET_SIZES[name]
        splits[name] = ChoiceData([_quiz(w, by_word[w][0], split_words, rng) for w in split_words], f"wordnet:{name}")
    return {name: splits[name] for name in SPLITS}


def _quiz(word: str, definition: str, pool: list[str], rng: random.Random) -> ChoiceExample:
    """Definition -> word, with distractors drawn from the same split, so no split sees another's answers."""
    candidates = rng.sample(pool, WORDNET_CHOICES)
    distractors = [w for w in candidates if w != word][: WORDNET_CHOICES - 1]
    label = rng.randrange(WORDNET_CHOICES)
    choices = distractors[:label] + [word] + distractors[label:]
    return ChoiceExample(f"Definition: {definition}\nWord:", tuple(" " + c for c in choices), label)


def _reflow(text: str) -> str:
    """Join the package's hard-wrapped lines into paragraphs, as the novels read."""
    paragraphs = re.split(r"\n\s*\n", text)
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


@functools.lru_cache(maxsize=None)
def austen() -> dict[str, TextData]:
    novels = read_austen()
    return {name: TextData([_reflow(novels[title]) for title in titles], f"austen:{name}")
            for name, titles in AUSTEN_SPLITS.items()}


# Fashion-MNIST split by class: the built-in vision model is pretrained on the first five classes, and the
# transfer task classifies the other five, which it never saw.
FASHION_PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FASHION_TRANSFER_CLASSES = (5, 6, 7, 8, 9)
FASHION_VALIDATION = 1000  # images of the training file held out for validation, per task


def _fashion(classes: tuple[int, ...], name: str) -> dict[str, LabelledData]:
    """Train and validation from the training file (a seeded split), test from the test file."""
    rng = random.Random(SEED)
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[LabelledExample]] = {}
    for part in ("train", "t10k"):
        data = read_idx(fashion_mnist_file(part), "fashion-mnist")
        kept = [LabelledExample(e.input, index[int(data.labels[e.label])]) for e in data.examples
                if int(data.labels[e.label]) in index]  # the IDX label names are the class numbers
        if part == "train":
            rng.shuffle(kept)
            splits["validation"], splits["train"] = kept[:FASHION_VALIDATION], kept[FASHION_VALIDATION:]
        else:
            splits["test"] = kept
    labels = tuple(FASHION_MNIST_CLASSES[c] for c in classes)
    return {split: LabelledData(examples, labels, "image", f"{name}:{split}") for split, examples in splits.items()}


@functools.lru_cache(maxsize=None)
def fashion_pretrain() -> dict[str, LabelledData]:
    return _fashion(FASHION_PRETRAIN_CLASSES, "fashion-pretrain")


@functools.lru_cache(maxsize=None)
def fashion_transfer() -> dict[str, LabelledData]:
    return _fashion(FASHION_TRANSFER_CLASSES, "fashion-transfer")


BUILTIN: dict[str, Callable[[], dict[str, Any]]] = {"bbc-news": bbc_news, "wordnet": wordnet, "austen": austen,
                                                    "fashion-pretrain": fashion_pretrain,
                                                    "fashion-transfer": fashion_transfer}


def is_builtin(source: str) -> bool:
    return source.split(":")[0] in BUILTIN


def load_builtin(source: str, default_split: str) -> Data:
    """`NAME` or `NAME:SPLIT`, e.g. `bbc-news:test`."""
    name, _, split = source.partition(":")
    split = split or default_split
    if split not in SPLITS:
        raise OffsiteError(f"{source}: unknown split '{split}'; use one of {', '.join(SPLITS)} (e.g. {name}:test)")
    return BUILTIN[name]()[split]


def split_definition() -> dict[str, Any]:
    """How the built-in splits are made, to store beside results."""
    return {"seed": SEED, "bbc_news": {"context_words": BBC_WORDS, "fractions": BBC_FRACTIONS,
                                       "stratified_by": "topic", "choices": list(BBC_TOPICS.values())},
            "wordnet": {"sizes": WORDNET_SIZES, "choices": WORDNET_CHOICES, "split_by": "lemma"},
            "austen": AUSTEN_SPLITS,
            "fashion": {"pretrain_classes": list(FASHION_PRETRAIN_CLASSES),
                        "transfer_classes": list(FASHION_TRANSFER_CLASSES), "validation": FASHION_VALIDATION,
                        "test": "the t10k file"}}
