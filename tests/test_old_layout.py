"""Artifacts written before the package moved into layers still load, plug and score as they did.

tests/fixtures/old-layout/ was written by the flat-module offsite of commit 174c065 (0.1.1) with
tests/fixtures/make_old_layout.py: a tiny llama full model, two bundles (plain uniform, and
int8 + shared layers), an adapter trained on the plain one, and every score that code computed.
"""

import json
import shutil
from pathlib import Path

import pytest

from offsite import EvalConfig, PlugConfig, describe, evaluate, plug
from offsite.exchange.adapter import load_adapter
from offsite.exchange.bundle import load_bundle

FIXTURES = Path(__file__).parent / "fixtures" / "old-layout"


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """A copy, so no test can change the committed files."""
    root = tmp_path_factory.mktemp("old") / "old-layout"
    shutil.copytree(FIXTURES, root)
    return root


def scores() -> dict:
    return json.loads((FIXTURES / "scores.json").read_text())


def _score(model: Path, data: Path, adapter: Path | None = None) -> dict:
    # An adapter on the full model replaces the layers of the bundle it was issued with (passed, as
    # this machine has no record of issuing it).
    bundle = str(data.parent / "bundle-uniform") if adapter and model.name == "model" else None
    return evaluate(EvalConfig(model=str(model), data=str(data), adapter=str(adapter) if adapter else None,
                               bundle=bundle, seq_len=64))


@pytest.mark.parametrize("name", ["uniform", "int8-share"])
def test_old_bundles_pass_their_checks_and_load(old, name):
    model, manifest = load_bundle(old / f"bundle-{name}")
    assert describe(old / f"bundle-{name}")["kind"] == "bundle"
    assert manifest.plan.adapter == (0, 5)


@pytest.mark.parametrize("setting, model, adapter", [
    ("bundle", "bundle-uniform", None),
    ("bundle+adapter", "bundle-uniform", "adapter"),
    ("bundle-int8-share", "bundle-int8-share", None),
    ("model+adapter", "model", "adapter"),
])
def test_old_artifacts_score_as_the_old_code_scored_them(old, setting, model, adapter):
    result = _score(old / model, old / "train.txt", old / adapter if adapter else None)
    expected = scores()[setting]
    assert result["n"] == expected["n"]
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_an_old_adapter_plugs_into_its_full_model(old, tmp_path):
    assert describe(old / "adapter")["kind"] == "adapter" and load_adapter(old / "adapter").layers == [0, 5]
    plugged = plug(PlugConfig(model=str(old / "model"), adapter=str(old / "adapter"), output=str(tmp_path / "p"),
                              bundle=str(old / "bundle-uniform")))
    assert _score(plugged, old / "train.txt")["loss"] == pytest.approx(scores()["plugged"]["loss"], rel=1e-6)
