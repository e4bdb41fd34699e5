"""The demo pipeline end to end on a tiny model and synthetic tasks (fast), and for real (slow)."""

import json
import subprocess
import sys

import pytest
from tiny_models import SAMPLE_TEXT

from offsite.config import DistillConfig
from offsite.data import builtin as tasks
from offsite.data.types import ChoiceData, ChoiceExample, TextData
from offsite.studies.demo import demo
from offsite.studies.demo_report import claims
from offsite.studies.settings import BUDGETS, DISTILL_BUDGETS, DemoConfig, TaskBudget


@pytest.fixture
def tiny_tasks(monkeypatch):
    quiz = [ChoiceExample(f"Boil fresh water, warm the pot {i}", (" tea", " road"), i % 2) for i in range(8)]
    choice = {split: ChoiceData(quiz, f"quiz:{split}") for split in tasks.SPLITS}
    text = {split: TextData([SAMPLE_TEXT], f"text:{split}") for split in tasks.SPLITS}
    monkeypatch.setitem(tasks.BUILTIN, "quiz", lambda: choice)
    monkeypatch.setitem(tasks.BUILTIN, "text", lambda: text)
    budget = TaskBudget(train_examples=8, eval_examples=4, steps=2, batch_size=4, seq_len=32, lr=1e-3, full_lr=1e-3)
    monkeypatch.setitem(BUDGETS, "quick", {"quiz": budget, "text": budget})


def test_demo_writes_report_and_reuses_finished_stages(tiny_tasks, model_dirs, tmp_path, caplog, sample_text_file):
    distill = DistillConfig(corpus=str(sample_text_file), steps=2, batch_size=2, seq_len=32, eval_windows=2)
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "demo"), tasks=["quiz", "text"],
                        quick=True, isolate=False, distill=distill,
                        compare_uniform=True)
    config.split.emulator_layers = 2
    out = demo(config)
    report = json.loads((out / "report.json").read_text())
    assert set(report["settings"]) == {"zero_shot", "emulator_zero_shot", "full_finetune", "emulator_finetune",
                                       "plug_in"}
    assert set(report["settings"]["plug_in"]["quiz"]) >= {"accuracy", "accuracy_norm"}
    assert "perplexity" in report["settings"]["plug_in"]["text"]
    assert report["timing"]["quiz"]["full_finetune"]["trainable_params"] > \
        report["timing"]["quiz"]["emulator_finetune"]["trainable_params"]
    assert report["emulator_method"] == "uniform+distill" and report["budget"] == "quick"
    assert set(report["other_emulators"]) == {"uniform"}  # the plain emulator is measured beside the distilled one
    assert set(report["other_emulators"]["uniform"]["plug_in"]) == {"quiz", "text"}
    assert (out / "report.png").stat().st_size > 0 and "| plug-in" in (out / "report.md").read_text()
    caplog.clear()
    with caplog.at_level("INFO", logger="offsite"):
        demo(config)
    assert ": running" not in caplog.text and caplog.text.count(": cached") == 22  # 2 bundles + per task 2 + 4 per emulator


def test_demo_distils_by_default_with_the_budget_s_settings():
    assert DemoConfig().distill == DISTILL_BUDGETS["default"]
    assert DemoConfig(quick=True).distill == DISTILL_BUDGETS["quick"]
    assert DemoConfig(distill=None).distill is None


def test_claims_are_judged_in_the_right_direction():
    def acc(value):
        return {"task": "choice", "accuracy": value}

    def ppl(value):
        return {"task": "lm", "perplexity": value}

    settings = {"zero_shot": {"c": acc(0.5), "t": ppl(20)}, "emulator_zero_shot": {"c": acc(0.3), "t": ppl(40)},
                "full_finetune": {"c": acc(0.9), "t": ppl(10)}, "emulator_finetune": {"c": acc(0.95), "t": ppl(15)},
                "plug_in": {"c": acc(0.88), "t": ppl(10.5)}}
    verdicts = {(c["task"], c["claim"]): c["holds"] for c in claims(settings)}
    assert verdicts[("c", "plug-in is close to full fine-tuning")]
    assert not verdicts[("c", "emulator fine-tuned is worse than plug-in")]
    assert verdicts[("t", "plug-in is close to full fine-tuning")]
    assert verdicts[("t", "emulator fine-tuned is worse than plug-in")]
    assert verdicts[("t", "plug-in beats zero-shot")]


@pytest.mark.slow
def test_quick_demo_on_the_built_in_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "offsite.cli", "demo", "--quick", "--out", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert set(report["settings"]["plug_in"]) == {"bbc-news", "wordnet", "austen"}
    assert (tmp_path / "d" / "report.png").is_file()


def test_an_edited_corpus_file_changes_the_emulator_s_stage_keys(tmp_path, sample_text_file):
    from offsite.config import SplitConfig
    from offsite.studies.demo import make_emulator
    config = DemoConfig(output=str(tmp_path), distill=None)
    distill = DistillConfig(corpus=str(sample_text_file))
    before = make_emulator(config, SplitConfig(emulator_layers=2), distill).key()
    sample_text_file.write_text(sample_text_file.read_text() + " One more sentence.")
    after = make_emulator(config, SplitConfig(emulator_layers=2), distill).key()
    assert before != after and before["distill"] == after["distill"]
    assert "corpora" not in make_emulator(config, SplitConfig(emulator_layers=2), None).key()
