"""Property-based fuzzing of everything the other party sends, through plug, tune, eval and info in-process:
each outcome is success on valid input or one `OffsiteError`; never another exception, and never a plugged
model that differs from what the valid parts say.

The default run tries a few dozen inputs per target (well under a minute); `pytest -m slow tests/test_fuzz.py`
tries `OFFSITE_FUZZ_EXAMPLES` (default 300) per target.
"""

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_bundle import make_bundle
from test_hardening import rehash
from test_plug import untrained_adapter

from offsite import EvalConfig, PlugConfig, describe, evaluate, plug, tune
from offsite.arch import get_layers
from offsite.cli import _build_parser, from_args
from offsite.config import TrainConfig, TuneConfig
from offsite.data.read import read_data
from offsite.errors import OffsiteError
from offsite.exchange.adapter import load_adapter
from offsite.exchange.bundle import load_bundle
from offsite.loading import load_model

# The default run is derandomized, so CI sees the same inputs every time; the long run explores.
QUICK = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                 derandomize=True)
LONG = settings(max_examples=int(os.environ.get("OFFSITE_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=list(HealthCheck), database=None)

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def artifacts(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    bundle = make_bundle(model_dirs["llama"], root / "bundle")
    adapter = untrained_adapter(bundle, root / "adapter")
    text = root / "text.txt"
    text.write_text("The model owner sends a bundle; the data owner returns an adapter. " * 4)
    return {"model": model_dirs["llama"], "bundle": bundle, "adapter": adapter, "root": root, "text": text}


def mutate_json(document: dict, data) -> dict:
    """Replace, drop or add one field, at the top or one level down."""
    target = document
    key = data.draw(st.sampled_from(sorted(document)))
    if isinstance(document[key], dict) and document[key] and data.draw(st.booleans()):
        target, key = document[key], data.draw(st.sampled_from(sorted(document[key])))
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        target[key] = data.draw(JSON)
    elif action == "drop":
        del target[key]
    else:
        target[data.draw(st.text(max_size=8))] = data.draw(JSON)
    return document


def mutate_bytes(blob: bytes, data) -> bytes:
    action = data.draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
    if action == "truncate":
        return blob[: data.draw(st.integers(0, len(blob)))]
    if action == "insert":
        at = data.draw(st.integers(0, len(blob)))
        return blob[:at] + data.draw(st.binary(min_size=1, max_size=16)) + blob[at:]
    at = data.draw(st.integers(0, min(len(blob) - 1, 8 + 300) if action == "header" else len(blob) - 1))
    return blob[:at] + bytes([data.draw(st.integers(0, 255))]) + blob[at + 1:]


def copy_of(artifacts, name: str, workdir) -> object:
    target = workdir / name
    shutil.rmtree(target, ignore_errors=True)
    return shutil.copytree(artifacts[name], target)


def check_plugged(artifacts, adapter_dir, output) -> None:
    """A plug that succeeded wrote the full model with exactly the adapter file's tensors in its layers."""
    adapter = load_adapter(adapter_dir)
    full, plugged = load_model(str(artifacts["model"])), load_model(str(output))
    for index, (original, block) in enumerate(zip(get_layers(full), get_layers(plugged))):
        expected = adapter.tensors.get(index, original.state_dict())
        assert all(torch.equal(expected[k], v) for k, v in block.state_dict().items()), f"layer {index}"


def run_adapter(artifacts, workdir, edit) -> None:
    adapter = copy_of(artifacts, "adapter", workdir)
    edit(adapter)
    output = workdir / "plugged"
    shutil.rmtree(output, ignore_errors=True)
    try:
        describe(adapter)
        plug(PlugConfig(model=str(artifacts["model"]), adapter=str(adapter), output=str(output)))
    except OffsiteError as error:
        assert "\n" not in str(error)
        return
    check_plugged(artifacts, adapter, output)


def adapter_json_target(artifacts, tmp_path, data) -> None:
    def edit(adapter):
        meta = mutate_json(json.loads((adapter / "adapter.json").read_text()), data)
        (adapter / "adapter.json").write_text(json.dumps(meta))
    run_adapter(artifacts, tmp_path, edit)


def adapter_weights_target(artifacts, tmp_path, data) -> None:
    checked = data.draw(st.booleans())  # with its SHA-256 in adapter.json, or without: the parser sees the bytes

    def edit(adapter):
        weights = adapter / "adapter.safetensors"
        weights.write_bytes(mutate_bytes(weights.read_bytes(), data))
        if not checked:
            meta = json.loads((adapter / "adapter.json").read_text())
            meta.pop("weights_sha256")
            (adapter / "adapter.json").write_text(json.dumps(meta))
    run_adapter(artifacts, tmp_path, edit)


def bundle_target(artifacts, tmp_path, data) -> None:
    bundle = copy_of(artifacts, "bundle", tmp_path)
    name = data.draw(st.sampled_from(["offsite.json", "config.json", "model.safetensors"]))
    if name.endswith(".json"):
        (bundle / name).write_text(json.dumps(mutate_json(json.loads((bundle / name).read_text()), data)))
    else:
        (bundle / name).write_bytes(mutate_bytes((bundle / name).read_bytes(), data))
    if name != "offsite.json" and data.draw(st.booleans()):
        rehash(bundle)  # a hostile sender keeps the manifest consistent
    try:
        describe(bundle)
        load_bundle(bundle)
        evaluate(EvalConfig(model=str(bundle), data=str(artifacts["text"]), seq_len=16, limit=1))
    except OffsiteError as error:
        assert "\n" not in str(error)


def data_line_target(artifacts, tmp_path, data) -> None:
    path = tmp_path / "data.jsonl"
    line = data.draw(st.one_of(st.text(max_size=60), JSON.map(json.dumps),
                               st.fixed_dictionaries({"context": st.text(max_size=10), "choices": JSON,
                                                      "label": JSON}).map(json.dumps)))
    path.write_text(line + "\n", encoding="utf-8", errors="surrogatepass")
    output = tmp_path / "tuned"
    shutil.rmtree(output, ignore_errors=True)
    try:
        read_data(str(path))
        tune(TuneConfig(bundle=str(artifacts["bundle"]), data=str(path), output=str(output),
                        train=TrainConfig(max_steps=1, batch_size=2, seq_len=16)))
    except OffsiteError as error:
        assert "\n" not in str(error)


def flags_target(data) -> None:
    flags = ["--lr", "--weight-decay", "--warmup-ratio", "--batch-size", "--grad-accum", "--seq-len", "--epochs",
             "--max-steps", "--lora-rank", "--lora-alpha", "--eval-every", "--checkpoint-every"]
    argv = ["tune", "b", "--data", "d", "-o", "o"]
    for flag in data.draw(st.lists(st.sampled_from(flags), max_size=4, unique=True)):
        argv += [flag, data.draw(st.one_of(st.text(max_size=8), st.floats().map(str), st.integers().map(str)))]
    try:
        args = _build_parser().parse_args(argv)
        from_args(TuneConfig, args, train=from_args(TrainConfig, args))
    except SystemExit as exit:  # argparse's usage line and "invalid float value"
        assert exit.code == 2
    except OffsiteError as error:
        assert "\n" not in str(error)


TARGETS = {
    "adapter.json": lambda artifacts, tmp_path, data: adapter_json_target(artifacts, tmp_path, data),
    "adapter.safetensors": lambda artifacts, tmp_path, data: adapter_weights_target(artifacts, tmp_path, data),
    "bundle": lambda artifacts, tmp_path, data: bundle_target(artifacts, tmp_path, data),
    "data line": lambda artifacts, tmp_path, data: data_line_target(artifacts, tmp_path, data),
    "flags": lambda artifacts, tmp_path, data: flags_target(data),
}


def fuzz(budget: settings, target: str, artifacts, tmp_path) -> int:
    """Run one target under `budget`; return how many inputs it tried."""
    tried = []

    def one(data):
        tried.append(1)
        TARGETS[target](artifacts, tmp_path, data)

    budget(given(data=st.data())(one))()
    print(f"fuzz {target}: {len(tried)} inputs")  # the long run's count, for the record (pytest -s)
    return len(tried)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_quick(artifacts, tmp_path, target):
    assert fuzz(QUICK, target, artifacts, tmp_path) >= QUICK.max_examples


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_long(artifacts, tmp_path, target):
    assert fuzz(LONG, target, artifacts, tmp_path) >= LONG.max_examples


def test_a_valid_adapter_plugs_to_what_it_says(artifacts, tmp_path):
    """The fuzz targets' check of a successful plug holds for the unmutated input, and can fail."""
    run_adapter(artifacts, tmp_path, lambda adapter: None)
    weights = load_file(artifacts["adapter"] / "adapter.safetensors")
    assert weights  # the check compares real tensors
    with pytest.raises(AssertionError, match="layer"):
        check_plugged(artifacts, artifacts["adapter"], artifacts["bundle"])  # a bundle is not the plugged model
