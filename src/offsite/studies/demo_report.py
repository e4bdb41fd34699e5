"""The demo's report: report.json (everything), report.md (the tables) and report.png (the chart)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
import transformers

from offsite import __version__
from offsite.data.builtin import split_definition
from offsite.exchange.bundle import Manifest
from offsite.files import write_json
from offsite.studies.metrics import better, format_metric, headline

LABELS = {
    "zero_shot": "full model, zero-shot",
    "emulator_zero_shot": "emulator, zero-shot",
    "full_finetune": "full fine-tuning",
    "emulator_finetune": "offsite-tuned, through the emulator",
    "plug_in": "plug-in (full model + adapter)",
}
CLOSE_ACCURACY = 0.03  # "close to full fine-tuning": within 3 points ...
CLOSE_PERPLEXITY = 0.10  # ... or within 10% perplexity


def claims(settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims, checked task by task against the measured numbers."""
    found = []
    for task, plug in settings["plug_in"].items():
        full_ft, emulated = settings["full_finetune"][task], settings["emulator_finetune"][task]
        gap = headline(full_ft) - headline(plug)
        close = gap <= CLOSE_ACCURACY if plug["task"] == "choice" else -gap / headline(full_ft) <= CLOSE_PERPLEXITY
        found += [
            {"task": task, "claim": "plug-in beats zero-shot", "holds": better(plug, settings["zero_shot"][task])},
            {"task": task, "claim": "plug-in is close to full fine-tuning", "holds": bool(close)},
            {"task": task, "claim": "emulator fine-tuned is worse than plug-in", "holds": better(plug, emulated)},
            {"task": task, "claim": "emulator zero-shot is worse than full zero-shot",
             "holds": better(settings["zero_shot"][task], settings["emulator_zero_shot"][task])},
        ]
    return found


EMULATOR_SETTINGS = ("emulator_zero_shot", "emulator_finetune", "plug_in")


def build(config, per_task: dict[str, Any], manifests: dict[str, Manifest], run: dict[str, Any]) -> dict[str, Any]:
    primary, *others = manifests
    settings = {name: {task: r["results"][name] for task, r in per_task.items()} for name in LABELS}
    other_emulators = {
        method: {name: {task: r["other_emulators"][method]["results"][name] for task, r in per_task.items()}
                 for name in EMULATOR_SETTINGS}
        for method in others
    }
    return {
        "model": config.model,
        "budget": config.budget_name,
        "split": {**config.split.to_dict(), "layers": manifests[primary].to_dict()["layers"]},
        "emulator_method": primary,
        "emulator": manifests[primary].emulator,
        "settings": settings,
        "other_emulators": other_emulators,
        "timing": {task: r["timing"] for task, r in per_task.items()},
        "claims": claims(settings),
        "data": {task: {"sizes": r["sizes"], "budget": r["budget"]} for task, r in per_task.items()},
        "split_definition": split_definition(),
        "seed": config.seed,
        "adapter_training": config.adapter_training,
        **run,
        "versions": {"offsite": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
    }


def markdown(report: dict[str, Any]) -> str:
    tasks = list(report["timing"])
    units = ["accuracy ↑" if report["settings"]["zero_shot"][t]["task"] == "choice" else "perplexity ↓" for t in tasks]
    layers = report["split"]["layers"]
    kept = [e["original_index"] for e in layers if e["role"] == "emulator"]
    lines = [
        f"# offsite demo: {report['model']}",
        "",
        f"Split: bottom {report['split']['bottom']}, top {report['split']['top']}, emulator keeps "
        f"{len(kept)} middle layers {kept}, emulator method: {report['emulator_method']}. "
        f"Budget: {report['budget']}. Wall time of this run: {report['wall_seconds'] / 60:.1f} min "
        f"({report['stages_computed']} stages computed, {report['stages_reused']} reused from earlier runs)."
        + (f" Adapter training overrides: {report['adapter_training']}." if report.get("adapter_training") else ""),
        "",
        "| setting | " + " | ".join(f"{t} ({u})" for t, u in zip(tasks, units)) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for name, label in LABELS.items():
        lines.append(f"| {label} | " + " | ".join(format_metric(report["settings"][name][t]) for t in tasks) + " |")
    for method, rows in report.get("other_emulators", {}).items():
        for name in EMULATOR_SETTINGS:
            label = LABELS[name].replace("emulator", f"{method} emulator").replace("adapter)", f"{method} adapter)")
            lines.append(f"| {label} | " + " | ".join(format_metric(rows[name][t]) for t in tasks) + " |")
    lines += ["", "Training cost per task (same data, steps and batch shape):", "",
              "| task | full FT s/step | offsite s/step | speed-up | full FT peak RSS MB | offsite peak RSS MB "
              "| memory ratio | trainable params (full / offsite) |", "|---|---|---|---|---|---|---|---|"]
    for task, timing in report["timing"].items():
        full, off = timing["full_finetune"], timing["emulator_finetune"]
        lines.append(
            f"| {task} | {full['seconds_per_step']:.2f} | {off['seconds_per_step']:.2f} | "
            f"{full['seconds_per_step'] / off['seconds_per_step']:.1f}× | {full['peak_rss_mb']:.0f} | "
            f"{off['peak_rss_mb']:.0f} | {full['peak_rss_mb'] / off['peak_rss_mb']:.1f}× | "
            f"{full['trainable_params'] / 1e6:.1f}M / {off['trainable_params'] / 1e6:.1f}M |")
    lines += ["", "Claims of the paper, checked on these numbers:", ""]
    lines += [f"- {c['task']}: {c['claim']}: **{'holds' if c['holds'] else 'does not hold'}**" for c in report["claims"]]
    lines += ["", "Peak RSS is the whole training process (Python, libraries, model, optimizer, activations).", ""]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib  # here, not at import: choosing pyplot's backend would change the caller's
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend (files only, no screen)
    tasks = list(report["timing"])
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        values = [headline(report["settings"][name][task]) for name in LABELS]
        axis.bar(range(len(LABELS)), values, color=["#777", "#bbb", "#1f77b4", "#ff7f0e", "#2ca02c"])
        axis.set_xticks(range(len(LABELS)), [LABELS[n].split(" (")[0].replace(", ", "\n") for n in LABELS],
                        rotation=35, ha="right", fontsize=7)
        is_choice = report["settings"]["zero_shot"][task]["task"] == "choice"
        if not is_choice:
            axis.set_yscale("log")  # a broken emulator's perplexity is orders of magnitude off
        axis.set_title(f"{task} ({'accuracy' if is_choice else 'perplexity, lower is better'})", fontsize=9)
        for x, value in enumerate(values):
            axis.text(x, value, f"{value:.3g}", ha="center", va="bottom", fontsize=7)
    figure.suptitle(f"offsite demo: {report['model']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(config, per_task: dict[str, Any], manifests: dict[str, Manifest], run: dict[str, Any]) -> Path:
    """`manifests` maps emulator method -> bundle manifest, the demo's own emulator first; `run` has the timings."""
    out = Path(config.output)
    report = build(config, per_task, manifests, run)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    chart(report, out / "report.png")
    return out
