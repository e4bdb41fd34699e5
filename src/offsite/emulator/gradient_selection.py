"""`gradient` selection: keep the middle layers through which the adapter's gradients stay the full model's.

The data owner's adapter learns only through the emulator's backward pass, and
what it learns transfers to the full model only as far as those gradients point
where the full model's would. On the built-in model a uniform 8-of-26 selection
leaves the bottom adapter blocks' gradient nearly orthogonal to the full
model's, and dropping as few as two badly chosen layers scrambles it too
(docs/results/2026-12-05-gradients.md). So, as GradOT proposes, the
selection is made for the gradients: greedy backward elimination on a
calibration sample of public text, dropping one layer at a time, the one whose
removal keeps the adapter blocks' language-modelling gradients closest (mean
cosine over the adapter blocks) to the full model's, until K remain.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from offsite.arch import get_layers
from offsite.data.tokens import IGNORE, Sequence, collate
from offsite.emulator.share import collapse, expand

log = logging.getLogger(__name__)

BATCH = 4


def adapter_gradients(model: nn.Module, run: list[int], adapter: list[int], batches: list[dict[str, torch.Tensor]]
                      ) -> dict[int, torch.Tensor]:
    """{adapter layer: its flattened gradient of the LM loss summed over `batches`} with only the layers `run`
    executed (in that order); only the adapter blocks' weights take gradients."""
    stored = expand(model, run)
    blocks = get_layers(model)
    found: dict[int, torch.Tensor] = {}
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE).backward()
            for layer in adapter:
                grad = torch.cat([p.grad.flatten() for p in blocks[run.index(layer)].parameters()])
                found[layer] = found[layer] + grad if layer in found else grad
    finally:
        model.zero_grad(set_to_none=True)
        collapse(model, stored)
    return found


def agreement(found: dict[int, torch.Tensor], reference: dict[int, torch.Tensor]) -> float:
    """Mean over the adapter blocks of the cosine between two sets of gradients."""
    cosines = [F.cosine_similarity(found[i].double(), reference[i].double(), dim=0)
               for i in reference]
    return float(torch.stack(cosines).mean())


def select_by_gradient(model: nn.Module, bottom: list[int], middle: list[int], top: list[int], kept: int,
                       sequences: list[Sequence], pad_id: int) -> tuple[list[int], list[dict]]:
    """(kept middle layers, the elimination trace: each dropped layer and the agreement left)."""
    batches = [collate(sequences[i: i + BATCH], pad_id) for i in range(0, len(sequences), BATCH)]
    adapter = bottom + top
    was_training, needed = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()  # no dropout: every candidate is compared on the same computation
    model.requires_grad_(False)
    for layer in adapter:
        get_layers(model)[layer].requires_grad_(True)
    try:
        reference = adapter_gradients(model, bottom + middle + top, adapter, batches)
        remaining, trace = list(middle), []
        candidates = sum(range(kept + 1, len(middle) + 1))
        with tqdm(total=candidates, desc="gradient selection", unit="try") as bar:
            while len(remaining) > kept:
                scores = {}
                for layer in remaining:
                    run = bottom + [m for m in remaining if m != layer] + top
                    scores[layer] = agreement(adapter_gradients(model, run, adapter, batches), reference)
                    bar.update()
                dropped = max(scores, key=lambda layer: (scores[layer], -layer))
                remaining.remove(dropped)
                trace.append({"dropped": dropped, "agreement": round(scores[dropped], 4)})
                log.info("gradient selection: drop layer %d, agreement %.4f", dropped, scores[dropped])
    finally:
        for parameter, need in zip(model.parameters(), needed):
            parameter.requires_grad_(need)
        model.train(was_training)
    return remaining, trace
