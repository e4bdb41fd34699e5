"""What offsite trains and scores on: documents for language modelling, multiple-choice examples, or labelled
texts and images for a classifier."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class TextData:
    """Documents for language modelling."""

    texts: list[str]
    source: str
    task = "lm"

    def sha256(self) -> str:
        """A hash of the texts, to record which corpus an emulator was made from."""
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class ChoiceExample:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class ChoiceData:
    """Multiple-choice examples: the model should prefer `choices[label]` after `context`."""

    examples: list[ChoiceExample]
    source: str
    task = "choice"


@dataclass(frozen=True)
class LabelledExample:
    input: str  # the text, or the path of the image
    label: int  # index into the data's label names


@dataclass(frozen=True)
class LabelledData:
    """Texts or images with one class label each, for a classifier (offsite.kinds)."""

    examples: list[LabelledExample]
    labels: tuple[str, ...]  # the label names, by index
    modality: str  # "text" or "image"
    source: str
    task = "classify"

    def sha256(self) -> str:
        """A hash of the inputs (texts, image paths or IDX pixels) and labels, to record a corpus."""
        digest = hashlib.sha256()
        for example in self.examples:
            value = example.input
            digest.update(value.tobytes() if hasattr(value, "tobytes") else str(value).encode())
            digest.update(self.labels[example.label].encode())
        return digest.hexdigest()


Data = Union[TextData, ChoiceData, LabelledData]


def limit(data: Data, count: int) -> Data:
    """The first `count` examples (or documents)."""
    if isinstance(data, ChoiceData):
        return ChoiceData(data.examples[:count], data.source)
    if isinstance(data, LabelledData):
        return LabelledData(data.examples[:count], data.labels, data.modality, data.source)
    return TextData(data.texts[:count], data.source)


def truncate_text(data: TextData, windows: int, seq_len: int) -> TextData:
    """About `windows` windows of `seq_len` tokens of text (5 characters a token is generous for English)."""
    budget, texts = windows * seq_len * 5, []
    for text in data.texts:
        texts.append(text[:budget])
        budget -= len(texts[-1])
        if budget <= 0:
            break
    return TextData(texts, data.source)
