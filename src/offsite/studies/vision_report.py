"""The vision demo's report: report.json (everything) and report.md (the table and the paper's claims)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
import transformers

from offsite import __version__
from offsite.config import TrainConfig
from offsite.exchange.bundle import Manifest
from offsite.files import write_json
from offsite.studies.metrics import gain_kept

LABELS = {
    "linear_probe": "linear probe of the full model (blocks frozen, new head)",
    "emulator_linear_probe": "linear probe of the emulator",
    "full_finetune": "full fine-tuning",
    "emulator_finetune": "offsite-tuned, through the emulator",
    "plug_in": "plug-in (full model + adapter and head)",
    "ceiling": "adapter trained on the full model (diagnostic: the ceiling)",
}
TRAINED = ("linear_probe", "emulator_linear_probe", "full_finetune", "emulator_finetune", "ceiling")
CLOSE = 0.03  # "close to full fine-tuning": within 3 accuracy points
CLEARLY_WORSE = 0.05  # "the emulator alone is clearly worse": at least 5 points below the full model


def figures(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Gains over the linear probe (what a frozen model gives on new labels) and the model owner's protection."""
    probe, full_ft = results["linear_probe"], results["full_finetune"]
    accuracy = {name: result["accuracy"] for name, result in results.items()}
    return {
        "gain_kept": gain_kept(results["plug_in"], probe, full_ft),
        "ceiling_gain_kept": gain_kept(results["ceiling"], probe, full_ft),
        "protection": accuracy["plug_in"] - accuracy["emulator_finetune"],
        "emulator_probe_gap": accuracy["linear_probe"] - accuracy["emulator_linear_probe"],
    }


def claims(results: dict[str, dict[str, Any]], timing: dict[str, Any]) -> list[dict[str, Any]]:
    accuracy = {name: result["accuracy"] for name, result in results.items()}
    full, offsite = timing["full_finetune"], timing["emulator_finetune"]
    return [
        {"claim": "plug-in beats the linear probe", "holds": accuracy["plug_in"] > accuracy["linear_probe"]},
        {"claim": f"plug-in is within {CLOSE * 100:.0f} points of full fine-tuning",
         "holds": accuracy["full_finetune"] - accuracy["plug_in"] <= CLOSE},
        {"claim": "emulator fine-tuned is worse than plug-in", "holds": accuracy["emulator_finetune"] < accuracy["plug_in"]},
        {"claim": f"the emulator's linear probe is at least {CLEARLY_WORSE * 100:.0f} points below the full model's",
         "holds": accuracy["linear_probe"] - accuracy["emulator_linear_probe"] >= CLEARLY_WORSE},
        {"claim": "offsite-tuning trains faster per step than full fine-tuning",
         "holds": offsite["seconds_per_step"] < full["seconds_per_step"]},
        {"claim": "offsite-tuning needs less memory than full fine-tuning",
         "holds": offsite["peak_rss_mb"] < full["peak_rss_mb"]},
    ]


def build(config, results: dict[str, Any], timing: dict[str, Any], sizes: dict[str, Any], manifest: Manifest,
          run: dict[str, Any], split_definition: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": config.model, "task": config.task, "budget": config.budget_name,
        "train_settings": {"steps": config.budget.steps, "batch_size": config.budget.batch_size,
                           "adapter_lr": config.budget.lr, "full_lr": config.budget.full_lr,
                           "head_lr_scale": TrainConfig().head_lr_scale},
        "split": {**config.split.to_dict(), "layers": manifest.to_dict()["layers"]},
        "emulator": manifest.emulator,
        "settings": results, "timing": timing, "figures": figures(results), "claims": claims(results, timing),
        "data": sizes, "split_definition": split_definition, "seed": config.seed,
        "adapter_training": config.adapter_training, **run,
        "versions": {"offsite": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
    }


def markdown(report: dict[str, Any]) -> str:
    kept = [e["original_index"] for e in report["split"]["layers"] if e["role"] == "emulator"]
    train, found = report["train_settings"], report["figures"]
    distilled = (report["emulator"] or {}).get("distill")
    lines = [
        f"# offsite vision demo: {report['model']} on {report['task']}",
        "",
        f"Split: bottom {report['split']['bottom']}, top {report['split']['top']}, the emulator keeps "
        f"{len(kept)} middle blocks {kept}" + (", distilled on hidden states" if distilled else ", not distilled")
        + f". Budget: {report['budget']} ({report['data']['train']} training images, {report['data']['test']} test "
        f"images, labels {', '.join(report['data']['labels'])}; {train['steps']} steps of batch {train['batch_size']}, "
        f"lr {train['adapter_lr']:g} for the adapter and probes, {train['full_lr']:g} for full fine-tuning, every new "
        f"head at {train['head_lr_scale']:g}x). Wall time: {report['wall_seconds'] / 60:.1f} min ({report['stages_computed']} stages "
        f"computed, {report['stages_reused']} reused). Stages ran on {report['placement']['device']} in "
        f"{report['placement']['dtype']}.",
        "",
        "| setting | test accuracy | trainable params | s/step | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for name, label in LABELS.items():
        cost = report["timing"].get(name if name != "plug_in" else "emulator_finetune")
        cells = ([_count(cost["trainable_params"]), f"{cost['seconds_per_step']:.3f}",
                  f"{cost['peak_rss_mb']:.0f}"] if cost and name != "plug_in" else ["(the adapter above)", "", ""])
        lines.append(f"| {label} | {report['settings'][name]['accuracy']:.3f} | " + " | ".join(cells) + " |")
    full, offsite = report["timing"]["full_finetune"], report["timing"]["emulator_finetune"]
    lines += [
        "",
        f"- Gain kept: the plug-in keeps **{_share(found['gain_kept'])}** of full fine-tuning's gain over the linear "
        f"probe, (plug-in − probe) / (full FT − probe); the ceiling keeps {_share(found['ceiling_gain_kept'])}.",
        f"- Protection: the plug-in is {found['protection'] * 100:+.1f} points above the emulator fine-tuned; the "
        f"emulator's linear probe is {found['emulator_probe_gap'] * 100:+.1f} points below the full model's.",
        f"- Cost: offsite-tuning {full['seconds_per_step'] / offsite['seconds_per_step']:.1f}x faster per step and "
        f"{full['peak_rss_mb'] / offsite['peak_rss_mb']:.1f}x less peak memory than full fine-tuning "
        f"({_count(offsite['trainable_params'])} of {_count(full['trainable_params'])} parameters trained).",
        "",
        "Claims of the paper, checked on these numbers:",
        "",
    ]
    lines += [f"- {c['claim']}: **{'holds' if c['holds'] else 'does not hold'}**" for c in report["claims"]]
    lines += ["", "Peak RSS is the whole training process (Python, libraries, model, optimizer, activations).", ""]
    return "\n".join(lines)


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.2f}M" if parameters >= 100_000 else f"{parameters:,}"  # a head alone is small


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def write_vision_report(config, results: dict[str, Any], timing: dict[str, Any], sizes: dict[str, Any],
                        manifest: Manifest, run: dict[str, Any], split_definition: dict[str, Any]) -> Path:
    out = Path(config.output)
    report = build(config, results, timing, sizes, manifest, run, split_definition)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    return out
