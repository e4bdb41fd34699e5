"""The ablation's report: ablate.md (the table) and ablate.png (the paper's Figure 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offsite.studies.metrics import format_metric, headline, protection


def _gap(plug: dict[str, Any], emulated: dict[str, Any]) -> str:
    """Plug-in minus emulator fine-tuned, in the direction where positive protects the model owner."""
    value = protection(plug, emulated)
    return f"{value:+.3f}" if plug["task"] == "choice" else f"{value:.2f}×"


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
    import matplotlib  # here, not at import: choosing pyplot's backend would change the caller's
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend (files only, no screen)
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
