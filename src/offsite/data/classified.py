"""Labelled examples as a classifier's inputs: token ids or pixel values, and the head's label index."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from offsite.data.labelled import load_image
from offsite.data.types import Data, LabelledData, TextData
from offsite.errors import OffsiteError


@dataclass(frozen=True)
class Classified:
    """One classifier input, unbatched (token ids `input_ids` (T,), or `pixel_values` (C, H, W)), and its label."""

    inputs: dict[str, torch.Tensor]
    label: int


def classifier_items(data: LabelledData, preprocessor, seq_len: int, labels: tuple[str, ...]) -> list[Classified]:
    """The model's inputs for each example, with its label's index among `labels` (the head's)."""
    index = label_index(data, labels)
    items = []
    for example in data.examples:
        if data.modality == "image":
            pixels = preprocessor(images=load_image(example.input), return_tensors="pt")["pixel_values"][0]
            inputs = {"pixel_values": pixels}
        else:
            ids = preprocessor(example.input, truncation=True, max_length=seq_len)["input_ids"]
            inputs = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        items.append(Classified(inputs, index[example.label]))
    return items


def label_index(data: LabelledData, labels: tuple[str, ...]) -> dict[int, int]:
    """Data label index -> head index, by name; a label the head does not know is refused."""
    head = {name: i for i, name in enumerate(labels)}
    unknown = [name for name in data.labels if name not in head]
    if unknown:
        raise OffsiteError(f"{data.source}: labels {unknown[:5]} are not among the model's labels {list(labels)[:10]}; "
                           "score it with the adapter trained on these labels")
    return {i: head[name] for i, name in enumerate(data.labels)}


def collate_classified(items: list[Classified], pad_id: int) -> dict[str, torch.Tensor]:
    labels = torch.tensor([item.label for item in items], dtype=torch.long)
    if "pixel_values" in items[0].inputs:
        return {"pixel_values": torch.stack([item.inputs["pixel_values"] for item in items]), "labels": labels}
    width = max(len(item.inputs["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.inputs["input_ids"])
        input_ids[row, :n] = item.inputs["input_ids"]
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def items_digest(items: list[Classified]) -> str:
    """A hash of the inputs and labels (what a resumed run must share)."""
    digest = hashlib.sha256()
    for item in items:
        for name, tensor in sorted(item.inputs.items()):
            digest.update(name.encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        digest.update(str(item.label).encode())
    return digest.hexdigest()


def encoder_inputs(data: Data, preprocessor, seq_len: int) -> list[Classified]:
    """Each text or image of `data` as one input (labels, if any, kept but unused): a classifier's
    distillation corpus, labelled or not."""
    if isinstance(data, LabelledData):
        return classifier_items(data, preprocessor, seq_len, data.labels)
    if isinstance(data, TextData):
        return [Classified({"input_ids": torch.tensor(preprocessor(text, truncation=True, max_length=seq_len)
                                                      ["input_ids"], dtype=torch.long)}, 0)
                for text in data.texts if text.strip()]
    raise OffsiteError(f"{data.source} is a choice dataset; distilling a classifier needs texts or images")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a forward takes from a collated batch (not its labels)."""
    return {name: value for name, value in batch.items() if name in ("input_ids", "attention_mask", "pixel_values")}
