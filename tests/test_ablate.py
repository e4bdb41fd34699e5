"""`offsite ablate` on a tiny model and a synthetic task."""

import json

import pytest
from test_demo import tiny_tasks  # noqa: F401  (fixture)

from offsite.config import DistillConfig
from offsite.errors import OffsiteError
from offsite.studies.ablate import ablate, budget_split
from offsite.studies.settings import AblateConfig


def test_layer_budget_gives_smaller_layers_more_depth():
    config = AblateConfig(emulator_layers=8, rank_fraction=0.5)
    assert budget_split(config, "uniform", 26).emulator_layers == 8
    assert budget_split(config, "similarity+share", 26).emulator_layers == 8
    assert budget_split(config, "lowrank", 26).emulator_layers == 16
    assert budget_split(config, "int8", 26).emulator_layers == 26  # 32 would fit; the model has 26
    assert budget_split(config, "uniform+distill", 26).method == "uniform"


def test_unknown_method_or_task_is_refused():
    with pytest.raises(OffsiteError, match="--methods 'banana' is not known"):
        AblateConfig(methods=["banana"])
    with pytest.raises(OffsiteError, match="--task"):
        AblateConfig(task="nope")
    with pytest.raises(OffsiteError, match="--emulator-layers=0 must be greater than 0"):
        AblateConfig(emulator_layers=0)


def test_ablate_measures_every_method_and_reports_the_gap(tiny_tasks, model_dirs, tmp_path, sample_text_file):  # noqa: F811
    config = AblateConfig(model=str(model_dirs["llama"]), task="quiz", output=str(tmp_path / "ablate"),
                          methods=["uniform", "uniform+distill", "share", "int8"], emulator_layers=2,
                          calibration=str(sample_text_file), quick=True, isolate=False,
                          distill=DistillConfig(corpus=str(sample_text_file), steps=2, batch_size=2, seq_len=32))
    out = ablate(config)
    report = json.loads((out / "ablate.json").read_text())
    assert list(report["methods"]) == config.methods
    rows = report["methods"]
    assert rows["int8"]["emulator_layers"] == 4 and rows["uniform"]["emulator_layers"] == 2
    assert rows["int8"]["bytes"] < 0.7 * rows["uniform"]["bytes"] * 2  # twice the layers in a third of the bytes each
    for row in rows.values():
        assert {"emulator_zero_shot", "emulator_finetune", "plug_in"} <= set(row)
    assert "| int8 | 4 |" in (out / "ablate.md").read_text() and (out / "ablate.png").stat().st_size > 0


@pytest.mark.slow
def test_ablate_on_the_built_in_model(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "ablate"
    result = subprocess.run([sys.executable, "-m", "offsite.cli", "ablate", "--quick", "--task", "wordnet",
                             "--methods", "uniform", "share", "int8", "--out", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "ablate.json").read_text())
    assert list(report["methods"]) == ["uniform", "share", "int8"]
    assert report["methods"]["int8"]["emulator_layers"] == 26
