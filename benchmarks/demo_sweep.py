"""Run `offsite demo` under several variants and tabulate them side by side.

Every variant shares one output directory, so stages that do not depend on the
variant (full model zero-shot, full fine-tuning, bundles already built) are
computed once. Each variant's report.json is kept as sweep/<label>.json, and
sweep/sweep.md gathers the emulator-dependent rows of all of them.

    python benchmarks/demo_sweep.py --out /tmp/runs/default \
        --variant 'lr=3e-4:{"distill": "austen", "adapter_training": {"lr": 3e-4}}'

A variant is LABEL:JSON, the JSON holding DemoConfig fields (split, distill,
adapter_training, compare_uniform, quick, tasks).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from offsite.config import DistillConfig
from offsite.studies.settings import DemoConfig
from offsite.studies.demo import demo
from offsite.studies.demo_report import LABELS
from offsite.studies.metrics import format_metric

ROWS = ("emulator_zero_shot", "emulator_finetune", "plug_in")


def run_variant(out: Path, label: str, fields: dict) -> dict:
    if isinstance(fields.get("distill"), str):
        fields["distill"] = DistillConfig(corpus=fields["distill"]).to_dict()
    fields.setdefault("compare_uniform", False)
    start = time.perf_counter()
    demo(DemoConfig(output=str(out), **fields))
    kept = out / "sweep" / f"{label}.json"
    kept.parent.mkdir(exist_ok=True)
    shutil.copy(out / "report.json", kept)
    report = json.loads(kept.read_text())
    report["sweep_seconds"] = time.perf_counter() - start
    kept.write_text(json.dumps(report, indent=2))
    return report


def table(reports: dict[str, dict]) -> str:
    first = next(iter(reports.values()))
    tasks = list(first["timing"])
    lines = ["| variant | setting | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for name in ("zero_shot", "full_finetune"):
        lines.append(f"| (any) | {LABELS[name]} | " + " | ".join(format_metric(first["settings"][name][t]) for t in tasks) + " |")
    for label, report in reports.items():
        for name in ROWS:
            lines.append(f"| {label} | {LABELS[name]} | "
                         + " | ".join(format_metric(report["settings"][name][t]) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", action="append", required=True, help="LABEL:JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    reports = {}
    for variant in args.variant:
        label, _, blob = variant.partition(":")
        reports[label] = run_variant(out, label, json.loads(blob))
        (out / "sweep" / "sweep.md").write_text(table(reports))
        print(table(reports), flush=True)


if __name__ == "__main__":
    main()
