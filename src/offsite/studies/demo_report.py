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
from offsite.studies.lm_eval_rows import lm_eval_markdown
from offsite.studies.metrics import better, format_metric, format_protection, gain_kept, headline, protection

LABELS = {
    "zero_shot": "full model, zero-shot",
    "emulator_zero_shot": "emulator, zero-shot",
    "full_finetune": "full fine-tuning",
    "emulator_finetune": "offsite-tuned, through the emulator",
    "plug_in": "plug-in (full model + adapter)",
}
CEILING_LABEL = "adapter trained on the full model (diagnostic: the ceiling)"
CLOSE_ACCURACY = 0.03  # "close to full fine-tuning": within 3 points ...
CLOSE_PERPLEXITY = 0.10  # ... or within 10% perplexity
# The fidelity targets: the share of full fine-tuning's gain the plug-in keeps (accuracy, or log-perplexity) ...
GAIN_KEPT_TARGET = {"choice": 0.90, "lm": 0.50}
# ... and the model owner's protection: the plug-in at least this much better than the emulator fine-tuned,
# on the tasks where it is asked for (a topic task is easy for any stack of layers, so not there).
PROTECTION_TARGET = {"wordnet": 0.10, "austen": 1.5}  # accuracy points; perplexity ratio
# "Clearly worse": the emulator alone below the full model by at least this (accuracy points, perplexity ratio).
CLEARLY_WORSE = {"choice": 0.05, "lm": 1.2}


def figures(settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: the share of full fine-tuning's (and of the ceiling's) gain kept, and the protection."""
    found = {}
    for task, plug in settings["plug_in"].items():
        zero, full_ft = settings["zero_shot"][task], settings["full_finetune"][task]
        ceiling = settings.get("ceiling", {}).get(task)
        found[task] = {
            "gain_kept": gain_kept(plug, zero, full_ft),
            "gain_kept_of_ceiling": gain_kept(plug, zero, ceiling) if ceiling else None,
            "ceiling_gain_kept": gain_kept(ceiling, zero, full_ft) if ceiling else None,
            "protection": protection(plug, settings["emulator_finetune"][task]),
        }
    return found


def _clearly_worse(full: dict[str, Any], emulator: dict[str, Any]) -> bool:
    if full["task"] == "choice":
        return full["accuracy"] - emulator["accuracy"] >= CLEARLY_WORSE["choice"]
    return emulator["perplexity"] / full["perplexity"] >= CLEARLY_WORSE["lm"]


def claims(settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims and the fidelity targets, checked task by task against the measured numbers."""
    found = []
    measured = figures(settings)
    for task, plug in settings["plug_in"].items():
        full_ft, emulated = settings["full_finetune"][task], settings["emulator_finetune"][task]
        gap = headline(full_ft) - headline(plug)
        close = gap <= CLOSE_ACCURACY if plug["task"] == "choice" else -gap / headline(full_ft) <= CLOSE_PERPLEXITY
        kept, target = measured[task]["gain_kept"], GAIN_KEPT_TARGET[plug["task"]]
        found += [
            {"task": task, "claim": "plug-in beats zero-shot", "holds": better(plug, settings["zero_shot"][task])},
            {"task": task, "claim": "plug-in is close to full fine-tuning", "holds": bool(close)},
            {"task": task, "claim": f"plug-in keeps at least {target:.0%} of full fine-tuning's gain",
             "holds": kept is not None and kept >= target},
            {"task": task, "claim": "emulator fine-tuned is worse than plug-in", "holds": better(plug, emulated)},
            {"task": task, "claim": "emulator zero-shot is clearly worse than full zero-shot",
             "holds": _clearly_worse(settings["zero_shot"][task], settings["emulator_zero_shot"][task])},
        ]
        if task in PROTECTION_TARGET:
            wanted = PROTECTION_TARGET[task]
            wording = f"{wanted * 100:.0f} points" if plug["task"] == "choice" else f"{wanted}× in perplexity"
            found.append({"task": task, "claim": f"emulator fine-tuned is at least {wording} worse than plug-in",
                          "holds": measured[task]["protection"] >= wanted})
    return found


EMULATOR_SETTINGS = ("emulator_zero_shot", "emulator_finetune", "plug_in")


def build(config, per_task: dict[str, Any], manifests: dict[str, Manifest], run: dict[str, Any]) -> dict[str, Any]:
    primary, *others = manifests
    settings = {name: {task: r["results"][name] for task, r in per_task.items()} for name in LABELS}
    if all("ceiling" in r["results"] for r in per_task.values()):
        settings["ceiling"] = {task: r["results"]["ceiling"] for task, r in per_task.items()}
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
        "rounds": {task: r["rounds"] for task, r in per_task.items() if r.get("rounds")},
        "lm_eval": {task: r["lm_eval"] for task, r in per_task.items() if r.get("lm_eval")},
        "figures": figures(settings),
        "claims": claims(settings),
        "fair": fair_report(config, per_task, settings),
        "data": {task: {"sizes": r["sizes"], "budget": r["budget"]} for task, r in per_task.items()},
        "split_definition": split_definition(),
        "seed": config.seed,
        "adapter_training": config.adapter_training,
        **run,
        "versions": {"offsite": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
    }


# The fair comparison's rows: setting, the grid it comes from, and what its test score is.
FAIR_ROWS = (("full_finetune", "full_finetune", "full_finetune"), ("emulator_finetune", "offsite", "emulator_finetune"),
             ("plug_in", "offsite", "plug_in"), ("ceiling", "ceiling", "plug_in"))


def fair_report(config, per_task: dict[str, Any], settings: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The fair comparison (`--fair-budget`): each setting's chosen run, its test results and figures."""
    fair = {task: r["fair"] for task, r in per_task.items() if "fair" in r}
    if not fair:
        return None
    results = {name: {task: grids[grid]["chosen"]["test"][scored] for task, grids in fair.items() if grid in grids}
               for name, grid, scored in FAIR_ROWS}
    return {"budget": config.fair.to_dict(), "results": results,
            "figures": figures({"zero_shot": settings["zero_shot"], **results}), "runs": fair}


def figures_table(tasks: list[str], found: dict[str, Any], plug_in: dict[str, Any]) -> list[str]:
    """The gain-kept and protection table of `figures`' results, one row per task."""
    lines = ["| task | gain kept (of full FT) | gain kept (of the ceiling) | ceiling's gain kept (of full FT) "
             "| protection |", "|---|---|---|---|---|"]
    for task in tasks:
        numbers = found[task]
        lines.append(f"| {task} | {_share(numbers['gain_kept'])} | {_share(numbers['gain_kept_of_ceiling'])} | "
                     f"{_share(numbers['ceiling_gain_kept'])} | "
                     f"{format_protection(plug_in[task], numbers['protection'])} |")
    return lines


def fair_markdown(report: dict[str, Any]) -> list[str]:
    fair = report["fair"]
    tasks = list(fair["runs"])
    budget = fair["budget"]
    lines = ["", f"Fair budgets (`--fair-budget`): each trained setting's own learning rate, chosen on validation "
             f"data ({budget['validation_share']:.0%} of the test size; the data owner validates through the "
             f"emulator) from the grid {list(budget['adapter_lrs'])} (adapter) or {list(budget['full_lrs'])} "
             f"(full fine-tuning), trained until {budget['patience']} validations in a row bring no improvement "
             f"within {budget['step_cap']:g}× the budget's steps, best checkpoint kept:", "",
             "| setting | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    labels = {**LABELS, "ceiling": CEILING_LABEL}
    for name, _, _ in FAIR_ROWS:
        cells = [format_metric(fair["results"][name][t]) if t in fair["results"][name] else "n/a" for t in tasks]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines += ["", *figures_table(tasks, fair["figures"], fair["results"]["plug_in"])]
    lines += ["", "| task | trained setting | lr chosen | steps run (best step) | validation of each lr | "
              "train min, chosen lr / whole grid |", "|---|---|---|---|---|---|"]
    for task, grids in fair["runs"].items():
        for grid, found in grids.items():
            chosen = found["chosen"]
            validations = ", ".join(f"{p['lr']:g}: {format_metric(p['summary']['best_eval'])}" for p in found["grid"])
            lines.append(f"| {task} | {grid} | {chosen['lr']:g} | {chosen['steps']} ({chosen['best_step']}) | "
                         f"{validations} | {chosen['seconds'] / 60:.1f} / {found['grid_seconds'] / 60:.1f} |")
    return lines


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
        + (f" Stages ran on {report['placement']['device']} in {report['placement']['dtype']}."
           if "placement" in report else "")
        + (f" Adapter training overrides: {report['adapter_training']}." if report.get("adapter_training") else ""),
        "",
        "| setting | " + " | ".join(f"{t} ({u})" for t, u in zip(tasks, units)) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for name, label in LABELS.items():
        lines.append(f"| {label} | " + " | ".join(format_metric(report["settings"][name][t]) for t in tasks) + " |")
    if "ceiling" in report["settings"]:
        lines.append(f"| {CEILING_LABEL} | "
                     + " | ".join(format_metric(report["settings"]["ceiling"][t]) for t in tasks) + " |")
    rounds = report.get("rounds") or {}
    for number in range(1, 1 + max((len(r) for r in rounds.values()), default=0)):
        for name, label in (("emulator_finetune", "through the emulator"), ("plug_in", "plug-in")):
            cells = [format_metric(rounds[t][number - 1][name]) if len(rounds.get(t, [])) >= number else "n/a"
                     for t in tasks]
            what = "alignment round" if any(r[number - 1].get("aligned", True) for r in rounds.values()
                                            if len(r) >= number) else "tuning round (control: no alignment)"
            lines.append(f"| after {what} {number}: {label} | " + " | ".join(cells) + " |")
    for method, rows in report.get("other_emulators", {}).items():
        for name in EMULATOR_SETTINGS:
            label = LABELS[name].replace("emulator", f"{method} emulator").replace("adapter)", f"{method} adapter)")
            lines.append(f"| {label} | " + " | ".join(format_metric(rows[name][t]) for t in tasks) + " |")
    lines += ["", "What the plug-in keeps of full fine-tuning's gain over zero-shot, (plug-in − zero-shot) / "
              "(full FT − zero-shot), in accuracy or log-perplexity; the same against the ceiling; and the model "
              "owner's protection, plug-in against emulator fine-tuned (accuracy points, or the emulator's "
              "perplexity over the plug-in's):", "",
              *figures_table(tasks, report["figures"], report["settings"]["plug_in"])]
    if rounds:
        lines += ["", "Alignment rounds (`offsite align`, then tuning on from the returned adapter; align s 0: the "
                  "control, tuning on through the unchanged emulator):", "",
                  "| task | round | adapter steps | plug-in | gain kept (of full FT) | protection | align s |",
                  "|---|---|---|---|---|---|---|"]
        for task, found in rounds.items():
            zero, full_ft = report["settings"]["zero_shot"][task], report["settings"]["full_finetune"][task]
            for r in found:
                kept = gain_kept(r["plug_in"], zero, full_ft)
                lines.append(f"| {task} | {r['round']} | {r['adapter_steps']} | {format_metric(r['plug_in'])} | "
                             f"{_share(kept)} | "
                             f"{format_protection(r['plug_in'], protection(r['plug_in'], r['emulator_finetune']))} | "
                             f"{r['align_seconds']:.0f} |")
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
    if report.get("fair"):
        lines += fair_markdown(report)
    if report.get("lm_eval"):
        lines += ["", "Scored by lm-eval as well (`--lm-eval`; metric as lm-eval names it):"]
        lines += lm_eval_markdown(report["lm_eval"], LABELS)
    lines += ["", "Claims of the paper, checked on these numbers (the equal-steps table):", ""]
    lines += [f"- {c['task']}: {c['claim']}: **{'holds' if c['holds'] else 'does not hold'}**" for c in report["claims"]]
    lines += ["", "Peak RSS is the whole training process (Python, libraries, model, optimizer, activations).", ""]
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


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
