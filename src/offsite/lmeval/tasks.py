"""offsite's data as lm-eval tasks: the examples as a jsonl file and a task YAML over it, so lm-eval scores
offline exactly what `offsite eval --data` scores (`offsite data export NAME --lm-eval -o DIR`).

- a choice task (bbc-news, wordnet, a jsonl of choices) is lm-eval's `multiple_choice`: the context as the
  prompt, the choices as they are stored (each starts with its own space, so the target delimiter is
  empty), acc and acc_norm;
- text (austen, a .txt file, a jsonl of texts) is `loglikelihood_rolling` over each document: word and byte
  perplexity, bits per byte.

Writing them needs no lm-eval; running them does (`pip install "offsite[lm-eval]"`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from offsite.data.builtin import is_builtin
from offsite.data.read import read_data, write_jsonl
from offsite.data.types import ChoiceData, Data, TextData
from offsite.errors import OffsiteError
from offsite.files import atomic_file


def task_name(source: str) -> str:
    """`bbc-news:test` -> `offsite_bbc_news`, another split named too (`offsite_bbc_news_validation`); a data
    file -> `offsite_<stem>_<8 hex of its path>`, so two files of one name stay two tasks."""
    if is_builtin(source) and not Path(source).exists():
        name, _, split = source.partition(":")
        return "offsite_" + name.replace("-", "_") + (f"_{split}" if split and split != "test" else "")
    path = Path(source).resolve()
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
    return f"offsite_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def task_config(name: str, data: Data, jsonl: Path) -> dict:
    common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(jsonl.resolve())}},
              "test_split": "test", "metadata": {"version": 1.0, "source": data.source}}
    if isinstance(data, ChoiceData):
        return {**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}",
                "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": "",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
    return {**common, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}


def write_task(source: str, folder: str | Path, overwrite: bool = True, flag: str = "--lm-eval") -> Path:
    """Write `source` (a built-in dataset, NAME[:SPLIT], the test split by default, or a .txt/.jsonl file) into
    `folder` as an lm-eval task; returns the YAML file. The YAML names the jsonl by its absolute path: write
    them again after moving them."""
    data = read_data(source, flag, default_split="test")
    if not isinstance(data, (ChoiceData, TextData)):
        raise OffsiteError(f"{flag} {source}: labelled images or texts are a classifier's task, not a language "
                           "model's; lm-eval scores language models")
    name, folder = task_name(source), Path(folder)
    if folder.is_file():
        raise OffsiteError(f"--output {folder} is a file; an lm-eval task is written into a folder")
    existing = [p for p in (folder / f"{name}.yaml", folder / f"{name}.jsonl") if p.exists()]
    if existing and not overwrite:
        raise OffsiteError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --output")
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = write_jsonl(data, folder / f"{name}.jsonl")
    path = folder / f"{name}.yaml"
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(task_config(name, data, jsonl), sort_keys=False))
    return path
