"""Scoring a model too large for one device: accelerate's device_map, and batches by tokens.

On a CPU machine `--device-map auto` places every block in CPU memory, through the same loading
path a GPU machine uses; the scores must equal the plain path's.
"""

import pytest
from test_plug import untrained_adapter
from tiny_models import SAMPLE_TEXT

from offsite import EmulateConfig, EvalConfig, SplitConfig, emulate, evaluate
from offsite.errors import ConfigError, OffsiteError
from offsite.scoring import batches


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT * 2)
    return path


def test_device_map_auto_scores_as_the_plain_path(model_dirs, text, tmp_path):
    model = str(model_dirs["llama"])
    plain = evaluate(EvalConfig(model=model, data=str(text), seq_len=64))
    spread = evaluate(EvalConfig(model=model, data=str(text), seq_len=64, device_map="auto",
                                 max_memory=["cpu=2GiB"]))
    assert spread["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)


def test_device_map_with_an_adapter_plugs_it(model_dirs, text, tmp_path):
    model = str(model_dirs["llama"])
    bundle = emulate(EmulateConfig(model=model, output=str(tmp_path / "b"), split=SplitConfig(bottom=1, top=1,
                                                                                             emulator_layers=2)))
    adapter = untrained_adapter(bundle, tmp_path / "a")
    with_adapter = evaluate(EvalConfig(model=model, data=str(text), seq_len=64, adapter=str(adapter),
                                       device_map="auto"))
    plain = evaluate(EvalConfig(model=model, data=str(text), seq_len=64))
    assert with_adapter["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)  # the shipped layers: no change
    with pytest.raises(OffsiteError, match="is a bundle, which is small by design"):
        evaluate(EvalConfig(model=str(bundle), data=str(text), device_map="auto"))


def test_batches_by_tokens_give_the_same_perplexity(model_dirs, text):
    model = str(model_dirs["llama"])
    by_sequences = evaluate(EvalConfig(model=model, data=str(text), seq_len=32, batch_size=3))
    by_tokens = evaluate(EvalConfig(model=model, data=str(text), seq_len=32, batch_tokens=100))
    assert by_tokens["perplexity"] == pytest.approx(by_sequences["perplexity"], rel=1e-5)


def test_token_batches_hold_at_most_the_budget_longest_first():
    lengths = [5, 40, 12, 40, 7, 90]
    chunks = batches(lengths, batch_size=2, batch_tokens=80)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(6))
    assert chunks[0] == [5]  # longer than the budget: alone
    assert all(lengths[c[0]] * len(c) <= 80 for c in chunks[1:])
    assert [lengths[c[0]] for c in chunks] == sorted((lengths[c[0]] for c in chunks), reverse=True)
    assert batches(lengths, batch_size=4) == [[5, 1, 3, 2], [4, 0]]


@pytest.mark.parametrize("fields, message", [
    ({"max_memory": ["cpu=1GiB"]}, "--max-memory needs --device-map auto"),
    ({"device_map": "auto", "max_memory": ["gpu0=1GiB"]}, "use DEVICE=SIZE"),
    ({"device_map": "auto", "max_memory": ["0=lots"]}, "use DEVICE=SIZE"),
    ({"batch_tokens": 0}, "--batch-tokens=0 must be greater than 0"),
])
def test_bad_big_model_flags_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(model="m", data="d", **fields)
