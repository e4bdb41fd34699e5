"""Model-owner steps that stream: `emulate` and `plug` copy tensors from the model's files shard by shard.

The streamed outputs must be byte-identical to loading the whole model (one file), load to the
same tensors when sharded, and every check of the loaded path must still refuse what it refused.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_plug import shifted_adapter, untrained_adapter
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from offsite import EmulateConfig, PlugConfig, SplitConfig, emulate, plug
from offsite.cli import main
from offsite.errors import OffsiteError
from offsite.exchange.adapter import load_adapter
from offsite.exchange.fingerprint import file_fingerprint, model_fingerprint
from offsite.loading import load_model
from offsite.weights import WEIGHTS_INDEX, open_streamed

SPLIT = SplitConfig(bottom=1, top=1, emulator_layers=3)


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def bundles(model: Path, out: Path, **options) -> tuple[Path, Path]:
    streamed = emulate(EmulateConfig(model=str(model), output=str(out / "streamed"), split=SPLIT, **options))
    loaded = emulate(EmulateConfig(model=str(model), output=str(out / "loaded"), split=SPLIT, stream=False,
                                   **options))
    return streamed, loaded


# Checkpoints whose tensors transformers renames while loading (gpt_neox stores `embed_out`, the
# model holds `lm_head`): these load whole, with the same result.
LOADED_WHOLE = {"gpt_neox"}


def test_streamed_bundle_is_byte_identical_to_the_loaded_path(family, model_dirs, tmp_path, caplog):
    caplog.set_level("INFO")
    streamed, loaded = bundles(model_dirs[family], tmp_path)
    assert ("the full model is never loaded" in caplog.text) == (family not in LOADED_WHOLE)
    assert digests(streamed) == digests(loaded)


@pytest.mark.parametrize("method", ["uniform+share", "uniform+lowrank", "uniform+int8", "uniform+share+int8"])
@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_streamed_compressed_and_shared_bundles_are_byte_identical(method, family_name, model_dirs, tmp_path, caplog):
    caplog.set_level("INFO")
    split = SplitConfig(bottom=1, top=1, emulator_layers=3, method=method)
    streamed = emulate(EmulateConfig(model=str(model_dirs[family_name]), output=str(tmp_path / "s"), split=split))
    assert "the full model is never loaded" in caplog.text
    loaded = emulate(EmulateConfig(model=str(model_dirs[family_name]), output=str(tmp_path / "l"), split=split,
                                   stream=False))
    assert digests(streamed) == digests(loaded)


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_streamed_sharded_bundle_holds_the_same_tensors_and_loads(family_name, model_dirs, tmp_path):
    streamed, loaded = bundles(model_dirs[family_name], tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in streamed.glob("model-*.safetensors"))
    assert len(shards) > 2 and (streamed / WEIGHTS_INDEX).is_file()
    index = json.loads((streamed / WEIGHTS_INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    a, b = tensors(streamed), tensors(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    largest = max(t.numel() * t.element_size() for t in a.values())
    assert max(p.stat().st_size for p in streamed.glob("model-*.safetensors")) < max(40_000, largest) + 10_000
    main(["info", str(streamed)])  # the manifest lists the shards and every check passes


def test_streamed_plug_is_byte_identical_and_replaces_only_adapter_tensors(family, model_dirs, tmp_path, caplog):
    caplog.set_level("INFO")
    full = model_dirs[family]
    bundle = emulate(EmulateConfig(model=str(full), output=str(tmp_path / "b"), split=SPLIT))
    adapter_dir = shifted_adapter(bundle, tmp_path / "a", 0.25)
    streamed = plug(PlugConfig(str(full), str(adapter_dir), str(tmp_path / "streamed")))
    assert ("(streamed)" in caplog.text) == (family not in LOADED_WHOLE)
    loaded = plug(PlugConfig(str(full), str(adapter_dir), str(tmp_path / "loaded"), stream=False))
    assert digests(streamed) == digests(loaded)
    before, after = tensors(full), tensors(streamed)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(".0." in k or ".7." in k for k in changed)


def test_streamed_plug_refuses_an_adapter_for_another_base(model_dirs, tmp_path):
    other = save_tiny_model("llama", tmp_path / "other", num_layers=8, seed=1)
    adapter = untrained_adapter(emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "b"),
                                                      split=SPLIT)), tmp_path / "a")
    with pytest.raises(OffsiteError, match="another base model"):
        plug(PlugConfig(model=str(other), adapter=str(adapter), output=str(tmp_path / "p")))
    assert not (tmp_path / "p").exists()


def test_streamed_plug_refuses_a_wrong_shape(model_dirs, tmp_path):
    adapter_dir = untrained_adapter(emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "b"),
                                                          split=SPLIT)), tmp_path / "a")
    adapter = load_adapter(adapter_dir)
    name = next(iter(adapter.tensors[0]))
    adapter.tensors[0][name] = torch.zeros(3, 3)
    adapter.save(adapter_dir)
    with pytest.raises(OffsiteError, match=f"layers.0.{name}: shape"):
        plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter_dir), output=str(tmp_path / "p")))


def test_file_fingerprint_equals_the_loaded_models_in_every_dtype(model_dirs, tmp_path):
    model = load_model(str(model_dirs["llama"]))
    expected = model_fingerprint(model, [0, 1, 6, 7])
    assert file_fingerprint(open_streamed(str(model_dirs["llama"])), [0, 1, 6, 7]) == expected
    half = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(half)  # a checkpoint stored in bfloat16
    loaded = load_model(str(half))
    assert loaded.dtype == torch.bfloat16
    assert file_fingerprint(open_streamed(str(half)), [0, 1, 6, 7]) == model_fingerprint(loaded, [0, 1, 6, 7])


def test_sharded_input_model_streams(model_dirs, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).save_pretrained(sharded, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((model_dirs["llama"] / name).read_bytes())
    assert (sharded / WEIGHTS_INDEX).is_file()
    streamed = emulate(EmulateConfig(model=str(sharded), output=str(tmp_path / "from-shards"), split=SPLIT))
    single = emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "from-one"), split=SPLIT))
    a, b = tensors(streamed), tensors(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tensor_in_two_shards_is_refused(model_dirs, tmp_path):
    copy = tmp_path / "twice"
    copy.mkdir()
    for path in model_dirs["llama"].iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    weights = load_file(copy / "model.safetensors")
    save_file({"model.norm.weight": weights["model.norm.weight"]}, copy / "extra.safetensors")
    with pytest.raises(OffsiteError, match="model.norm.weight is in both"):
        emulate(EmulateConfig(model=str(copy), output=str(tmp_path / "b"), split=SPLIT))


def test_bin_only_model_is_refused_naming_the_conversion(model_dirs, tmp_path):
    copy = tmp_path / "bin"
    copy.mkdir()
    for path in model_dirs["llama"].iterdir():
        if path.suffix != ".safetensors":
            (copy / path.name).write_bytes(path.read_bytes())
    (copy / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(OffsiteError, match="safe_serialization=True"):
        emulate(EmulateConfig(model=str(copy), output=str(tmp_path / "b"), split=SPLIT))


def test_bad_shard_size_is_one_line_naming_the_flag(model_dirs, tmp_path, capsys):
    code = main(["emulate", str(model_dirs["llama"]), "-o", str(tmp_path / "b"), "--max-shard-size", "lots"])
    err = capsys.readouterr().err
    assert code == 1 and "--max-shard-size=lots is not a size" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
