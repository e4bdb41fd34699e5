"""`offsite demo-vision` on a tiny random ViT and generated images (the built-in task's data replaced)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offsite.cli import main
from offsite.config import DistillConfig, SplitConfig
from offsite.data.read import read_data, write_jsonl
from offsite.data.types import LabelledData, LabelledExample
from offsite.studies import settings as study_settings
from offsite.studies import vision_demo as vision_module
from offsite.studies.settings import TaskBudget, VisionDemoConfig
from offsite.studies.stages import linear_probe_stage
from offsite.studies.vision_demo import vision_demo
from offsite.studies.vision_report import LABELS
from tiny_encoders import IMAGE_SIZE, save_tiny_encoder

NAMES = ("boot", "coat", "shirt")
BUDGET = TaskBudget(24, 12, 3, 4, 16, 1e-3, 1e-3)


def images(count: int, seed: int) -> LabelledData:
    """Images whose label is their brightness band, so a head can learn something."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        label = i % len(NAMES)
        pixels = rng.integers(0, 60, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8) + np.uint8(80 * label)
        examples.append(LabelledExample(pixels, label))
    return LabelledData(examples, NAMES, "image", f"generated-{seed}")


@pytest.fixture
def tiny_task(tmp_path, monkeypatch):
    """A tiny ViT, the task's splits generated in memory (as IDX pixels), and a tiny budget."""
    model = save_tiny_encoder("vit", tmp_path / "vit")
    splits = {"train": images(30, 0), "test": images(15, 1)}
    monkeypatch.setattr(vision_module, "load_builtin", lambda source, split: splits[source.split(":")[1]])
    monkeypatch.setitem(study_settings.VISION_BUDGETS, "quick", BUDGET)
    corpus = write_jsonl(images(16, 2), tmp_path / "unlabelled.jsonl")
    distill = DistillConfig(corpus=str(corpus), steps=2, batch_size=4, eval_every=2, kl_weight=0.0)
    config = VisionDemoConfig(model=str(model), output=str(tmp_path / "demo"), quick=True, distill=distill,
                              split=SplitConfig(bottom=1, top=1, emulator_layers=2), isolate=False)
    return config


def test_images_written_as_png_read_back_with_the_same_pixels(tmp_path):
    data = images(6, 3)
    path = write_jsonl(data, tmp_path / "task.jsonl")
    back = read_data(path)
    assert back.labels == NAMES and [e.label for e in back.examples] == [e.label for e in data.examples]
    from offsite.data.labelled import load_image
    for written, read in zip(data.examples, back.examples):
        assert np.array_equal(np.asarray(load_image(read.input)), np.asarray(load_image(written.input)))


def test_vision_demo_measures_every_row_and_reuses_its_stages(tiny_task):
    out = vision_demo(tiny_task)
    report = json.loads((out / "report.json").read_text())
    assert set(report["settings"]) == set(LABELS)
    for name, result in report["settings"].items():
        assert result["task"] == "classify" and result["n"] == 12 and 0 <= result["accuracy"] <= 1, name
    timing = report["timing"]
    head = 32 * len(NAMES) + len(NAMES)  # the new linear head of a 32-wide ViT
    assert timing["linear_probe"]["trainable_params"] == head == timing["emulator_linear_probe"]["trainable_params"]
    # the adapter (1 + 1 of 6 blocks) and the head are what offsite-tuning trains; full fine-tuning trains all 6
    block = (timing["full_finetune"]["trainable_params"] - head) // 6
    assert timing["emulator_finetune"]["trainable_params"] == 2 * block + head == timing["ceiling"]["trainable_params"]
    assert all(timing[name]["steps"] == BUDGET.steps for name in timing)
    assert report["data"] == {"train": 24, "test": 12, "labels": list(NAMES)}
    assert report["emulator"]["distill"]["steps"] == 2
    markdown = (out / "report.md").read_text()
    assert all(label in markdown for label in LABELS.values()) and "Gain kept" in markdown
    again = json.loads((vision_demo(tiny_task) / "report.json").read_text())
    assert again["stages_computed"] == 0 and again["settings"] == report["settings"]


def test_linear_probe_of_an_emulator_of_every_block_is_the_full_models(tiny_task, tmp_path):
    """An emulator keeping every middle block is the full model, so its probe trains and scores the same."""
    from offsite.api import emulate
    from offsite.config import EmulateConfig

    bundle = tmp_path / "all-blocks"
    emulate(EmulateConfig(model=tiny_task.model, output=str(bundle), split=SplitConfig(bottom=1, top=1,
                                                                                         emulator_layers=4)))
    train, test = write_jsonl(images(24, 0), tmp_path / "train.jsonl"), write_jsonl(images(12, 1), tmp_path / "t.jsonl")
    settings = {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "seq_len": 16, "seed": 0}
    full = linear_probe_stage(tiny_task.model, str(train), str(test), settings, str(tmp_path / "a.jsonl"))
    emulated = linear_probe_stage(str(bundle), str(train), str(test), settings, str(tmp_path / "b.jsonl"))
    assert full["summary"]["final_loss"] == pytest.approx(emulated["summary"]["final_loss"], abs=1e-5)
    assert full["result"] == emulated["result"]


def test_demo_vision_refuses_a_language_model_and_an_unknown_task(tmp_path, capsys):
    from tiny_models import save_tiny_model

    lm = save_tiny_model("llama", tmp_path / "lm")
    capsys.readouterr()  # the saving's progress bar
    assert main(["demo-vision", "--model", str(lm), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "is not an image classifier" in err and len(err.strip().splitlines()) == 1
    assert main(["demo-vision", "--task", "austen", "--out", str(tmp_path / "y")]) == 1
    assert "--task: 'austen' is not a labelled built-in task" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written
