"""Compare `offsite demo` runs of different splits: one Markdown table from their report.json files.

    offsite demo --out runs --emulator-layers 8  && cp runs/report.json split-8.json
    offsite demo --out runs --emulator-layers 10 && cp runs/report.json split-10.json
    python benchmarks/split_table.py split-8.json split-10.json

Per split and task: the distilled emulator fine-tuned, the plug-in, and the two gaps that
decide a split (plug-in to full fine-tuning: the data owner's result; plug-in to emulator
fine-tuned: the model owner's protection), then the adapter's s/step and peak memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from offsite.studies.metrics import format_metric


def split_name(report: dict) -> str:
    split = report["split"]
    return f"{split['bottom']}-{split['emulator_layers']}-{split['top']}"


def gap(report: dict, setting: str, other: str, task: str) -> str:
    """setting - other in accuracy points, or other/setting - 1 in perplexity percent (positive: setting better)."""
    a, b = report["settings"][setting][task], report["settings"][other][task]
    if "accuracy" in a:
        return f"{100 * (a['accuracy'] - b['accuracy']):+.1f} pts"
    return f"{100 * (b['perplexity'] / a['perplexity'] - 1):+.1f}%"


def table(reports: list[dict]) -> str:
    tasks = list(reports[0]["timing"])
    lines = ["| split | task | emulator FT | plug-in | plug-in vs full FT | plug-in vs emulator FT | "
             "s/step | peak RSS MB | distilled held-out ppl |",
             "|---|---|---|---|---|---|---|---|---|"]
    for report in reports:
        distill = report["emulator"].get("distill") or {}
        heldout = distill.get("heldout_perplexity_best")
        for task in tasks:
            timing = report["timing"][task]["emulator_finetune"]
            lines.append(
                f"| {split_name(report)} | {task} | {format_metric(report['settings']['emulator_finetune'][task])} | "
                f"{format_metric(report['settings']['plug_in'][task])} | "
                f"{gap(report, 'plug_in', 'full_finetune', task)} | {gap(report, 'plug_in', 'emulator_finetune', task)} | "
                f"{timing['seconds_per_step']:.2f} | {timing['peak_rss_mb']:.0f} | "
                f"{'-' if heldout is None else f'{heldout:.0f}'} |")
    first = reports[0]["settings"]
    lines += ["", "Full model, every split: " + "; ".join(
        f"{task} zero-shot {format_metric(first['zero_shot'][task])}, full FT {format_metric(first['full_finetune'][task])}"
        for task in tasks) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files of `offsite demo` runs")
    args = parser.parse_args()
    print(table([json.loads(path.read_text()) for path in args.reports]))


if __name__ == "__main__":
    main()
