"""The command line: the whole exchange in a temp dir, JSON output, and clean errors."""

import json
import subprocess
import sys

import pytest

from offsite.cli import main
from tiny_models import SAMPLE_TEXT


@pytest.fixture
def workdir(tmp_path, model_dirs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text(SAMPLE_TEXT)
    with open(tmp_path / "choice.jsonl", "w") as handle:
        for i in range(6):
            handle.write(json.dumps({"context": "Boil fresh water, warm the", "choices": [" pot", " road"],
                                     "label": i % 2}) + "\n")
    return tmp_path, str(model_dirs["llama"])


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_emulate_tune_plug_eval(workdir, capsys):
    tmp, model = workdir
    assert run(capsys, "emulate", model, "-o", "bundle", "--emulator-layers", "2")[0] == 0
    code, out, _ = run(capsys, "tune", "bundle", "--data", "train.txt", "--eval-data", "choice.jsonl", "-o", "adapter",
                       "--max-steps", "3", "--seq-len", "64", "--batch-size", "4", "--lora-rank", "2")
    assert code == 0 and "adapter written to adapter" in out
    assert run(capsys, "plug", model, "adapter", "-o", "plugged")[0] == 0
    code, out, _ = run(capsys, "eval", "plugged", "--data", "choice.jsonl", "--json")
    result = json.loads(out)
    assert code == 0 and result["task"] == "choice" and result["n"] == 6 and 0 <= result["accuracy"] <= 1
    code, out, _ = run(capsys, "eval", "bundle", "--adapter", "adapter", "--data", "train.txt", "--json")
    assert code == 0 and json.loads(out)["task"] == "lm" and json.loads(out)["perplexity"] > 1
    code, out, _ = run(capsys, "info", "bundle", "--json")
    info = json.loads(out)
    assert info["kind"] == "bundle" and [e["original_index"] for e in info["layers"]] == [0, 1, 2, 5, 6, 7]
    assert info["emulator_method"] == "uniform" and info["loads_with"] == "from_pretrained or offsite"
    code, out, _ = run(capsys, "info", "adapter", "--json")
    assert json.loads(out)["kind"] == "adapter" and json.loads(out)["layers"] == [0, 1, 6, 7]
    code, out, _ = run(capsys, "info", "plugged")
    assert code == 0 and "kind: model" in out


@pytest.mark.parametrize("argv, message", [
    (["emulate", "{model}", "-o", "b", "--emulator-layers", "50"], "--emulator-layers=50 is more than the 4 middle"),
    (["emulate", "{model}", "-o", "b", "--bottom", "4", "--top", "4"], "--bottom=4 plus --top=4"),
    (["emulate", "./missing", "-o", "b"], "model directory ./missing does not exist"),
    (["tune", "missing-bundle", "--data", "train.txt", "-o", "a"], "bundle missing-bundle does not exist"),
    (["tune", "{model}", "--data", "train.txt", "-o", "a"], "offsite.json is missing"),
    (["eval", "{model}", "--data", "bad.jsonl"], "bad.jsonl:2: invalid JSON"),
    (["eval", "{model}", "--data", "train.txt", "--seq-len", "0"], "--seq-len=0 must be greater than 0"),
    (["plug", "{model}", "missing-adapter", "-o", "p"], "adapter missing-adapter does not exist"),
    (["info", "train.txt"], "is not a directory"),
    (["emulate", "{model}", "-o", "b", "--distill", "train.txt", "--kd-weight", "0", "--lm-weight", "0"],
     "--kd-weight and --lm-weight are both 0"),
    (["emulate", "{model}", "-o", "b", "--distill", "choice.jsonl"], "is a choice dataset; distillation needs text"),
])
def test_bad_input_gives_one_line_error_and_exit_code(workdir, capsys, argv, message):
    tmp, model = workdir
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    code, _, err = run(capsys, *[a.format(model=model) for a in argv])
    assert code == 1
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "offsite.cli", "emulate", "./nowhere", "-o", str(tmp_path / "b")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("offsite emulate: error: model directory ./nowhere")
    assert "Traceback" not in result.stderr and not (tmp_path / "b").exists()


def test_argparse_rejects_conflicting_flags(workdir, capsys):
    _, model = workdir
    with pytest.raises(SystemExit) as exit_info:
        main(["emulate", model, "-o", "b", "--emulator-layers", "2", "--drop-ratio", "0.5"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--quick"], "budget"),
    (["--no-distill"], None),
    (["--distill-steps", "50"], {"corpus": "austen", "steps": 50}),
    (["--quick", "--distill", "notes.txt"], {"corpus": "notes.txt", "steps": 16}),
])
def test_demo_distils_with_the_budget_unless_told_otherwise(flags, expected):
    from offsite.cli import _build_parser, _demo_distill
    distill = _demo_distill(_build_parser().parse_args(["demo", *flags]))
    if isinstance(expected, dict):
        assert {k: getattr(distill, k) for k in expected} == expected
    else:
        assert distill == expected
