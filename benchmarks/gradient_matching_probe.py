"""A probe of gradient-matching distillation: continue distilling a bundle's emulator with `grad_weight`, then
measure how its adapter gradients agree with the full model's (benchmarks/gradient_agreement.py).

    python benchmarks/gradient_matching_probe.py BUNDLE STEPS '{"grad_weight": 10.0, "lr": 3e-4}' OUT_DIR

The third argument holds DistillConfig fields (austen corpus, eval every min(50, STEPS) steps unless given).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from gradient_agreement import agreement

from offsite.config import DistillConfig
from offsite.data.read import read_data
from offsite.data.tokens import collate
from offsite.data.types import limit
from offsite.emulator.distill import distill, read_corpus
from offsite.exchange.bundle import bundle_index, load_bundle
from offsite.loading import load_model, load_preprocessor, pad_id
from offsite.training.trainer import training_sequences


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    bundle, steps, fields, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
    tokenizer = load_preprocessor("smollm2-135m")
    full = load_model("smollm2-135m").float().eval()
    full.requires_grad_(False)
    student, manifest = load_bundle(bundle)
    student.float()
    settings = DistillConfig(**{"corpus": "austen", "steps": steps, "eval_every": max(1, min(50, steps)), **fields})
    start = time.time()
    summary = distill(full, student, tokenizer, manifest.plan, settings, read_corpus(settings), out / "checkpoint")
    print("distilled", round(time.time() - start), "s", json.dumps(
        {k: summary[k] for k in ("tokens_per_second", "final_kd", "final_kl", "final_grad", "heldout", "best_step")}))
    examples = limit(read_data("wordnet", default_split="train"), 80)
    sequences = training_sequences(examples, tokenizer, 160, full)
    batches = [collate(sequences[i: i + 8], pad_id(tokenizer)) for i in range(0, len(sequences), 8)]
    full.train().requires_grad_(True)
    student.train().requires_grad_(True)
    print("agreement", json.dumps(agreement(full, student, bundle_index(manifest), batches)), flush=True)


if __name__ == "__main__":
    main()
