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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offsite.config import DistillConfig, JsonConfig, SplitConfig, _positive
from offsite.demo import (DemoConfig, build_bundles, make_emulator, prepare_task, run_emulator, stage_cache,
                          zero_shot)
from offsite.errors import ConfigError, check
from offsite.files import write_json

# Bytes of an emulator layer relative to float32, for the layer budget; the manifest records the real bytes.
INT8_BYTES = 0.25


@dataclass
class AblateConfig(JsonConfig):
    """Which methods to compare, on which task, with which budget."""

    model: str = "smollm2-135m"
    task: str = "wordnet"
    methods: list[str] = field(default_factory=lambda: ["uniform", "uniform+distill", "similarity", "share",
                                                        "lowrank", "int8"])
    output: str = "offsite-ablate"
    bottom: int = 2
    top: int = 2
    emulator_layers: int = 8
    rank_fraction: float = 0.5
    calibration: str = "austen"
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(corpus="austen"))
    quick: bool = False
    seed: int = 0
    isolate: bool = True  # train in a fresh process, as the demo does

    def __post_init__(self) -> None:
        if isinstance(self.distill, dict):
            self.distill = DistillConfig.from_dict(self.distill)
        from offsite.tasks import BUILTIN
        problems = []
        if self.task not in BUILTIN:
            problems.append(f"--task: unknown task '{self.task}'; available: {', '.join(BUILTIN)}")
        _positive(problems, emulator_layers=self.emulator_layers)
        check(problems)
        for method in self.methods:
            try:
                self.split_for(method, middle=self.emulator_layers)  # validates each --methods entry
            except ConfigError as error:
                raise ConfigError([p.replace("--method=", "--methods ") for p in error.problems]) from None

    def split_for(self, method: str, middle: int) -> SplitConfig:
        """The split of `method` (without '+distill') at the layer count that fits the byte budget."""
        base = method.removesuffix("+distill")
        split = SplitConfig(bottom=self.bottom, top=self.top, emulator_layers=1, method=base,
                            rank_fraction=self.rank_fraction, calibration=self.calibration)
        share = {"lowrank": self.rank_fraction, "int8": INT8_BYTES}.get(split.compression or "", 1.0)
        split.emulator_layers = min(middle, max(1, math.floor(self.emulator_layers / share + 1e-9)))
        return split


def ablate(config: AblateConfig) -> Path:
    """Measure every method on `config.task`; write ablate.json, ablate.md and ablate.png."""
    from offsite.loading import load_model
    from offsite.report import write_ablation
    start = time.perf_counter()
    demo_config = DemoConfig(model=config.model, output=config.output, tasks=[config.task], quick=config.quick,
                             seed=config.seed, isolate=config.isolate)
    Path(config.output).mkdir(parents=True, exist_ok=True)
    middle = load_model(config.model).config.num_hidden_layers - config.bottom - config.top
    measured = [make_emulator(demo_config, config.split_for(m, middle), config.distill if m.endswith("+distill")
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
    from offsite.bundle import load_bundle, read_manifest
    from offsite.compress import emulator_bytes
    manifest = read_manifest(bundle)
    stored = manifest.emulator.get("bytes")
    if stored is None:  # bundles written before the manifest recorded it: measure the loaded emulator
        model, manifest = load_bundle(bundle)
        first = len(manifest.plan.bottom)
        stored = emulator_bytes(model, list(range(first, first + len(manifest.plan.emulator))))
    return {"plan": manifest.plan.emulator, "bytes": stored}
