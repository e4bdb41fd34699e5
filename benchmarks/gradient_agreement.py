"""How closely the adapter's gradients through an emulator follow its gradients through the full model.

    python benchmarks/gradient_agreement.py BUNDLE [BUNDLE ...] --model smollm2-135m --data wordnet --examples 160

The data owner trains the adapter through the emulator; what it learns transfers to the full model only as far
as its gradients there point where the full model's would. For each bundle, the adapter's gradients of the
data owner's loss (the pretrained adapter, before any training) are computed through the emulator and through
the full model on the same training examples, and compared per adapter block by cosine similarity: of each
batch's gradient (mean over batches) and of the gradient summed over all the examples (the first step of a
full-batch descent). A diagnostic for the model owner: it needs the full model and examples. `--data` names a
task (its training examples, the data owner's loss) or a text corpus (the language-modelling loss on `--examples`
windows spread over it): on the built-in model the bottom blocks' agreement on the model owner's own text ranks
emulators as it does on a task (docs/results/2026-12-05-which-layers.md), so a model owner without task data
can compare splits.

    python benchmarks/gradient_agreement.py B8 B18 --data austen:validation --examples 80
"""

from __future__ import annotations

import argparse
import json

import torch

from offsite.arch import get_layers
from offsite.data.read import read_data
from offsite.data.tokens import collate, spread
from offsite.data.types import TextData, limit
from offsite.exchange.bundle import bundle_index, load_bundle
from offsite.loading import load_model, load_preprocessor, pad_id
from offsite.training.loss import batch_loss
from offsite.training.trainer import training_sequences


def block_gradients(model: torch.nn.Module, positions: dict[int, int], batch: dict[str, torch.Tensor]
                    ) -> dict[int, torch.Tensor]:
    """{original layer index: the flattened gradient of the batch's loss for that adapter block}."""
    model.zero_grad(set_to_none=True)
    batch_loss(model, batch).backward()
    layers = get_layers(model)
    return {original: torch.cat([p.grad.flatten() for p in layers[position].parameters()])
            for original, position in positions.items()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def agreement(full: torch.nn.Module, emulated: torch.nn.Module, positions: dict[int, int],
              batches: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    per_batch: dict[int, list[float]] = {i: [] for i in positions}
    summed_full: dict[int, torch.Tensor] = {}
    summed_emulated: dict[int, torch.Tensor] = {}
    for batch in batches:
        through_full = block_gradients(full, {i: i for i in positions}, batch)
        through_emulator = block_gradients(emulated, positions, batch)
        for i in positions:
            per_batch[i].append(cosine(through_full[i], through_emulator[i]))
            summed_full[i] = summed_full.get(i, 0) + through_full[i]
            summed_emulated[i] = summed_emulated.get(i, 0) + through_emulator[i]
    return {str(i): {"batch_cosine": sum(per_batch[i]) / len(per_batch[i]),
                     "summed_cosine": cosine(summed_full[i], summed_emulated[i]),
                     "norm_ratio": float(summed_emulated[i].norm() / summed_full[i].norm())}
            for i in positions}


def measure(model: str, bundles: list[str], data: str, examples: int, batch_size: int, seq_len: int
            ) -> list[dict]:
    """One row per bundle: its emulator and, per adapter block, the cosines and the gradients' norm ratio."""
    torch.manual_seed(0)
    tokenizer = load_preprocessor(model)
    full = load_model(model).float().train()
    full.requires_grad_(True)
    found = read_data(data, default_split="train")
    if isinstance(found, TextData):  # a corpus: windows spread over all of it, not its first few documents
        sequences = spread(training_sequences(found, tokenizer, seq_len, full), examples)
    else:
        sequences = training_sequences(limit(found, examples), tokenizer, seq_len, full)
    batches = [collate(sequences[i: i + batch_size], pad_id(tokenizer)) for i in range(0, len(sequences), batch_size)]
    rows = []
    for bundle in bundles:
        emulated, manifest = load_bundle(bundle)
        emulated.float().train().requires_grad_(True)
        rows.append({"bundle": bundle, "method": manifest.emulator.get("method"), "examples": len(sequences),
                     "emulator": list(manifest.plan.emulator),
                     "blocks": agreement(full, emulated, bundle_index(manifest), batches)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wordnet")
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=160)
    args = parser.parse_args()
    measure(args.model, args.bundles, args.data, args.examples, args.batch_size, args.seq_len)


if __name__ == "__main__":
    main()
