"""Run `offsite demo` under several variants and tabulate them side by side.

Every variant shares one output directory, so stages that do not depend on the
variant (full model zero-shot, full fine-tuning, bundles already built) are
computed once. Each variant's report.json is kept as sweep/<label>.json, and
sweep/sweep.md gathers the emulator-dependent rows of all of them.

    python benchmarks/demo_sweep.py benchmarks/variants/adapter-lr.json --out /tmp/runs/default

A variants file is a JSON object: label -> DemoConfig fields (split, distill, adapter_training,
compare_uniform, quick, tasks, fair_budget); `"distill": "austen"` is the default distillation of that
corpus. A variant whose corpus is a file (e.g. `offsite-corpora/sampled-400.jsonl` of distill-study.json) needs
that file first; its page in docs/results/ gives the command that makes it. `--reference REPORT`
takes the full-model rows from an earlier run's report.json (checked to be the same model, budget,
seed, data and offsite version), so a new variant costs only its emulator's stages.
The studies behind docs/results/ are in benchmarks/variants/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from offsite.config import DistillConfig
from offsite.studies.demo import demo
from offsite.studies.demo_report import CEILING_LABEL, FAIR_ROWS, LABELS
from offsite.studies.metrics import format_metric
from offsite.studies.settings import DemoConfig

ROWS = ("emulator_zero_shot", "emulator_finetune", "plug_in")


def variant_config(out: Path, fields: dict) -> DemoConfig:
    """The demo of one variant: its fields, a corpus name as that corpus's default distillation."""
    fields = dict(fields)
    if isinstance(fields.get("distill"), str):
        fields["distill"] = DistillConfig(corpus=fields["distill"]).to_dict()
    fields.setdefault("compare_uniform", False)
    return DemoConfig(output=str(out), **fields)


def run_variant(out: Path, label: str, fields: dict) -> dict:
    start = time.perf_counter()
    demo(variant_config(out, fields))
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
    if "ceiling" in first["settings"]:
        lines.append(f"| (any) | {CEILING_LABEL} | "
                     + " | ".join(format_metric(first["settings"]["ceiling"][t]) for t in tasks) + " |")
    for label, report in reports.items():
        for name in ROWS:
            lines.append(f"| {label} | {LABELS[name]} | "
                         + " | ".join(format_metric(report["settings"][name][t]) for t in tasks) + " |")
        if "figures" in report:
            lines.append(f"| {label} | plug-in: gain kept of full FT | "
                         + " | ".join(_share(report["figures"][t]["gain_kept"]) for t in tasks) + " |")
        for task_rounds in zip(*[report.get("rounds", {}).get(t, []) for t in tasks]):
            number = task_rounds[0]["round"]
            lines.append(f"| {label} | plug-in after alignment round {number} | "
                         + " | ".join(format_metric(r["plug_in"]) for r in task_rounds) + " |")
        fair = report.get("fair")
        for name, grid, _ in FAIR_ROWS if fair else ():
            cells = [f"{format_metric(fair['results'][name][t])} (lr {fair['runs'][t][grid]['chosen']['lr']:g}, "
                     f"{fair['runs'][t][grid]['chosen']['steps']} steps)" if t in fair["results"][name] else "n/a"
                     for t in tasks]
            lines.append(f"| {label} | fair budget: {CEILING_LABEL if name == 'ceiling' else LABELS[name]} | "
                         + " | ".join(cells) + " |")
        distilled = (report.get("emulator") or {}).get("distill") or {}
        if distilled:
            lines.append(f"| {label} | distillation: steps, held-out {distilled.get('selected_by', 'perplexity')} "
                         f"(best), minutes | {distilled['steps']}, {_number(distilled)}, "
                         f"{distilled['seconds'] / 60:.1f} |" + " |" * (len(tasks) - 1))
    return "\n".join(lines) + "\n"


def _share(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _number(distilled: dict) -> str:
    what = distilled.get("selected_by")
    best = distilled.get(f"heldout_{what}_best") if what else distilled.get("heldout_perplexity_best")
    return "n/a" if best is None else f"{best:.3g}"


def read_variants(path: Path) -> dict[str, dict]:
    variants = json.loads(path.read_text())
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise SystemExit(f"{path}: expected a JSON object of label -> DemoConfig fields")
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", type=Path, help="JSON file: label -> DemoConfig fields")
    parser.add_argument("--out", required=True, help="output directory shared by every variant")
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="run only these variants of the file")
    parser.add_argument("--reference", metavar="REPORT", help="reuse the full-model rows (zero-shot, full "
                        "fine-tuning, the ceiling) of this earlier report.json of the same model, budget, data and "
                        "offsite version instead of recomputing them (e.g. docs/runs/fidelity-kd-kl.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    reports = {}
    for label, fields in read_variants(args.variants).items():
        if args.only and label not in args.only:
            continue
        if args.reference:
            fields = {**fields, "reference": str(Path(args.reference).resolve())}
        reports[label] = run_variant(out, label, fields)
        (out / "sweep" / "sweep.md").write_text(table(reports))
        print(table(reports), flush=True)


if __name__ == "__main__":
    main()
