"""A classifier's head sized for the data owner's labels.

As in the paper's vision recipe, a classifier whose labels are not the task's gets a new linear
layer for them, trained with the adapter and shipped in the adapter file with the label names; the
model owner's plug (and any scoring with that adapter) gives the full model the same head first.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from offsite.arch import layer_paths, set_submodule
from offsite.errors import OffsiteError


def model_labels(model: PreTrainedModel) -> tuple[str, ...]:
    """The label names of a classifier's head, by index."""
    return tuple(str(model.config.id2label[i]) for i in range(model.config.num_labels))


def rehead(model: PreTrainedModel, labels: tuple[str, ...], seed: int) -> bool:
    """Give a classifier a new last linear layer for `labels` when its own are other ones; True if it did.

    The new layer is initialised as transformers initialises one (normal with the config's
    `initializer_range`, zero bias), from `seed`, so a rerun builds the same head.
    """
    if model_labels(model) == labels:
        return False
    path, old = _output_layer(model)
    generator = torch.Generator().manual_seed(seed)
    new = nn.Linear(old.in_features, len(labels), bias=old.bias is not None)
    with torch.no_grad():
        new.weight.normal_(0.0, getattr(model.config, "initializer_range", 0.02), generator=generator)
        if new.bias is not None:
            new.bias.zero_()
    set_submodule(model, path, new.to(old.weight.dtype))
    relabel(model.config, labels)
    return True


def relabel(config, labels: tuple[str, ...]) -> None:
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}


def _output_layer(model: PreTrainedModel) -> tuple[str, nn.Linear]:
    """The task head's last linear layer: the one that produces the labels' logits."""
    found = [(f"{root}.{name}" if name else root, module) for root in layer_paths(model).task_head
             for name, module in model.get_submodule(root).named_modules()
             if isinstance(module, nn.Linear) and module.out_features == model.config.num_labels]
    if not found:
        raise OffsiteError(f"{type(model).__name__}: no linear layer of {model.config.num_labels} outputs in its "
                           "classification head, so it cannot be given a head for other labels")
    return found[-1]
