"""The demo's report: report.json (everything), report.md (the tables) and report.png (the chart)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from offsite import __version__
from offsite.bundle import Manifest
from offsite.files import write_json

LABELS = {
    "zero_shot": "full model, zero-shot",
    "emulator_zero_shot": "emulator, zero-shot",
    "full_finetune": "full fine-tuning",
    "emulator_finetune": "offsite-tuned, through the emulator",
    "plug_in": "plug-in (full model + adapter)",
}
CLOSE_ACCURACY = 0.03  # "close to full fine-tuning": within 3 points ...
CLOSE_PERPLEXITY = 0.10  # ... or within 10% perplexity


def headline(metrics: dict[str, Any]) -> float:
    """The number a task is judged by: accuracy, or perplexity (lower is better)."""
    return metrics["accuracy"] if metrics["task"] == "choice" else metrics["perplexity"]


def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return headline(a) > headline(b) if a["task"] == "choice" else headline(a) < headline(b)


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
    import torch
    import transformers
    from offsite.tasks import split_definition
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


def format_metric(metrics: dict[str, Any]) -> str:
    return f"{metrics['accuracy']:.3f}" if metrics["task"] == "choice" else f"{metrics['perplexity']:.2f}"


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


# --- `offsite ablate` ----------------------------------------------------------------------------

def _gap(plug: dict[str, Any], emulated: dict[str, Any]) -> str:
    """Plug-in minus emulator fine-tuned, in the direction where positive protects the model owner."""
    if plug["task"] == "choice":
        return f"{plug['accuracy'] - emulated['accuracy']:+.3f}"
    return f"{emulated['perplexity'] / plug['perplexity']:.2f}×"


def ablation_markdown(report: dict[str, Any]) -> str:
    zero = report["zero_shot"]
    unit = "accuracy ↑" if zero["task"] == "choice" else "perplexity ↓"
    lines = [f"# offsite ablate: {report['model']} on {report['task']} ({unit})", "",
             f"Full model zero-shot: {format_metric(zero)}. Budget: the bytes of a uniform emulator with "
             f"{report['config']['emulator_layers']} layers. Wall time {report['wall_seconds'] / 60:.1f} min "
             f"({report['stages_computed']} stages computed, {report['stages_reused']} reused).", "",
             "| method | emulator layers | emulator MB | emulator zero-shot | emulator fine-tuned | plug-in "
             "| plug-in vs emulator fine-tuned | offsite s/step |", "|---|---|---|---|---|---|---|---|"]
    for method, row in report["methods"].items():
        lines.append(f"| {method} | {row['emulator_layers']} | {row['bytes'] / 2**20:.1f} | "
                     f"{format_metric(row['emulator_zero_shot'])} | {format_metric(row['emulator_finetune'])} | "
                     f"{format_metric(row['plug_in'])} | {_gap(row['plug_in'], row['emulator_finetune'])} | "
                     f"{row['timing']['seconds_per_step']:.2f} |")
    lines += ["", "The last-but-one column is the model owner's protection: how much better the plug-in is than "
              "what the data owner can get from the emulator alone (accuracy points, or perplexity ratio).", ""]
    return "\n".join(lines)


def ablation_chart(report: dict[str, Any], path: Path) -> None:
    """The paper's Figure 4: plug-in against emulator fine-tuned, one point per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(5, 4.5))
    points = {m: (headline(r["emulator_finetune"]), headline(r["plug_in"])) for m, r in report["methods"].items()}
    for method, (x, y) in points.items():
        axis.scatter([x], [y])
        axis.annotate(method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    values = [v for xy in points.values() for v in xy] + [headline(report["zero_shot"])]
    low, high = min(values), max(values)
    axis.plot([low, high], [low, high], color="#aaa", linestyle="--", linewidth=1, label="plug-in = emulator")
    axis.axhline(headline(report["zero_shot"]), color="#777", linewidth=1, label="full model zero-shot")
    if report["zero_shot"]["task"] != "choice":
        axis.set_xscale("log")
        axis.set_yscale("log")
    axis.set_xlabel("emulator fine-tuned")
    axis.set_ylabel("plug-in")
    axis.set_title(f"{report['model']} · {report['task']}", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_ablation(report: dict[str, Any], out: Path) -> Path:
    (out / "ablate.md").write_text(ablation_markdown(report))
    ablation_chart(report, out / "ablate.png")
    return out
