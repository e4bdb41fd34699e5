"""Where one `offsite bench` setting's training step spends its time: a torch.profiler table.

Builds the setting exactly as `offsite bench` does (same model or bundle, batch shape,
loss, optimizer), runs warm-up steps, then profiles a few steps and prints the operators
with the most self CPU time, grouped into the parts of a step.

    python benchmarks/profile_step.py smollm2-135m --setting offsite_lora --steps 3
    python benchmarks/profile_step.py smollm2-135m --setting full_ft --json > full_ft.json

It runs in this process, with this process's allocator: prefix the command with
LD_PRELOAD=<path to libtcmalloc_minimal.so.4> to profile what `offsite bench` runs by default.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from offsite import allocator
from offsite.config import SplitConfig
from offsite.studies.bench.measure import (
    LR,
    bench_sequences,
    prepare_bundles,
    prepare_trainee,
    setting_model,
    step_batches,
    train_step,
)
from offsite.studies.bench.settings import ALL_SETTINGS, CACHED, BenchConfig
from offsite.training.trainer import freeze_all_but

# Operator name fragments -> the part of a step they belong to (first match wins).
PARTS = (
    ("matmul (linear, head)", ("addmm", "mm", "bmm", "matmul", "linear")),
    ("attention", ("attention", "sdpa", "flash")),
    ("softmax / cross-entropy", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("elementwise (norms, activations, residuals)", ("mul", "add", "silu", "gelu", "pow", "rsqrt", "mean", "div",
                                                     "neg", "cat", "tanh", "sub", "exp")),
    ("memory (copies, fills, allocation)", ("copy", "fill", "zero", "empty", "clone", "contiguous", "to", "index",
                                            "gather", "scatter", "masked", "where", "embedding")),
)


def part_of(name: str) -> str:
    lowered = name.lower()
    for part, fragments in PARTS:
        if any(fragment in lowered for fragment in fragments):
            return part
    return "other"


def profile_setting(config: BenchConfig, name: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        bundles = prepare_bundles(config, Path(work))
        model, positions, _ = setting_model(config, name, bundles.get(name))
        freeze_all_but(model, positions)
        trainee = prepare_trainee(config, name, model, positions)
        count = (config.warmup_steps + steps) * config.batch_size
        batches = step_batches(bench_sequences(config, model.config.vocab_size, count), config.batch_size)
        optimizer = torch.optim.AdamW(trainee.stepped, lr=LR)
        trainee.model.train()
        with trainee.context:
            for batch in batches[: config.warmup_steps]:
                train_step(trainee.model, optimizer, trainee.loss_of, batch)
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                seconds = [train_step(trainee.model, optimizer, trainee.loss_of, batch)
                           for batch in batches[config.warmup_steps:]]
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    parts: dict[str, float] = defaultdict(float)
    for event in events:
        parts[part_of(event.key)] += event.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {
        "setting": name, "steps": steps, "step_seconds": sum(seconds) / len(seconds), "allocator": allocator.active(),
        "parts": {part: value / total for part, value in sorted(parts.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in top],
    }


def format_profile(result: dict) -> str:
    lines = [f"{result['setting']}: {result['step_seconds']:.3f} s/step (profiled, mean of {result['steps']}; "
             f"{result['allocator']} allocator)", "",
             "| part of the step | share of self CPU time |", "|---|---|"]
    lines += [f"| {part} | {share:.1%} |" for part, share in result["parts"].items()]
    lines += ["", "| operator | share | calls |", "|---|---|---|"]
    lines += [f"| `{op['op']}` | {op['share']:.1%} | {op['calls']} |" for op in result["top_ops"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--setting", default="offsite_lora", choices=[s for s in ALL_SETTINGS if s not in CACHED])
    parser.add_argument("--task", default="choice")
    parser.add_argument("--emulator-layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=160)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps, after 2 warm-up steps")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = BenchConfig(model=args.model, task=args.task, split=SplitConfig(emulator_layers=args.emulator_layers),
                         batch_size=args.batch_size, seq_len=args.seq_len, isolate=False, settings=[args.setting])
    result = profile_setting(config, args.setting, args.steps)
    print(json.dumps(result, indent=2) if args.json else format_profile(result))


if __name__ == "__main__":
    main()
