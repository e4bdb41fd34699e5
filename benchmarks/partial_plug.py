"""Which half of a returned adapter carries its gain: plug only its bottom blocks, only its top blocks, or both.

    python benchmarks/partial_plug.py ADAPTER --model smollm2-135m --data wordnet --limit 300 --seq-len 160

A diagnostic for the model owner (it needs the full model): each part is put into a fresh copy of the full
model without the fingerprint check (a part of an adapter is not the adapter the fingerprint was made
for), and the copy is scored as `offsite eval` scores it.
"""

from __future__ import annotations

import argparse
import json

import torch

from offsite.data.read import read_data
from offsite.data.types import limit
from offsite.exchange.adapter import apply, load_adapter
from offsite.loading import load_model, load_preprocessor
from offsite.scoring import score


def partial_scores(adapter_dir: str, model: str, data: str, count: int | None, seq_len: int) -> dict[str, dict]:
    adapter = load_adapter(adapter_dir)
    layers = adapter.layers
    middle = len(layers) // 2  # the adapter's layers are the bottom ones, then the top ones
    parts = {"bottom only": layers[:middle], "top only": layers[middle:], "both": layers}
    examples = read_data(data, default_split="test")
    examples = limit(examples, count) if count else examples
    tokenizer = load_preprocessor(model)
    found = {}
    for name, keep in parts.items():
        full = load_model(model).eval()
        part = load_adapter(adapter_dir)
        part.tensors = {index: tensors for index, tensors in adapter.tensors.items() if index in keep}
        apply(full, part, {index: index for index in keep}, adapter_dir)
        with torch.no_grad():
            found[name] = {"layers": keep, **score(full, tokenizer, examples, seq_len, 8)}
        print(name, json.dumps(found[name]), flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wordnet")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    partial_scores(args.adapter, args.model, args.data, args.limit, args.seq_len)


if __name__ == "__main__":
    main()
