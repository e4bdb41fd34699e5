"""`offsite ablate`: emulator methods side by side on one task, at an equal emulator budget.

For each method it measures what the paper's Figure 4 plots: how good the
plug-in becomes (the data owner's gain) against how good the emulator is on
its own, zero-shot and fine-tuned (what the model owner gives away). The gap
between plug-in and emulator fine-tuned is the model owner's protection.

Budgets are bytes shipped: every method gets as many emulator layers as fit in
the bytes of the `uniform` emulator with `--emulator-layers` layers (low-rank
and int8 layers are smaller, so those methods keep more of them). The stages
are the demo's, cached in the same way, so an ablation sharing the demo's
output directory reuses the demo's results.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from offsite.config import SplitConfig
from offsite.emulator.compress import COMPRESSIONS, emulator_bytes
from offsite.exchange.bundle import load_bundle, read_manifest
from offsite.files import write_json
from offsite.loading import load_config
from offsite.studies.ablate_report import write_ablation
from offsite.studies.demo import build_bundles, run_emulator, stage_cache, zero_shot
from offsite.studies.stages import make_emulator, prepare_task
from offsite.studies.settings import AblateConfig, DemoConfig


def budget_split(config: AblateConfig, method: str, middle: int) -> SplitConfig:
    """The split of `method` with as many layers as fit in the bytes of the uniform emulator's layers."""
    split = config.split_for(method)
    share = COMPRESSIONS[split.compression].byte_share(config.rank_fraction) if split.compression else 1.0
    split.emulator_layers = min(middle, max(1, math.floor(config.emulator_layers / share + 1e-9)))
    return split


def ablate(config: AblateConfig) -> Path:
    """Measure every method on `config.task`; write ablate.json, ablate.md and ablate.png."""
    start = time.perf_counter()
    demo_config = DemoConfig(model=config.model, output=config.output, tasks=[config.task], quick=config.quick,
                             seed=config.seed, isolate=config.isolate, runtime=config.runtime)
    Path(config.output).mkdir(parents=True, exist_ok=True)
    middle = load_config(config.model).num_hidden_layers - config.bottom - config.top
    measured = [make_emulator(demo_config, budget_split(config, m, middle), config.distill if m.endswith("+distill")
                              else None) for m in config.methods]
    cache = stage_cache(demo_config)
    build_bundles(demo_config, cache, measured)
    run = prepare_task(demo_config, config.task)
    methods: dict[str, Any] = {}
    for method, emulator in zip(config.methods, measured):
        result = run_emulator(demo_config, cache, config.task, emulator, run.files, run.budget, run.inputs)
        manifest = _manifest(emulator.bundle)
        methods[method] = {**result["results"], "emulator_layers": len(manifest["plan"]),
                           "bytes": manifest["bytes"], "timing": result["timing"]}
    report = {"model": config.model, "task": config.task, "zero_shot": zero_shot(demo_config, cache, run),
              "methods": methods, "config": config.to_dict(), "budget": run.inputs["budget"], "sizes": run.sizes,
              "wall_seconds": time.perf_counter() - start, "stages_computed": cache.computed,
              "stages_reused": cache.reused}
    write_json(Path(config.output) / "ablate.json", report)
    return write_ablation(report, Path(config.output))


def _manifest(bundle: Path) -> dict[str, Any]:
    manifest = read_manifest(bundle)
    stored = manifest.emulator.get("bytes")
    if stored is None:  # bundles written before the manifest recorded it: measure the loaded emulator
        model, manifest = load_bundle(bundle)
        first = len(manifest.plan.bottom)
        stored = emulator_bytes(model, list(range(first, first + len(manifest.plan.emulator))))
    return {"plan": manifest.plan.emulator, "bytes": stored}
