"""The demo pipeline end to end on a tiny model and synthetic tasks (fast), and for real (slow)."""

import dataclasses
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
def tiny_tasks(monkeypatch, tmp_path_factory):
    quiz = [ChoiceExample(f"Boil fresh water, warm the pot {i}", (" tea", " road"), i % 2) for i in range(8)]
    choice = {split: ChoiceData(quiz, f"quiz:{split}") for split in tasks.SPLITS}
    text = {split: TextData([SAMPLE_TEXT], f"text:{split}") for split in tasks.SPLITS}
    monkeypatch.setitem(tasks.BUILTIN, "quiz", lambda: choice)
    monkeypatch.setitem(tasks.BUILTIN, "text", lambda: text)
    budget = TaskBudget(train_examples=8, eval_examples=4, steps=2, batch_size=4, seq_len=32, lr=1e-3, full_lr=1e-3)
    monkeypatch.setitem(BUDGETS, "quick", {"quiz": budget, "text": budget})
    shared = tmp_path_factory.mktemp("shared-emulators")  # not the user's cache
    monkeypatch.setattr("offsite.studies.demo.shared_emulators", lambda: shared)


def test_demo_writes_report_and_reuses_finished_stages(tiny_tasks, model_dirs, tmp_path, caplog, sample_text_file):
    distill = DistillConfig(corpus=str(sample_text_file), steps=2, batch_size=2, seq_len=32, eval_windows=2)
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "demo"), tasks=["quiz", "text"],
                        quick=True, isolate=False, distill=distill,
                        compare_uniform=True, ceiling=True)
    config.split.emulator_layers = 2
    out = demo(config)
    report = json.loads((out / "report.json").read_text())
    assert set(report["settings"]) == {"zero_shot", "emulator_zero_shot", "full_finetune", "emulator_finetune",
                                       "plug_in", "ceiling"}
    assert set(report["figures"]["quiz"]) == {"gain_kept", "gain_kept_of_ceiling", "ceiling_gain_kept", "protection"}
    assert "| adapter trained on the full model" in (out / "report.md").read_text()
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
    # 3 bundles (distilled, uniform, ceiling) + per task: 2 full-model stages, 4 per emulator, 2 for the ceiling
    assert ": running" not in caplog.text and caplog.text.count(": cached") == 3 + 2 * (2 + 4 * 2 + 2)


def test_the_ceiling_is_an_adapter_trained_on_an_all_layer_bundle_then_plugged(tiny_tasks, model_dirs, tmp_path):
    from offsite.api import emulate, load_for_eval, tune
    from offsite.config import EmulateConfig, SplitConfig, TrainConfig, TuneConfig
    from offsite.data.read import read_data
    from offsite.scoring import score
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "demo"), tasks=["quiz"], quick=True,
                        isolate=False, distill=None, ceiling=True)
    config.split.emulator_layers = 1
    report = json.loads((demo(config) / "report.json").read_text())
    # By hand: a bundle of both middle layers of the 6-layer model (bottom 2, top 2), tuned, plugged in.
    budget = BUDGETS["quick"]["quiz"]
    data = tmp_path / "demo" / "data"
    emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "all"),
                          split=SplitConfig(bottom=config.split.bottom, top=config.split.top, emulator_layers=2)))
    tune(TuneConfig(bundle=str(tmp_path / "all"), data=str(data / "quiz.train.jsonl"), output=str(tmp_path / "a"),
                    train=TrainConfig(max_steps=budget.steps, lr=budget.lr, batch_size=budget.batch_size,
                                      seq_len=budget.seq_len, seed=config.seed)))
    model, tokenizer = load_for_eval(str(model_dirs["llama"]), str(tmp_path / "a"), str(tmp_path / "all"))
    by_hand = score(model, tokenizer, read_data(str(data / "quiz.test.jsonl")), budget.seq_len, 8)
    assert report["settings"]["ceiling"]["quiz"] == by_hand
    assert report["timing"]["quiz"]["ceiling"]["steps"] == budget.steps


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
    from offsite.studies.stages import make_emulator
    config = DemoConfig(output=str(tmp_path), distill=None)
    distill = DistillConfig(corpus=str(sample_text_file))
    before = make_emulator(config, SplitConfig(emulator_layers=2), distill).key()
    sample_text_file.write_text(sample_text_file.read_text() + " One more sentence.")
    after = make_emulator(config, SplitConfig(emulator_layers=2), distill).key()
    assert before != after and before["distill"] == after["distill"]
    assert "corpora" not in make_emulator(config, SplitConfig(emulator_layers=2), None).key()


def test_gain_kept_is_measured_in_accuracy_or_log_perplexity_and_protection_in_points_or_ratio():
    import math

    from offsite.studies.metrics import gain_kept, protection

    def acc(value):
        return {"task": "choice", "accuracy": value}

    def ppl(value):
        return {"task": "lm", "perplexity": value}

    assert math.isclose(gain_kept(acc(0.8), acc(0.5), acc(0.9)), 0.75)
    assert math.isclose(gain_kept(acc(0.4), acc(0.5), acc(0.9)), -0.25)  # worse than zero-shot: negative
    # perplexity 40 -> 20 is a gain of log 2; 40 -> 28.28 (= 40 / sqrt 2) keeps half of it
    assert math.isclose(gain_kept(ppl(40 / math.sqrt(2)), ppl(40), ppl(20)), 0.5)
    assert gain_kept(acc(0.8), acc(0.5), acc(0.5)) is None  # the reference gained nothing: nothing to keep
    assert math.isclose(protection(acc(0.8), acc(0.6)), 0.2)
    assert math.isclose(protection(ppl(20), ppl(50)), 2.5)


def test_the_fidelity_targets_are_claims_of_the_report():
    def acc(value):
        return {"task": "choice", "accuracy": value}

    def ppl(value):
        return {"task": "lm", "perplexity": value}

    settings = {"zero_shot": {"wordnet": acc(0.5), "austen": ppl(40)},
                "emulator_zero_shot": {"wordnet": acc(0.3), "austen": ppl(45)},
                "full_finetune": {"wordnet": acc(0.9), "austen": ppl(20)},
                "emulator_finetune": {"wordnet": acc(0.8), "austen": ppl(60)},
                "plug_in": {"wordnet": acc(0.88), "austen": ppl(30)}}
    verdicts = {(c["task"], c["claim"]): c["holds"] for c in claims(settings)}
    assert verdicts[("wordnet", "plug-in keeps at least 90% of full fine-tuning's gain")]  # 0.38 / 0.40 = 95%
    assert not verdicts[("austen", "plug-in keeps at least 50% of full fine-tuning's gain")]  # log(40/30)/log 2 = 42%
    assert not verdicts[("wordnet", "emulator fine-tuned is at least 10 points worse than plug-in")]  # 8 points
    assert verdicts[("austen", "emulator fine-tuned is at least 1.5× in perplexity worse than plug-in")]  # 2×
    assert not verdicts[("austen", "emulator zero-shot is clearly worse than full zero-shot")]  # 45/40 < 1.2
    assert verdicts[("wordnet", "emulator zero-shot is clearly worse than full zero-shot")]


def test_alignment_rounds_realign_the_bundle_and_tune_on_from_the_adapter(tiny_tasks, model_dirs, tmp_path,
                                                                          sample_text_file):
    distill = DistillConfig(corpus=str(sample_text_file), steps=2, batch_size=2, seq_len=32, eval_windows=2)
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "demo"), tasks=["quiz"], quick=True,
                        isolate=False, distill=distill, align_rounds=2, align_steps=2)
    config.split.emulator_layers = 1
    out = demo(config)
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]["quiz"]
    assert [r["round"] for r in rounds] == [1, 2] and [r["adapter_steps"] for r in rounds] == [4, 6]
    assert all(set(r) >= {"plug_in", "emulator_finetune", "align_seconds"} for r in rounds)
    bundles = sorted(p.name for p in (out / "bundles").iterdir())
    assert len([b for b in bundles if "aligned" in b]) == 2
    assert "| after alignment round 2: plug-in |" in (out / "report.md").read_text()
    # The control: the same rounds of tuning on, through the unchanged emulator.
    control = demo(dataclasses.replace(config, output=str(tmp_path / "control"), align_steps=0))
    report = json.loads((control / "report.json").read_text())
    rounds = report["rounds"]["quiz"]
    assert [r["adapter_steps"] for r in rounds] == [4, 6] and not any(r["aligned"] for r in rounds)
    assert not [b for b in (control / "bundles").iterdir() if "aligned" in b.name]
    assert len([a for a in (control / "adapters").iterdir() if "-round" in a.name]) == 2  # each round tuned on
    assert "| after tuning round (control: no alignment) 2: plug-in |" in (control / "report.md").read_text()


def test_fair_budgets_choose_each_setting_s_lr_on_validation_and_stop_early(tiny_tasks, model_dirs, tmp_path, caplog):
    from offsite.api import load_for_eval
    from offsite.data.read import read_data
    from offsite.scoring import score
    from offsite.studies.stages import make_emulator
    from offsite.studies.fair import validation_value
    from offsite.studies.settings import FairBudget
    fair = FairBudget(adapter_lrs=(1e-4, 3e-3), full_lrs=(3e-4,), step_cap=2, checks=2, patience=1,
                      validation_share=1.0)
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "demo"), tasks=["quiz", "text"],
                        quick=True, isolate=False, distill=None, ceiling=True, fair_budget=True, fair=fair)
    config.split.emulator_layers = 1
    out = demo(config)
    report = json.loads((out / "report.json").read_text())
    runs = report["fair"]["runs"]["quiz"]
    assert set(runs) == {"full_finetune", "offsite", "ceiling"}
    assert [p["lr"] for p in runs["offsite"]["grid"]] == [1e-4, 3e-3] and len(runs["full_finetune"]["grid"]) == 1
    for found in runs.values():
        best = max(validation_value(p["summary"]) for p in found["grid"])
        assert validation_value(found["chosen"]["summary"]) == best  # chosen on validation, never on test
        assert all(p["summary"]["max_steps"] == 4 and p["steps"] <= 4 for p in found["grid"])
    # The data owner validated through the emulator: its kept adapter scores so on the validation data.
    chosen = runs["offsite"]["chosen"]
    bundle = make_emulator(config, config.split, None).bundle
    adapter = out / "adapters" / f"quiz-{bundle.name}-fair-{chosen['lr']:g}"
    model, tokenizer = load_for_eval(str(bundle), str(adapter))
    assert score(model, tokenizer, read_data(str(out / "data" / "quiz.validation.jsonl")), 32, 8) == \
        chosen["summary"]["best_eval"]
    assert report["fair"]["results"]["plug_in"]["quiz"] == chosen["test"]["plug_in"]
    assert set(report["fair"]["figures"]["text"]) == {"gain_kept", "gain_kept_of_ceiling", "ceiling_gain_kept",
                                                      "protection"}
    assert "Fair budgets" in (out / "report.md").read_text()
    caplog.clear()
    with caplog.at_level("INFO", logger="offsite"):
        demo(config)
    assert ": running" not in caplog.text


def test_fair_choice_is_the_best_validation_and_the_lower_lr_of_equals():
    from offsite.studies.fair import choose
    grid = [{"lr": lr, "summary": {"best_eval": {"task": "lm", "perplexity": ppl}}}
            for lr, ppl in ((1e-5, 9.0), (1e-4, 7.0), (1e-3, 7.0))]
    assert choose(grid)["lr"] == 1e-4
    grid = [{"lr": lr, "summary": {"best_eval": {"task": "choice", "accuracy": acc}}}
            for lr, acc in ((1e-5, 0.5), (1e-4, 0.4))]
    assert choose(grid)["lr"] == 1e-5


def test_a_distilled_emulator_is_built_once_and_reused_by_a_demo_with_another_out(tiny_tasks, model_dirs, tmp_path,
                                                                                 caplog, sample_text_file,
                                                                                 monkeypatch):
    import offsite.studies.demo as demo_module
    distill = DistillConfig(corpus=str(sample_text_file), steps=2, batch_size=2, seq_len=32, eval_windows=2)
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "first"), tasks=["quiz"], quick=True,
                        isolate=False, distill=distill)
    config.split.emulator_layers = 1
    first = json.loads((demo(config) / "report.json").read_text())
    calls = []
    monkeypatch.setattr(demo_module, "emulate", lambda *args: calls.append(args))  # must not run again
    config.output = str(tmp_path / "second")
    with caplog.at_level("INFO", logger="offsite"):
        second = json.loads((demo(config) / "report.json").read_text())
    assert not calls and "copied the distilled emulator built by an earlier demo" in caplog.text
    assert second["settings"]["plug_in"] == first["settings"]["plug_in"]
    (next((tmp_path / "second" / "bundles").iterdir()) / "model.safetensors").write_bytes(b"x")
    from offsite.exchange.bundle import check_bundle
    check_bundle(next(demo_module.shared_emulators().iterdir()))  # a copy, not a link: the kept one is intact


def test_a_kept_emulator_made_with_another_split_is_not_reused_but_replaced(tiny_tasks, model_dirs, tmp_path, caplog,
                                                                          sample_text_file):
    import offsite.studies.demo as demo_module
    from offsite.exchange.bundle import read_manifest
    from offsite.studies.stages import make_emulator
    distill = DistillConfig(corpus=str(sample_text_file), steps=2, batch_size=2, seq_len=32, eval_windows=2)
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "out"), tasks=["quiz"], quick=True,
                        isolate=False, distill=distill)
    one = make_emulator(config, dataclasses.replace(config.split, emulator_layers=1), distill)
    two = make_emulator(config, dataclasses.replace(config.split, emulator_layers=2), distill)
    kept = tmp_path / "kept"
    demo_module.make_bundle(config, one, kept)  # an entry of the cache, as a hand copy would leave it
    assert demo_module.made_as(read_manifest(kept), one) and not demo_module.made_as(read_manifest(kept), two)
    with caplog.at_level("WARNING", logger="offsite"):
        made = demo_module.make_bundle(config, two, kept)
    assert "ignored the kept emulator" in caplog.text and "from" not in made
    assert len(read_manifest(two.bundle).plan.emulator) == 2  # distilled anew with this run's split
    assert demo_module.made_as(read_manifest(kept), two)  # and the stale entry replaced


def test_demo_runs_every_stage_in_the_chosen_precision_and_keys_it(tiny_tasks, model_dirs, tmp_path, caplog):
    from offsite.config import DeviceConfig
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "demo"), tasks=["text"], quick=True,
                        isolate=False, distill=None, ceiling=False)
    config.split.emulator_layers = 2
    float32 = json.loads((demo(config) / "report.json").read_text())
    config.runtime = DeviceConfig(device="cpu", dtype="bfloat16")
    caplog.clear()
    with caplog.at_level("INFO", logger="offsite"):
        bf16 = json.loads((demo(config) / "report.json").read_text())
    assert ": cached" not in caplog.text.replace("bundle: cached", "")  # no float32 result stands in for bfloat16
    assert "compute dtype bfloat16" in caplog.text  # the data owner's tune ran in it
    assert bf16["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    assert float32["placement"] == {"device": "cpu", "dtype": "float32"}
    assert "Stages ran on cpu in bfloat16." in (tmp_path / "demo" / "report.md").read_text()
    for setting in ("zero_shot", "full_finetune", "plug_in"):  # computed in bfloat16: close, not equal
        low, full = bf16["settings"][setting]["text"]["perplexity"], float32["settings"][setting]["text"]["perplexity"]
        assert low != full and low == pytest.approx(full, rel=0.05), setting


def test_a_reference_report_s_full_model_rows_are_reused_and_a_different_run_refused(tiny_tasks, model_dirs,
                                                                                   tmp_path):
    from offsite.errors import OffsiteError
    first = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "first"), tasks=["quiz", "text"],
                       quick=True, isolate=False, distill=None, ceiling=True)
    first.split.emulator_layers = 1
    reference = tmp_path / "first" / "report.json"
    before = json.loads((demo(first) / "report.json").read_text())
    second = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "second"), tasks=["quiz", "text"],
                        quick=True, isolate=False, distill=None, ceiling=True, reference=str(reference))
    second.split.emulator_layers = 2  # another emulator, the same full model, data and budget
    after = json.loads((demo(second) / "report.json").read_text())
    for name in ("zero_shot", "full_finetune", "ceiling"):
        assert after["settings"][name] == before["settings"][name]
    ran = {path.name.rsplit("-", 1)[0] for path in (tmp_path / "second" / "stages").glob("*.json")}
    assert ran == {"bundle", "emulator_zero_shot", "offsite_tune", "emulator_finetune", "plug_in"}
    assert after["full_model_rows_from"] == str(reference)
    for task in ("quiz", "text"):  # the figures that depend only on the reused rows come out the same
        assert after["figures"][task]["ceiling_gain_kept"] == before["figures"][task]["ceiling_gain_kept"]
    assert after["figures"]["text"]["ceiling_gain_kept"] is not None
    assert after["settings"]["plug_in"] != before["settings"]["plug_in"] or after["split"] != before["split"]
    other_seed = DemoConfig(**{**second.to_dict(), "output": str(tmp_path / "third"), "seed": 1})
    with pytest.raises(OffsiteError, match="measured another run: seed 0 \\(now 1\\)"):
        demo(other_seed)
