"""`similarity` selection: keep the middle layers that best represent clusters of similar layers.

As in CRaSh, consecutive layers of a pretrained transformer form clusters whose
outputs are alike. We measure linear CKA between the outputs of every pair of
middle layers on a calibration sample, split the middle block into K contiguous
clusters (contiguous k-medoids, solved exactly by dynamic programming) and keep
each cluster's medoid. Every layer of a cluster is represented by its medoid,
which is also the schedule `share` runs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from offsite.arch import get_layers
from offsite.data.tokens import Sequence, collate

log = logging.getLogger(__name__)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (tokens, features) matrices: 1 for the same representation up to rotation and scale."""
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    cross = (y.t() @ x).pow(2).sum()
    return float(cross / ((x.t() @ x).pow(2).sum().sqrt() * (y.t() @ y).pow(2).sum().sqrt()).clamp_min(1e-12))


@torch.no_grad()
def layer_outputs(model: nn.Module, layers: list[int], sequences: list[Sequence], pad_id: int,
                  batch_size: int = 4) -> dict[int, torch.Tensor]:
    """Output of each block in `layers` at every unpadded token of `sequences`: index -> (tokens, hidden)."""
    blocks = get_layers(model)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    mask: list[torch.Tensor] = []

    def hook(index: int):
        def record(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[index].append(hidden.detach().float())
        return record

    handles = [blocks[i].register_forward_hook(hook(i)) for i in layers]
    try:
        for start in range(0, len(sequences), batch_size):
            batch = collate(sequences[start: start + batch_size], pad_id)
            mask.append(batch["attention_mask"].bool())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat([h[m] for h, m in zip(captured[i], mask)]) for i in layers}


def similarity_matrix(outputs: dict[int, torch.Tensor]) -> torch.Tensor:
    indices = list(outputs)
    matrix = torch.ones(len(indices), len(indices))
    for a in range(len(indices)):
        for b in range(a + 1, len(indices)):
            matrix[a, b] = matrix[b, a] = linear_cka(outputs[indices[a]], outputs[indices[b]])
    return matrix


def contiguous_medoids(similarity: torch.Tensor, clusters: int) -> list[tuple[int, int, int]]:
    """Split 0..M-1 into `clusters` contiguous runs minimising the total CKA distance to each run's medoid.

    Returns (first, last, medoid) per run. Exact dynamic programme, O(K·M³) for M middle layers.
    """
    distance = 1 - similarity
    size = distance.shape[0]
    cost, medoid = {}, {}
    for first in range(size):
        for last in range(first, size):
            totals = distance[first: last + 1, first: last + 1].sum(dim=0)
            best = int(torch.argmin(totals))
            cost[first, last], medoid[first, last] = float(totals[best]), first + best
    inf = float("inf")
    best_cost = [[inf] * (size + 1) for _ in range(clusters + 1)]
    choice = [[0] * (size + 1) for _ in range(clusters + 1)]
    best_cost[0][0] = 0.0
    for k in range(1, clusters + 1):
        for end in range(k, size + 1):  # the first `end` layers in k runs, the last run starting at `start`
            for start in range(k - 1, end):
                value = best_cost[k - 1][start] + cost[start, end - 1]
                if value < best_cost[k][end]:
                    best_cost[k][end], choice[k][end] = value, start
    runs, end = [], size
    for k in range(clusters, 0, -1):
        start = choice[k][end]
        runs.append((start, end - 1, medoid[start, end - 1]))
        end = start
    return runs[::-1]


def select_by_similarity(model: nn.Module, middle: list[int], kept: int, sequences: list[Sequence],
                         pad_id: int) -> tuple[list[int], list[int], list[list[float]]]:
    """(kept middle layers, schedule: the kept layer representing each middle layer, CKA matrix)."""
    similarity = similarity_matrix(layer_outputs(model, middle, sequences, pad_id))
    runs = contiguous_medoids(similarity, kept)
    schedule = [middle[medoid] for first, last, medoid in runs for _ in range(first, last + 1)]
    log.info("similarity selection: clusters %s", [(middle[f], middle[l]) for f, l, _ in runs])
    return [middle[m] for _, _, m in runs], schedule, similarity.tolist()
