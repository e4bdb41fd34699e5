"""The command line: the whole exchange in a temp dir, JSON output, and clean errors."""

import json
import subprocess
import sys

import pytest
from tiny_models import SAMPLE_TEXT

from offsite.cli import main


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
    (["info", "train.txt"], "train.txt is a file; pass a bundle, adapter or model directory"),
    (["info", "nowhere"], "nowhere does not exist; pass a bundle"),
    (["emulate", "{model}", "-o", "b", "--distill", "train.txt", "--kd-weight", "0", "--lm-weight", "0",
      "--kl-weight", "0"],
     "--kd-weight, --lm-weight and --kl-weight are all 0"),
    (["emulate", "{model}", "-o", "b", "--distill", "choice.jsonl"], "is a choice dataset; distillation needs plain text"),
    (["emulate", "{model}", "-o", "b", "--distill", "train.txt", "--shard-full-model"],
     "--shard-full-model shares the full model among several processes: add --num-processes N"),
    (["emulate", "{model}", "-o", "b", "--distill", "train.txt", "--distill-heldout", "choice.jsonl"],
     "--distill-heldout choice.jsonl is a choice dataset"),
    (["eval", "{model}", "--data", "latin1.jsonl"], "--data latin1.jsonl is not UTF-8 text"),
    (["eval", "{model}", "--data", "latin1.txt"], "--data latin1.txt is not UTF-8 text"),
    (["eval", "{model}", "--data", "empty-context.jsonl"], "empty-context.jsonl:1: field 'context' must be a non-empty"),
    (["tune", "missing-bundle", "--data", "train.txt", "-o", "a", "--epochs", "inf"], "--epochs=inf must be a finite"),
    (["tune", "{model}", "--data", "train.txt", "-o", "train.txt/a"], "train.txt is a file, not a directory"),
    (["tune", "{model}", "--data", "out/train.txt", "-o", "out", "--overwrite"], "would replace the input out/train.txt"),
    (["plug", "{model}", "{model}", "-o", "{model}", "--overwrite"], "would replace the input"),
    (["data", "export", "wordnet", "-o", "mine.jsonl"], "mine.jsonl already exists; pass --overwrite"),
    (["data", "export", "wordnet", "-o", "out"], "-o/--output out is a directory"),
    (["emulate", "{model}", "-o", "e", "--distill", "train.txt"], ".e.distill/state.json is corrupt; delete"),
    (["eval", "fake-adapter", "--data", "train.txt"], "fake-adapter is an adapter file, not a model; pass it with --adapter"),
    (["plug", "fake-bundle", "fake-adapter", "-o", "p"], "MODEL fake-bundle is a bundle; plug into the full model"),
])
def test_bad_input_gives_one_line_error_and_exit_code(workdir, capsys, argv, message):
    tmp, model = workdir
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    (tmp / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (tmp / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (tmp / "empty-context.jsonl").write_text('{"context": "", "choices": [" a", " b"], "label": 0}\n')
    (tmp / "out").mkdir()
    (tmp / "out" / "train.txt").write_text(SAMPLE_TEXT)
    (tmp / "mine.jsonl").write_text('{"text": "my own notes"}\n')
    (tmp / ".e.distill").mkdir()
    (tmp / ".e.distill" / "state.json").write_text("garbage")
    (tmp / "fake-adapter").mkdir()
    (tmp / "fake-adapter" / "adapter.json").write_text("{}")
    (tmp / "fake-bundle").mkdir()
    (tmp / "fake-bundle" / "offsite.json").write_text("{}")
    code, _, err = run(capsys, *[a.format(model=model) for a in argv])
    assert code == 1
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err
    assert (tmp / "mine.jsonl").read_text() == '{"text": "my own notes"}\n'
    assert (tmp / "out" / "train.txt").read_text() == SAMPLE_TEXT and (tmp / "train.txt").is_file()


def test_data_export_replaces_a_file_only_when_asked(workdir, capsys, monkeypatch):
    from offsite.data import builtin as tasks
    from offsite.data.types import ChoiceData, ChoiceExample
    tmp, _ = workdir
    exported = ChoiceData([ChoiceExample("Boil the", (" pot", " road"), 0)], "wordnet:test")
    monkeypatch.setattr(tasks, "load_builtin", lambda name, split: exported)  # no built-in data in tests
    (tmp / "mine.jsonl").write_text("mine\n")
    assert run(capsys, "data", "export", "wordnet", "-o", "mine.jsonl")[0] == 1
    assert (tmp / "mine.jsonl").read_text() == "mine\n"
    assert run(capsys, "data", "export", "wordnet", "-o", "mine.jsonl", "--overwrite")[0] == 0
    assert json.loads((tmp / "mine.jsonl").read_text())["context"] == "Boil the"


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["emulator"].update(share={"schedule": [99]}), "emulator.share.schedule must list emulator layers"),
    (lambda m: m["emulator"].update(share=5), "emulator.share.schedule must list emulator layers"),
    (lambda m: m["emulator"].update(compression={"method": "bogus"}), "emulator.compression.modules must map"),
    (lambda m: m["layers"][0].update(original_index=500), "original_index 500 is not a layer of a 8-layer"),
    (lambda m: m["layers"][0].update(original_index="zz"), "original_index 'zz' is not a layer"),
    (lambda m: m["layers"][0].update(role="middle"), "layer role 'middle' is not one of"),
])
def test_a_tampered_manifest_gets_a_one_line_error(workdir, capsys, change, message):
    tmp, model = workdir
    assert run(capsys, "emulate", model, "-o", "bundle", "--emulator-layers", "2")[0] == 0
    _edit_json(tmp / "bundle" / "offsite.json", change)
    for argv in (["info", "bundle"], ["eval", "bundle", "--data", "train.txt"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("fields, message", [
    ({"layers": 5}, "field 'layers' must be a list of layer indices"),
    ({"layers": [0, "x"]}, "field 'layers' must be a list of layer indices"),
    ({"layers": [0], "base_model": "x"}, "field 'base_model' must be a JSON object"),
    ({"layers": [0], "training": "x"}, "field 'training' must be a JSON object"),
])
def test_a_tampered_adapter_file_gets_a_one_line_error(workdir, capsys, fields, message):
    tmp, model = workdir
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter.json").write_text(json.dumps({"format": "offsite-adapter", "format_version": 1,
                                                              **fields}))
    for argv in (["info", "adapter"], ["plug", model, "adapter", "-o", "plugged"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and message in err and "Traceback" not in err, err


def test_a_directory_where_the_manifest_belongs_is_reported(workdir, capsys):
    tmp, _ = workdir
    (tmp / "odd" / "offsite.json").mkdir(parents=True)
    code, _, err = run(capsys, "info", "odd")
    assert code == 1 and "offsite.json is a directory" in err


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
