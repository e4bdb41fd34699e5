"""The lm-eval bridge: the `offsite` model type scores what `offsite eval` scores, through offsite's own loading."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import SAMPLE_TEXT, save_tiny_model

from offsite.arch import get_layers

from offsite.cli import main
from offsite.errors import OffsiteError

lm_eval = pytest.importorskip("lm_eval")

from offsite.api import evaluate  # noqa: E402 - after the skip: the rest needs lm-eval
from offsite.config import EvalConfig  # noqa: E402
from offsite.lmeval.model import OffsiteLM  # noqa: E402
from offsite.lmeval.run import metrics, run_lm_eval  # noqa: E402
from offsite.lmeval.tasks import write_task  # noqa: E402
from offsite.studies.demo import demo  # noqa: E402
from offsite.studies.settings import DemoConfig  # noqa: E402
from test_demo import tiny_tasks  # noqa: E402, F401 - the demo's tiny built-in tasks (a fixture)

CHOICES = [
    ("The old lighthouse stood at the edge of the", [" harbour", " market", " tea kettle"], 0),
    ("Boil fresh water, warm the", [" pot", " river"], 1),
    ("A heron waited in the shallow", [" water", " soup", " city", " road"], 2),
    ("Every evening the keeper climbed the narrow", [" stairs", " apples"], 0),
    ("Farmers brought bread, cheese,", [" apples and honey", " a lighthouse"], 1),
    ("The beam swept across the", [" water", " market square", " soup"], 0),
]


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exchange(tmp_path_factory, model_dirs):
    """A tiny full model, its 2-2-2 bundle and a trained adapter, a choice file and a text file."""
    folder = tmp_path_factory.mktemp("lmeval")
    model = str(model_dirs["llama"])
    (folder / "train.txt").write_text(SAMPLE_TEXT)
    (folder / "story.txt").write_text(SAMPLE_TEXT[:900])
    with open(folder / "choices.jsonl", "w") as handle:
        for context, choices, label in CHOICES:
            handle.write(json.dumps({"context": context, "choices": choices, "label": label}) + "\n")
    assert main(["emulate", model, "-o", str(folder / "bundle"), "--emulator-layers", "2"]) == 0
    assert main(["tune", str(folder / "bundle"), "--data", str(folder / "train.txt"), "-o", str(folder / "adapter"),
                 "--max-steps", "4", "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3"]) == 0
    return folder, model


def offsite_scores(model, data, adapter=None, bundle=None):
    return evaluate(EvalConfig(model=model, data=data, adapter=adapter, bundle=bundle, seq_len=128))


def lm_eval_scores(lm, task, **kwargs):
    return metrics(run_lm_eval(lm, [task], **kwargs))


def test_a_bundle_and_adapter_through_lm_eval_score_as_offsite_eval(exchange):
    """lm-eval's registry builds the `offsite` model type from its model_args, as `lm_eval --model offsite` does."""
    folder, _ = exchange
    bundle, adapter, choices = str(folder / "bundle"), str(folder / "adapter"), str(folder / "choices.jsonl")
    lm = lm_eval.api.registry.get_model("offsite").create_from_arg_string(
        f"pretrained={bundle},adapter={adapter},device=cpu,dtype=float32,max_length=128")
    found = next(iter(lm_eval_scores(lm, choices).values()))
    ours = offsite_scores(bundle, choices, adapter)
    assert (found["acc"], found["acc_norm"]) == (ours["accuracy"], ours["accuracy_norm"])
    trained = load_file(str(folder / "adapter" / "adapter.safetensors"))  # the model scored carries the adapter
    name = next(k for k in trained if k.startswith("layers.0.") and k.endswith("q_proj.weight"))
    assert torch.equal(get_layers(lm.model)[0].state_dict()[name[len("layers.0."):]], trained[name])


def test_each_choice_loglikelihood_equals_offsite_scoring(exchange):
    """Per request, not only in the aggregate: lm-eval's loglikelihood is offsite's choice log-likelihood."""
    from lm_eval.api.instance import Instance  # noqa: PLC0415 - lm-eval is optional (importorskip above)

    from offsite.data.types import ChoiceExample  # noqa: PLC0415 - beside the import above
    from offsite.scoring import choice_logliks  # noqa: PLC0415 - beside the import above

    folder, model = exchange
    lm = OffsiteLM(pretrained=model, adapter=str(folder / "adapter"), bundle=str(folder / "bundle"), device="cpu",
                   max_length=128)
    requests = [Instance("loglikelihood", {}, (context, choice), i)
                for i, (context, choices, _) in enumerate(CHOICES) for choice in choices]
    found = [total for total, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    expected = [value for context, choices, label in CHOICES
                for value in choice_logliks(lm.model, lm.tokenizer, ChoiceExample(context, tuple(choices), label), 128)]
    assert found == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_rolling_equals_offsite_perplexity(exchange):
    """One document: lm-eval's bits per byte, turned back into a log-likelihood, is offsite's perplexity."""
    folder, model = exchange
    text = str(folder / "story.txt")
    lm = OffsiteLM(pretrained=model, device="cpu", max_length=64)
    found = next(iter(lm_eval_scores(lm, text).values()))
    ours = evaluate(EvalConfig(model=model, data=text, seq_len=64))
    loglik = -found["bits_per_byte"] * len((folder / "story.txt").read_text().encode()) * math.log(2)
    assert math.exp(-loglik / ours["n"]) == pytest.approx(ours["perplexity"], rel=1e-5)


def test_a_wrong_base_adapter_is_refused_through_lm_eval(exchange, tmp_path):
    folder, _ = exchange
    other = save_tiny_model("llama", tmp_path / "other", num_layers=8, seed=1)
    assert main(["emulate", str(other), "-o", str(tmp_path / "other-bundle"), "--emulator-layers", "2"]) == 0
    with pytest.raises(OffsiteError, match="was not trained for bundle"):
        lm_eval.api.registry.get_model("offsite").create_from_arg_string(
            f"pretrained={tmp_path / 'other-bundle'},adapter={folder / 'adapter'}")


def test_generate_until_stops_at_the_stop_string(exchange):
    from lm_eval.api.instance import Instance  # noqa: PLC0415 - lm-eval is optional (importorskip above)

    _, model = exchange
    lm = OffsiteLM(pretrained=model, device="cpu")
    free = lm.generate_until([Instance("generate_until", {}, ("The old lighthouse", {"max_gen_toks": 12}), 0)],
                             disable_tqdm=True)[0]
    assert free  # a random model still says something
    stop = free.strip()[:2]
    cut = lm.generate_until([Instance("generate_until", {}, ("The old lighthouse", {"max_gen_toks": 12,
                                                                                    "until": [stop]}), 0)],
                            disable_tqdm=True)[0]
    assert stop not in cut and free.startswith(cut)


def test_cli_eval_prints_both_scores_and_writes_lm_evals_json(exchange, tmp_path, capsys):
    folder, _ = exchange
    choices, output = str(folder / "choices.jsonl"), tmp_path / "lm-eval.json"
    code, out, _ = cli(capsys, "eval", str(folder / "bundle"), "--adapter", str(folder / "adapter"), "--data", choices,
                       "--lm-eval", choices, "--seq-len", "128", "--lm-eval-output", str(output), "--json")
    result = json.loads(out)
    (task, found), = result["lm_eval"].items()
    assert code == 0 and task.startswith("offsite_choices_") and found["acc"] == result["accuracy"]
    assert json.loads(output.read_text())["results"][task]["acc,none"] == found["acc"]
    code, out, _ = cli(capsys, "eval", str(folder / "bundle"), "--lm-eval", choices, "--limit", "2")
    assert code == 0 and "|acc_norm|" in out and "task:" not in out  # lm-eval's table alone, on 2 examples


def test_data_export_writes_a_task_lm_eval_runs(exchange, tmp_path, capsys):
    folder, model = exchange
    code, out, _ = cli(capsys, "data", "export", str(folder / "choices.jsonl"), "--lm-eval", "-o", str(tmp_path / "t"))
    (yaml_file,) = (tmp_path / "t").glob("*.yaml")
    assert code == 0 and str(yaml_file) in out
    code, _, err = cli(capsys, "data", "export", str(folder / "choices.jsonl"), "--lm-eval", "-o", str(tmp_path / "t"))
    assert code == 1 and "already exists; pass --overwrite" in err
    found = lm_eval_scores(OffsiteLM(pretrained=model, device="cpu", max_length=128), str(yaml_file))
    assert found == {yaml_file.stem: pytest.approx(next(iter(found.values())))}
    ours = offsite_scores(model, str(folder / "choices.jsonl"))
    assert found[yaml_file.stem]["acc"] == ours["accuracy"]


def test_offsite_lm_eval_is_lm_evals_command_line_with_the_offsite_model(exchange, tmp_path, capsys):
    folder, model = exchange
    task = write_task(str(folder / "choices.jsonl"), tmp_path / "tasks")
    code, out, _ = cli(capsys, "lm-eval", "run", "--model", "offsite", "--model_args",
                       f"pretrained={folder / 'bundle'},adapter={folder / 'adapter'},max_length=128", "--device",
                       "cpu", "--tasks", task.stem, "--include_path", str(tmp_path / "tasks"))
    expected = offsite_scores(str(folder / "bundle"), str(folder / "choices.jsonl"), str(folder / "adapter"))
    row = re.search(r"\|acc +\|↑ +\| *([0-9.]+)\|", out)
    assert code == 0 and float(row.group(1)) == expected["accuracy"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "{model}", "--lm-eval", "piqa"], "--lm-eval piqa: its data is not on this machine"),
    (["eval", "{model}", "--lm-eval", "no_such_task_anywhere"], "lm-eval knows no task no_such_task_anywhere"),
    (["eval", "{model}", "--lm-eval", "missing.yaml"], "--lm-eval missing.yaml: no such task file"),
    (["eval", "{model}"], "nothing to score: give --data FILE, --lm-eval TASK..., or both"),
    (["eval", "{model}", "--data", "x.txt", "--lm-eval-output", "o.json"], "--lm-eval-output needs --lm-eval"),
])
def test_bad_lm_eval_input_gets_one_line(exchange, capsys, argv, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no waiting on a hub that cannot be reached
    _, model = exchange
    code, _, err = cli(capsys, *[a.replace("{model}", model) for a in argv])
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_missing_lm_eval_names_the_extra(exchange, capsys, monkeypatch):
    import importlib.util  # noqa: PLC0415 - only this test fakes the missing package

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    _, model = exchange
    code, _, err = cli(capsys, "eval", model, "--lm-eval", "x.jsonl")
    assert code == 1 and 'pip install "offsite[lm-eval]"' in err


def test_the_demo_scores_its_five_settings_with_lm_eval_too(tiny_tasks, model_dirs, tmp_path):
    """On the demo's own test examples lm-eval's accuracy is the demo's, setting by setting."""
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "demo"), tasks=["quiz"], quick=True,
                        isolate=False, distill=None, ceiling=False, lm_eval=["quiz"], lm_eval_limit=4)
    config.split.emulator_layers = 2
    report = json.loads((demo(config) / "report.json").read_text())
    scored = report["lm_eval"]["quiz"]
    assert set(scored) == {"zero_shot", "emulator_zero_shot", "full_finetune", "emulator_finetune", "plug_in"}
    for setting, found in scored.items():
        assert found["metrics"]["offsite_quiz"]["acc"] == report["settings"][setting]["quiz"]["accuracy"], setting
        assert found["n_samples"]["offsite_quiz"]["effective"] == 4
    assert "lm-eval task `offsite_quiz`" in (tmp_path / "demo" / "report.md").read_text()


def test_the_demo_refuses_lm_eval_tasks_whose_data_is_not_here_before_any_stage(tiny_tasks, model_dirs, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = DemoConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "demo"), tasks=["quiz"], quick=True,
                        isolate=False, distill=None, lm_eval=["piqa"])
    with pytest.raises(OffsiteError, match="--lm-eval piqa: its data is not on this machine"):
        demo(config)
    assert not list((tmp_path / "demo" / "stages").glob("*.json"))
    with pytest.raises(OffsiteError, match="--lm-eval with a reference report"):
        DemoConfig(lm_eval=["quiz"], reference="r.json")


def test_the_agreement_script_sets_lm_evals_scores_beside_offsites(tiny_tasks, model_dirs):
    import importlib.util  # noqa: PLC0415 - loads a benchmark script by path

    from pathlib import Path  # noqa: PLC0415 - beside the import above

    spec = importlib.util.spec_from_file_location(
        "lm_eval_agreement", Path(__file__).parents[1] / "benchmarks" / "lm_eval_agreement.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.compare("full model", str(model_dirs["llama"]), None, None, ["quiz:6", "text"])
    quiz, text = rows
    assert quiz["n"] == 6 and quiz["lm_eval"]["acc"] == quiz["offsite"]["accuracy"]
    assert quiz["lm_eval"]["acc_norm"] == quiz["offsite"]["accuracy_norm"]
    assert text["lm_eval_token_perplexity"] == pytest.approx(text["offsite"]["perplexity"], rel=1e-5)
    assert "| full model | quiz | 6 |" in script.markdown(rows)
