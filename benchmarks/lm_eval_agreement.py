"""Score models with `offsite eval` and with lm-eval (the `offsite` model type) on the same examples, side by side.

    python benchmarks/lm_eval_agreement.py --out /tmp/lm-eval-agreement.json \
        --setting "full model" smollm2-135m - - \
        --setting "plug-in" smollm2-135m ADAPTER BUNDLE --tasks wordnet:300 bbc-news:150 austen

Each --setting is LABEL MODEL ADAPTER BUNDLE ('-' for none), loaded once; each task is a built-in dataset
with an optional example count (its first N test examples, as `--limit` takes them). For choice tasks
lm-eval's acc and acc_norm are set beside offsite's accuracy and accuracy_norm; for text, lm-eval's
bits per byte turned back into a summed log-likelihood gives the token perplexity offsite reports.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from offsite.api import load_for_eval, score_loaded
from offsite.config import EvalConfig
from offsite.data.read import read_data
from offsite.device import Placement, place_model
from offsite.lmeval.model import OffsiteLM
from offsite.lmeval.run import run_lm_eval


def compare(label: str, model: str, adapter: str | None, bundle: str | None, tasks: list[str]) -> list[dict]:
    loaded, tokenizer = load_for_eval(model, adapter, bundle)
    place_model(loaded, Placement.of("cpu", "float32"))
    rows = []
    for spec in tasks:
        task, _, count = spec.partition(":")
        limit = int(count) if count else None
        config = EvalConfig(model=model, data=task, adapter=adapter, bundle=bundle, limit=limit)
        start = time.perf_counter()
        ours = score_loaded(config, loaded, tokenizer, Placement.of("cpu", "float32"))
        ours_seconds, start = time.perf_counter() - start, time.perf_counter()
        found = run_lm_eval(OffsiteLM.of(loaded, tokenizer, config.seq_len, config.batch_size), [task], limit)
        theirs = next(iter(found["results"].values()))
        row = {"setting": label, "task": task, "n": ours["n"], "offsite_seconds": ours_seconds,
               "lm_eval_seconds": time.perf_counter() - start, "offsite": ours,
               "lm_eval": {k.split(",")[0]: v for k, v in theirs.items() if "," in k}}
        if ours["task"] == "lm":
            text = "".join(read_data(task, default_split="test").texts)
            loglik = -row["lm_eval"]["bits_per_byte"] * len(text.encode()) * math.log(2)
            row["lm_eval_token_perplexity"] = math.exp(-loglik / ours["n"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | task | n | offsite: accuracy / acc_norm or perplexity | lm-eval: acc / acc_norm or token "
             "perplexity (word perplexity) |", "|---|---|---|---|---|"]
    for row in rows:
        if row["offsite"]["task"] == "choice":
            ours = f"{row['offsite']['accuracy']:.4f} / {row['offsite']['accuracy_norm']:.4f}"
            theirs = f"{row['lm_eval']['acc']:.4f} / {row['lm_eval']['acc_norm']:.4f}"
        else:
            ours = f"{row['offsite']['perplexity']:.4f}"
            theirs = f"{row['lm_eval_token_perplexity']:.4f} ({row['lm_eval']['word_perplexity']:.2f})"
        lines.append(f"| {row['setting']} | {row['task']} | {row['n']} | {ours} | {theirs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", nargs=4, action="append", required=True,
                        metavar=("LABEL", "MODEL", "ADAPTER", "BUNDLE"))
    parser.add_argument("--tasks", nargs="+", default=["wordnet:300", "bbc-news:150", "austen"])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of every row")
    args = parser.parse_args()
    rows = []
    for label, model, adapter, bundle in args.setting:
        rows += compare(label, model, None if adapter == "-" else adapter, None if bundle == "-" else bundle,
                        args.tasks)
    args.out.write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
