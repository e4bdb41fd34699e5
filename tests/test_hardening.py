"""Files from the other party can never run code, overwrite the wrong layers or poison a model.

Each test here failed on 0.1.1 (the audit of issue 14) and passes now.
"""

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import NUM_LAYERS
from safetensors.torch import load_file, save_file
from test_bundle import make_bundle
from test_plug import untrained_adapter
from tiny_models import SAMPLE_TEXT

from offsite import (
    DistillConfig,
    EmulateConfig,
    EvalConfig,
    PlugConfig,
    SplitConfig,
    TrainConfig,
    TuneConfig,
    describe,
    emulate,
    evaluate,
    loading,
    plug,
    tune,
)
from offsite.arch import get_layers
from offsite.cli import main
from offsite.data.read import read_data
from offsite.errors import OffsiteError
from offsite.exchange import bundle as bundle_module
from offsite.exchange.adapter import Adapter, load_adapter
from offsite.exchange.bundle import load_bundle, read_manifest
from offsite.exchange.fingerprint import fingerprint
from offsite.files import sha256_file
from offsite.loading import load_model, load_tokenizer


def rehash(bundle):
    """What a hostile sender does after editing a bundle: make the manifest agree with the files."""
    manifest = json.loads((bundle / "offsite.json").read_text())
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(bundle.iterdir())
                         if p.is_file() and p.name != "offsite.json"}
    (bundle / "offsite.json").write_text(json.dumps(manifest))


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(SAMPLE_TEXT)
    return path


# --- 1. no code from the other party runs ------------------------------------------------------------

@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_a_model_that_asks_for_its_own_code_is_refused(model_dirs, tmp_path, config_file):
    model = shutil.copytree(model_dirs["llama"], tmp_path / "m")
    config = json.loads((model / config_file).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model / config_file).write_text(json.dumps(config))
    with pytest.raises(OffsiteError, match="auto_map"):
        load_model(str(model))
    with pytest.raises(OffsiteError, match="auto_map"):
        load_tokenizer(str(model))


def test_a_bundle_shipping_python_files_is_refused(model_dirs, tmp_path, train_file):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    (bundle / "evil.py").write_text("open('/tmp/pwned', 'w')\n")
    rehash(bundle)
    with pytest.raises(OffsiteError, match="Python files"):
        tune(TuneConfig(bundle=str(bundle), data=str(train_file), output=str(tmp_path / "a")))
    assert not (tmp_path / "a").exists()


# --- 2. plug replaces only the layers the model owner issued -------------------------------------------

def forged_adapter(model_dir, bundle, out, layers):
    """An adapter over layers the bundle holds in full, with a fingerprint the data owner can compute."""
    manifest = read_manifest(bundle)
    full = load_model(str(model_dir))
    blocks = get_layers(full)
    tensors = {i: {k: v + 1.0 for k, v in blocks[i].state_dict().items()} for i in layers}
    forged = fingerprint({i: blocks[i] for i in layers}, "llama", NUM_LAYERS)
    out.mkdir()
    Adapter(tensors, forged, manifest.base_model).save(out)
    return out


@pytest.mark.parametrize("layers", [[0, 1, 3, 6, 7], []])
def test_plug_refuses_an_adapter_that_replaces_other_layers(model_dirs, tmp_path, layers):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b", emulator_layers=NUM_LAYERS - 4)  # layer 3 in full
    adapter = forged_adapter(model_dirs["llama"], bundle, tmp_path / "a", layers)
    for given in (None, str(bundle)):
        with pytest.raises(OffsiteError, match="fingerprint|refusing"):
            plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(tmp_path / "p"),
                            bundle=given))
    assert not (tmp_path / "p").exists()


def test_plug_without_a_record_asks_for_the_bundle(model_dirs, tmp_path, monkeypatch):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    monkeypatch.setenv("OFFSITE_STATE", str(tmp_path / "another-machine"))
    with pytest.raises(OffsiteError, match="pass --bundle BUNDLE"):
        plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(tmp_path / "p")))
    plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(tmp_path / "p"),
                    bundle=str(bundle)))


# --- 3. nothing non-finite ----------------------------------------------------------------------------

def test_an_adapter_with_nan_is_refused_naming_the_tensor(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    weights = load_file(adapter / "adapter.safetensors")
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, adapter / "adapter.safetensors", metadata={"format": "offsite-adapter"})
    meta = json.loads((adapter / "adapter.json").read_text())
    meta["weights_sha256"] = sha256_file(adapter / "adapter.safetensors")
    (adapter / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(OffsiteError, match=f"tensor {name} holds NaN"):
        load_adapter(adapter)


def test_a_bundle_with_nan_weights_is_refused(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    weights = load_file(bundle / "model.safetensors")
    name = next(k for k in sorted(weights) if "layers.2." in k)
    weights[name][0] = float("inf")
    save_file(weights, bundle / "model.safetensors", metadata={"format": "pt"})
    rehash(bundle)
    with pytest.raises(OffsiteError, match="NaN or infinite"):
        load_bundle(bundle)


@pytest.mark.parametrize("argv, message", [
    (["tune", "b", "--data", "t.txt", "-o", "a", "--weight-decay", "inf"], "--weight-decay=inf must be a finite"),
    (["tune", "b", "--data", "t.txt", "-o", "a", "--weight-decay", "nan"], "--weight-decay=nan must be a finite"),
    (["emulate", "m", "-o", "b", "--distill", "austen", "--kd-weight", "nan"], "--kd-weight=nan must be a finite"),
    (["emulate", "m", "-o", "b", "--distill", "austen", "--lm-weight", "inf"], "--lm-weight=inf must be a finite"),
])
def test_float_flags_must_be_finite_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_training_stops_at_the_first_non_finite_loss(model_dirs, tmp_path, train_file):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    with pytest.raises(OffsiteError, match="training step .*(loss is|gradient is)"):
        tune(TuneConfig(bundle=str(bundle), data=str(train_file), output=str(tmp_path / "a"),
                        train=TrainConfig(max_steps=4, lr=1e30, batch_size=2, seq_len=32)))
    assert not (tmp_path / "a").exists()


# --- 4. what is checked is what is loaded -----------------------------------------------------------------

def test_a_file_swapped_after_the_check_is_never_loaded(model_dirs, tmp_path, monkeypatch):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    other = make_bundle(model_dirs["llama"], tmp_path / "o", bottom=1, top=3)  # same files, other weights
    honest, _ = load_bundle(bundle)
    copy = bundle_module.copy_hashing

    def then_swap(source, target):
        digest = copy(source, target)
        if source.name == "model.safetensors":  # the attacker swaps the file right after it was hashed
            shutil.copy(other / "model.safetensors", source)
        return digest

    monkeypatch.setattr(bundle_module, "copy_hashing", then_swap)
    loaded, _ = load_bundle(bundle)
    assert all(torch.equal(a, b) for a, b in zip(honest.state_dict().values(), loaded.state_dict().values()))


def test_an_adapter_file_swapped_after_the_check_is_never_loaded(model_dirs, tmp_path, monkeypatch):
    from offsite.exchange import adapter as adapter_module
    adapter = untrained_adapter(make_bundle(model_dirs["llama"], tmp_path / "b"), tmp_path / "a")
    honest = load_adapter(adapter)
    forged = {k: v + 1 for k, v in load_file(adapter / "adapter.safetensors").items()}
    copy = adapter_module.copy_hashing

    def then_swap(source, target):
        digest = copy(source, target)
        save_file(forged, source)  # the attacker swaps the weights right after they were hashed
        return digest

    monkeypatch.setattr(adapter_module, "copy_hashing", then_swap)
    loaded = load_adapter(adapter)
    assert all(torch.equal(honest.tensors[i][n], loaded.tensors[i][n]) for i in honest.tensors for n in honest.tensors[i])


# --- 5. distillation checkpoints resume only into the same full model and split ----------------------------

def test_a_distillation_checkpoint_of_another_model_is_not_resumed(model_dirs, tmp_path, train_file, monkeypatch,
                                                                  caplog):
    distill = DistillConfig(corpus=str(train_file), steps=4, eval_every=2, batch_size=2, seq_len=32)
    split = SplitConfig(bottom=2, top=2, emulator_layers=2)
    out = tmp_path / "bundle"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after distilling, before the bundle was written

    with monkeypatch.context() as patch:
        patch.setattr("offsite.api.write_bundle", crash)
        with pytest.raises(KeyboardInterrupt):
            emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(out), split=split, distill=distill))
    assert (tmp_path / ".bundle.distill" / "state.json").is_file()
    with caplog.at_level(logging.WARNING, logger="offsite"):
        emulate(EmulateConfig(model=str(model_dirs["qwen2"]), output=str(out), split=split, distill=distill))
    assert "made by a run with other inputs or settings" in caplog.text
    fresh = emulate(EmulateConfig(model=str(model_dirs["qwen2"]), output=str(tmp_path / "fresh"), split=split,
                                  distill=distill))
    assert load_file(out / "model.safetensors").keys() == load_file(fresh / "model.safetensors").keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(out / "model.safetensors").values(),
                                                 load_file(fresh / "model.safetensors").values()))


# --- other bugs of the audit -------------------------------------------------------------------------------

@pytest.mark.parametrize("rename", [lambda k: k.replace("layers.0.", "layers.00."),
                                    lambda k: k.replace("layers.0.", "layers.\u0660.")], ids=["leading-zero", "arabic-digit"])
def test_adapter_keys_are_parsed_canonically(model_dirs, tmp_path, rename):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    weights = load_file(adapter / "adapter.safetensors")
    save_file({rename(k): v for k, v in weights.items()}, adapter / "adapter.safetensors")
    meta = json.loads((adapter / "adapter.json").read_text())
    meta.pop("weights_sha256")
    (adapter / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(OffsiteError, match="unexpected tensor key"):
        load_adapter(adapter)


def test_adapter_weights_are_checked_against_adapter_json(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    weights = load_file(adapter / "adapter.safetensors")
    save_file({k: v * 2 for k, v in weights.items()}, adapter / "adapter.safetensors",
              metadata={"format": "offsite-adapter"})
    with pytest.raises(OffsiteError, match="modified or damaged"):
        load_adapter(adapter)


@pytest.mark.parametrize("kind", ["bundle", "adapter"])
def test_format_version_true_is_not_version_1(model_dirs, tmp_path, kind):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    target = bundle / "offsite.json" if kind == "bundle" else untrained_adapter(bundle, tmp_path / "a") / "adapter.json"
    data = json.loads(target.read_text())
    data["format_version"] = True
    target.write_text(json.dumps(data))
    with pytest.raises(OffsiteError, match="format version 1"):
        read_manifest(bundle) if kind == "bundle" else load_adapter(tmp_path / "a")


def test_adapter_files_are_flat_folders_of_files(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    (adapter / "adapter.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (adapter / "adapter.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(OffsiteError, match="symlinks or folders"):
        load_adapter(adapter)


@pytest.mark.parametrize("odd", ["symlink", "folder"])
def test_bundles_are_flat_folders_of_files(model_dirs, tmp_path, odd):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    (tmp_path / "secret").write_text("not for the data owner\n")
    if odd == "symlink":
        (bundle / "generation_config.json").unlink()
        (bundle / "generation_config.json").symlink_to(tmp_path / "secret")
        rehash(bundle)
    else:
        (bundle / "extra").mkdir()
    with pytest.raises(OffsiteError, match="symlinks or folders"):
        load_bundle(bundle)


def test_eval_json_never_prints_nan(model_dirs, tmp_path, train_file):
    """A bundle whose weights overflow gets a one-line error, never a score of NaN."""
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    weights = load_file(bundle / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 3e38)  # logits overflow
    save_file(weights, bundle / "model.safetensors", metadata={"format": "pt"})
    rehash(bundle)
    with pytest.raises(OffsiteError, match="log-likelihood is not finite"):
        evaluate(EvalConfig(model=str(bundle), data=str(train_file), seq_len=32))


# --- inputs that used to end in an unexpected error ---------------------------------------------------------

def test_deeply_nested_json_and_lone_surrogates_get_one_line_errors(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    (bundle / "offsite.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(OffsiteError, match="nests too deeply"):
        read_manifest(bundle)
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine \\ud800 line"}\n')
    with pytest.raises(OffsiteError, match="lone surrogate"):
        read_data(str(data))


def test_a_manifest_rank_larger_than_the_weight_is_refused(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b", method="uniform+lowrank")
    manifest = json.loads((bundle / "offsite.json").read_text())
    name = next(iter(manifest["emulator"]["compression"]["modules"]))
    manifest["emulator"]["compression"]["modules"][name]["rank"] = 10**12
    (bundle / "offsite.json").write_text(json.dumps(manifest))
    with pytest.raises(OffsiteError, match="more than its"):
        load_bundle(bundle)


def test_truncated_bundle_weights_get_a_one_line_error(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    data = (bundle / "model.safetensors").read_bytes()
    (bundle / "model.safetensors").write_bytes(data[: len(data) // 2])
    rehash(bundle)
    with pytest.raises(OffsiteError, match="could not load model"):
        load_bundle(bundle)


def test_a_window_longer_than_the_model_positions_is_refused_before_work(model_dirs, tmp_path, train_file):
    model = shutil.copytree(model_dirs["opt"], tmp_path / "opt")
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 128
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(OffsiteError, match="--seq-len=512 is longer than this model's 128 positions"):
        evaluate(EvalConfig(model=str(model), data=str(train_file)))


@pytest.mark.parametrize("case", ["symlink", "not-an-output", "cwd"])
def test_outputs_never_replace_what_they_should_not(model_dirs, tmp_path, monkeypatch, case):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file\n")
    output = {"symlink": tmp_path / "link", "not-an-output": mine, "cwd": tmp_path / "work"}[case]
    if case == "symlink":
        output.symlink_to(mine)
    if case == "cwd":
        (output / "x").mkdir(parents=True)
        (output / "x" / "adapter.json").write_text("{}")
        monkeypatch.chdir(output / "x")
        output = output / "x"
    with pytest.raises(OffsiteError, match="symlink|not an offsite output|current directory"):
        plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(output), overwrite=True))
    assert (mine / "notes.txt").read_text() == "the user's own file\n"


def test_temp_directories_of_killed_runs_are_removed(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    stale = tmp_path / ".p.tmp-999999999-abcd"  # no such process
    stale.mkdir()
    plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(tmp_path / "p")))
    assert not stale.exists() and (tmp_path / "p").is_dir()


def test_info_verifies_what_it_describes(model_dirs, tmp_path, capsys):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    assert describe(bundle)["verified"].startswith("files match")
    weights = load_file(bundle / "model.safetensors")
    name = sorted(weights)[3]
    weights[name] = weights[name] * float("nan")
    save_file(weights, bundle / "model.safetensors", metadata={"format": "pt"})
    assert main(["info", str(bundle)]) == 1
    assert "has been modified" in capsys.readouterr().err
    rehash(bundle)
    assert main(["info", str(bundle)]) == 1
    assert "holds NaN or infinite values" in capsys.readouterr().err


def test_untrusted_strings_reach_the_terminal_escaped_on_one_line(model_dirs, tmp_path, capsys):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    meta = json.loads((adapter / "adapter.json").read_text())
    meta["base_model"]["name_or_path"] = "evil\n\x1b[2Joffsite plug: plugged fine\x1b[0m"  # shown when refused
    (adapter / "adapter.json").write_text(json.dumps(meta))
    assert main(["plug", str(model_dirs["qwen2"]), str(adapter), "-o", str(tmp_path / "p"),
                 "--bundle", str(bundle)]) == 1  # another base model: refused, naming the one the file claims
    lines = [line for line in capsys.readouterr().err.splitlines() if "offsite plug" in line]
    assert len(lines) == 1 and lines[0].startswith("offsite plug: error:"), lines  # no forged second line
    assert "\x1b" not in lines[0] and "\\x1b[2J" in lines[0] and "evil\\n" in lines[0]


# --- signatures ----------------------------------------------------------------------------------------------

def test_signed_bundles_and_adapters_are_checked_against_the_trusted_key(model_dirs, tmp_path, train_file, capsys):
    assert main(["keygen", str(tmp_path / "owner")]) == 0 and main(["keygen", str(tmp_path / "customer")]) == 0
    assert (tmp_path / "owner").stat().st_mode & 0o077 == 0  # the private key is the owner's alone
    bundle = emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "b"),
                                   split=SplitConfig(emulator_layers=2), sign=str(tmp_path / "owner")))
    settings = TrainConfig(max_steps=2, batch_size=2, seq_len=32)
    with pytest.raises(OffsiteError, match="is not signed by the key"):  # signed, but by someone else
        tune(TuneConfig(bundle=str(bundle), data=str(train_file), output=str(tmp_path / "a"), train=settings,
                        trust=str(tmp_path / "customer.pub")))
    adapter = tune(TuneConfig(bundle=str(bundle), data=str(train_file), output=str(tmp_path / "a"), train=settings,
                              trust=str(tmp_path / "owner.pub"), sign=str(tmp_path / "customer")))
    plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(tmp_path / "p"),
                    trust=str(tmp_path / "customer.pub")))
    meta = json.loads((adapter / "adapter.json").read_text())
    meta["base_model"]["note"] = "changed after signing"
    (adapter / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(OffsiteError, match="is not signed by the key"):
        plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(tmp_path / "p2"),
                        trust=str(tmp_path / "customer.pub")))
    (adapter / "adapter.json.sig").unlink()
    with pytest.raises(OffsiteError, match="is not signed"):
        plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(tmp_path / "p2"),
                        trust=str(tmp_path / "customer.pub")))


def test_every_from_pretrained_pins_trust_remote_code_and_safetensors(model_dirs, monkeypatch):
    """Also for hub ids, where a cache holding only pytorch_model.bin would otherwise be unpickled."""
    seen = {}

    def record(source, **kwargs):
        seen.update(kwargs)
        raise OSError("no model.safetensors in this repository")

    from transformers import AutoConfig, AutoModelForCausalLM
    monkeypatch.setattr(loading, "load_config", lambda name: AutoConfig.for_model("llama"))  # no hub here
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    with pytest.raises(OffsiteError, match="never unpickles"):
        loading.load_model("some-org/some-model")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


def test_a_low_rank_factor_of_the_wrong_shape_is_refused(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b", method="uniform+lowrank")
    weights = load_file(bundle / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith(".down.weight"))
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
    save_file(weights, bundle / "model.safetensors", metadata={"format": "pt"})
    rehash(bundle)
    with pytest.raises(OffsiteError, match="weights do not fit its manifest"):
        load_bundle(bundle)


def test_an_output_where_no_directory_can_be_made_gets_one_line(model_dirs, tmp_path, capsys):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    assert main(["plug", str(model_dirs["llama"]), str(adapter), "-o", "/proc/offsite-test"]) == 1
    assert "cannot" in capsys.readouterr().err.splitlines()[-1]


def test_outputs_get_the_users_umask_not_0700(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    old = os.umask(0o022)
    try:
        adapter = untrained_adapter(bundle, tmp_path / "a")
        plugged = plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(tmp_path / "p")))
    finally:
        os.umask(old)
    assert plugged.stat().st_mode & 0o777 == 0o755 and bundle.stat().st_mode & 0o777 == 0o755


def test_a_perplexity_too_large_to_represent_is_an_error(model_dirs, tmp_path, train_file):
    """Found by the fuzzer: one flipped byte in the head gives a finite loss whose exp overflows."""
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    weights = load_file(bundle / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 1e4)  # large, finite logits
    save_file(weights, bundle / "model.safetensors", metadata={"format": "pt"})
    rehash(bundle)
    with pytest.raises(OffsiteError, match="too large to represent"):
        evaluate(EvalConfig(model=str(bundle), data=str(train_file), seq_len=32))
