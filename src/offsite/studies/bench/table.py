"""`offsite bench`'s result as a Markdown table with a few lines of context."""

from __future__ import annotations

from typing import Any


def format_bench(result: dict[str, Any]) -> str:
    """The result as a Markdown table with a few lines of context."""
    config, machine = result["config"], result["machine"]
    split = config["split"]
    threads = sorted({row["torch_threads"] for row in result["rows"]})  # the measuring processes', not ours
    allocators = sorted({row.get("allocator", "system") for row in result["rows"]})
    devices = sorted({f"{row.get('gpu') or row.get('device', 'cpu')} {row.get('dtype', 'float32')}"
                      for row in result["rows"]})
    lines = [
        f"offsite bench {result['model']}: task {config['task']}, batch {config['batch_size']} x "
        f"{config['seq_len']} tokens, split {split['bottom']}-{split['emulator_layers'] or split['drop_ratio']}-"
        f"{split['top']} (top-cached: --bottom 0, {config['epochs']} epochs), median of {config['steps']} steps "
        f"after {config['warmup_steps']} warm-up; {machine['cpu']} ({machine['cpu_count']} cores), torch threads "
        f"{'/'.join(map(str, threads))}, {'/'.join(allocators)} allocator, {', '.join(devices)}, {machine['date']}",
        "",
        "| setting | tokens/s | speed-up | FLOP limit | peak RSS MB | memory ratio | peak tensor MB | trainable params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        name = row["setting"]
        lines.append(
            f"| {name} | {row['tokens_per_s']:.0f} | {_times(result['speedup'].get(name))} | "
            f"{_times(result['flop_ratio_limit'].get(name))} | {row['peak_rss_mb']:.0f} | "
            f"{_times(result['memory_reduction'].get(name))} | {_mb(row['peak_tensor_mb'])} | "
            f"{row['trainable_params'] / 1e6:.2f}M |")
    on_gpu = [row for row in result["rows"] if row.get("device_peak_mb")]
    if on_gpu:
        lines += ["", "| setting | device | GPU peak allocated MB | GPU memory ratio |", "|---|---|---|---|"]
        lines += [f"| {row['setting']} | {row.get('gpu', row['device'])} {row['dtype']} | {row['device_peak_mb']:.0f} | "
                  f"{_times(result.get('device_memory_reduction', {}).get(row['setting']))} |" for row in on_gpu]
    runtime = [row["runtime_rss_mb"] for row in result["rows"] if row.get("runtime_rss_mb")]
    if runtime and result["memory_reduction_above_runtime"]:
        ratios = ", ".join(f"{name} {_times(value)}" for name, value in result["memory_reduction_above_runtime"].items()
                           if name != "full_ft")
        lines += ["", f"Peak RSS includes the runtime every process holds before it loads a model (Python, torch, "
                      f"transformers, peft: {min(runtime):.0f}-{max(runtime):.0f} MB). Above it, the memory ratios "
                      f"are: {ratios}."]
    lines += ["", f"FLOP limit: {result['flop_formula']}"]
    if result.get("flop_note"):
        lines.append(f"Note: {result['flop_note']}")
    evaluation = result["evaluation"]
    if evaluation:
        lines.append(
            f"choice scoring ({evaluation['examples']} examples, {evaluation['choices']} choices): offsite "
            f"{evaluation['offsite_examples_per_s']:.2f} examples/s; one forward per choice "
            f"{evaluation['naive_examples_per_s']:.2f} ({_times(evaluation['speedup'])}); all choices of an example "
            f"in one batch {evaluation['batched_examples_per_s']:.2f} ({_times(evaluation['speedup_vs_batched'])}); "
            f"largest log-likelihood difference {evaluation['max_abs_loglik_diff']:.2e}")
    return "\n".join(lines)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
