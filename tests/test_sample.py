"""`offsite data sample`: a distillation corpus drawn from the full model itself."""

import json

from offsite.api import sample_corpus
from offsite.cli import main
from offsite.config import DistillConfig, SampleConfig
from offsite.emulator.distill import read_corpus


def test_sampled_texts_are_a_reproducible_corpus_distillation_reads(model_dirs, tmp_path):
    config = SampleConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "a.jsonl"), texts=5, length=12,
                          batch_size=2, seed=3)
    path = sample_corpus(config)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert 1 <= len(texts) <= 5 and all(t.strip() for t in texts)
    again = sample_corpus(SampleConfig(**{**config.to_dict(), "output": str(tmp_path / "b.jsonl")}))
    assert again.read_text() == path.read_text()  # the seed fixes the corpus
    assert read_corpus(DistillConfig(corpus=str(path))).texts == texts


def test_sample_refuses_bad_flags_and_an_existing_file(model_dirs, tmp_path, capsys):
    (tmp_path / "kept.jsonl").write_text('{"text": "mine"}\n')
    assert main(["data", "sample", str(model_dirs["llama"]), "-o", str(tmp_path / "kept.jsonl")]) == 1
    assert "kept.jsonl" in capsys.readouterr().err and "mine" in (tmp_path / "kept.jsonl").read_text()
    assert main(["data", "sample", str(model_dirs["llama"]), "-o", str(tmp_path / "x.jsonl"), "--top-p", "0"]) == 1
    assert "--top-p" in capsys.readouterr().err


def test_sampling_runs_in_the_asked_dtype(model_dirs, tmp_path):
    out = tmp_path / "bf16.jsonl"
    assert main(["data", "sample", str(model_dirs["llama"]), "-o", str(out), "--texts", "2", "--length", "8",
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert len(out.read_text().splitlines()) == 2
