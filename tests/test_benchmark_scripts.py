"""The scripts in benchmarks/: they run on tiny models and tabulate what they claim."""

import importlib.util
from pathlib import Path

import pytest

from offsite import OffsiteError, SplitConfig
from offsite.studies.bench.settings import BenchConfig

SCRIPTS = Path(__file__).parents[1] / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_profile_script_breaks_a_step_down(model_dirs):
    script = load_script("profile_step")
    config = BenchConfig(model=str(model_dirs["llama"]), settings=["offsite_lora"], eval_examples=0, batch_size=2,
                         seq_len=16, warmup_steps=1, isolate=False, split=SplitConfig(bottom=2, top=2, emulator_layers=2))
    result = script.profile_setting(config, "offsite_lora", steps=2)
    assert result["step_seconds"] > 0 and result["parts"]["matmul (linear, head)"] > 0
    assert sum(result["parts"].values()) == pytest.approx(1.0)
    assert "| part of the step |" in script.format_profile(result)


def report(emulator_layers, emulator_ft, plug_in, ppl):
    def metrics(accuracy, perplexity):
        return {"wordnet": {"task": "choice", "accuracy": accuracy}, "austen": {"task": "lm", "perplexity": perplexity}}

    settings = {"zero_shot": metrics(0.6, 50.0), "full_finetune": metrics(0.8, 40.0),
                "emulator_finetune": metrics(emulator_ft, ppl), "plug_in": metrics(plug_in, 44.0)}
    timing = {"emulator_finetune": {"seconds_per_step": 1.5, "peak_rss_mb": 1400.0}}
    return {"split": {"bottom": 2, "emulator_layers": emulator_layers, "top": 2}, "settings": settings,
            "timing": {"wordnet": timing, "austen": timing}, "emulator": {"distill": {"heldout_perplexity_best": 150.0}}}


def test_split_table_gives_both_gaps_per_split_and_task():
    text = load_script("split_table").table([report(8, 0.4, 0.7, 160.0), report(10, 0.5, 0.75, 88.0)])
    assert "| 2-8-2 | wordnet | 0.400 | 0.700 | -10.0 pts | +30.0 pts | 1.50 | 1400 | 150 |" in text
    # austen: plug-in 44 against full FT 40 is 10% worse; against the emulator's 88, 100% better
    assert "| 2-10-2 | austen | 88.00 | 44.00 | -9.1% | +100.0% |" in text


@pytest.mark.parametrize("variants", sorted((SCRIPTS / "variants").glob("*.json")), ids=lambda p: p.stem)
def test_every_study_variant_is_a_valid_demo(variants, tmp_path):
    script = load_script("demo_sweep")
    configs = {label: script.variant_config(tmp_path, fields) for label, fields in script.read_variants(variants).items()}
    assert configs and all(config.output == str(tmp_path) for config in configs.values())


def test_a_bad_variant_is_refused(tmp_path):
    script = load_script("demo_sweep")
    with pytest.raises(OffsiteError, match="--emulator-layers=0"):
        script.variant_config(tmp_path, {"split": {"emulator_layers": 0}})


def test_partial_plug_scores_each_half_of_an_adapter_and_both_as_eval_does(model_dirs, tmp_path, sample_text_file):
    import json  # noqa: PLC0415 - this test only

    from offsite.api import evaluate  # noqa: PLC0415 - beside the import above
    from offsite.cli import main  # noqa: PLC0415 - beside the import above
    from offsite.config import EvalConfig  # noqa: PLC0415 - beside the import above

    model = str(model_dirs["llama"])
    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(json.dumps({"context": f"Boil fresh water, warm the pot {i}", "choices": [" tea", " road"],
                                           "label": i % 2}) + "\n" for i in range(6)))
    assert main(["emulate", model, "-o", str(tmp_path / "b"), "--emulator-layers", "2"]) == 0
    assert main(["tune", str(tmp_path / "b"), "--data", str(sample_text_file), "-o", str(tmp_path / "a"),
                 "--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2"]) == 0
    found = load_script("partial_plug").partial_scores(str(tmp_path / "a"), model, str(choices), None, 64)
    assert found["bottom only"]["layers"] == [0, 1] and found["top only"]["layers"] == [6, 7]
    plugged = evaluate(EvalConfig(model=model, data=str(choices), adapter=str(tmp_path / "a"), seq_len=64))
    assert {k: found["both"][k] for k in plugged} == plugged


def test_gradient_agreement_is_one_through_every_middle_layer_and_less_through_two(model_dirs, tmp_path,
                                                                                   sample_text_file):
    from offsite.cli import main  # noqa: PLC0415 - this test only

    model = str(model_dirs["llama"])
    assert main(["emulate", model, "-o", str(tmp_path / "all"), "--emulator-layers", "4"]) == 0
    assert main(["emulate", model, "-o", str(tmp_path / "two"), "--emulator-layers", "2"]) == 0
    rows = load_script("gradient_agreement").measure(model, [str(tmp_path / "all"), str(tmp_path / "two")],
                                                     str(sample_text_file), 4, 2, 32)
    assert [row["examples"] for row in rows] == [4, 4]  # a text corpus gives windows, as many as asked for
    every, two = (row["blocks"] for row in rows)
    assert set(every) == set(two) == {"0", "1", "6", "7"}
    assert all(abs(b["batch_cosine"] - 1) < 1e-6 and abs(b["summed_cosine"] - 1) < 1e-6 for b in every.values())
    assert all(abs(b["norm_ratio"] - 1) < 1e-5 for b in every.values())
    assert min(b["batch_cosine"] for b in two.values()) < 0.999  # a dropped layer changes the bottom's gradient


def test_serve_load_makes_uploadable_adapters_and_measures_routed_memory(model_dirs, tmp_path):
    from offsite.api import emulate  # noqa: PLC0415 - this test only
    from offsite.config import EmulateConfig  # noqa: PLC0415 - beside the import above
    from offsite.exchange.adapter import load_adapter  # noqa: PLC0415 - beside the import above

    model = str(model_dirs["llama"])
    emulate(EmulateConfig(model=model, output=str(tmp_path / "b"), split=SplitConfig(emulator_layers=2)))
    script = load_script("serve_load")
    adapters = script.make_adapters(model, tmp_path / "b", tmp_path / "a", 2)
    assert [load_adapter(a).layers for a in adapters] == [[0, 1, 6, 7]] * 2
    one, two = (script.routed_memory(model, [str(a) for a in adapters[:n]]) for n in (1, 2))
    assert two["weight_mb"] > one["weight_mb"] > 0 and one["peak_rss_mb"] > 0


def test_rounded_bundle_rounds_only_the_emulator_and_still_plugs(model_dirs, tmp_path, sample_text_file):
    import torch  # noqa: PLC0415 - this test only

    from offsite.arch import get_layers  # noqa: PLC0415 - beside the import above
    from offsite.cli import main  # noqa: PLC0415 - beside the import above
    from offsite.exchange.bundle import check_bundle, load_bundle  # noqa: PLC0415 - beside the import above

    model = str(model_dirs["llama"])
    assert main(["emulate", model, "-o", str(tmp_path / "all"), "--emulator-layers", "4"]) == 0
    error = load_script("rounded_bundle").round_bundle(str(tmp_path / "all"), str(tmp_path / "r"), bits=2, group=0)
    assert 0 < error < 1
    check_bundle(tmp_path / "r")  # the manifest's hashes are of the rounded files
    before, _ = load_bundle(tmp_path / "all")
    after, _ = load_bundle(tmp_path / "r")
    for position in (0, 1, 6, 7):  # the adapter blocks are untouched
        assert all(torch.equal(a, b) for a, b in zip(get_layers(before)[position].parameters(),
                                                     get_layers(after)[position].parameters()))
    weight = get_layers(after)[3].mlp.up_proj.weight
    assert all(len(row.unique()) <= 3 for row in weight)  # 2 bits: -s, 0, +s per row
    assert not torch.equal(weight, get_layers(before)[3].mlp.up_proj.weight)
    assert main(["tune", str(tmp_path / "r"), "--data", str(sample_text_file), "-o", str(tmp_path / "a"),
                 "--max-steps", "2", "--seq-len", "32", "--batch-size", "2"]) == 0
    assert main(["plug", model, str(tmp_path / "a"), "-o", str(tmp_path / "p")]) == 0


def test_indomain_corpus_keeps_the_text_and_drops_the_prompts():
    script = load_script("indomain_corpus")
    assert script.article_text("Article: Rain fell on Leeds.\nTopic:") == "Rain fell on Leeds."
    assert script.dictionary_line("Definition: a small boat\nWord:", " dinghy") == "dinghy: a small boat"
