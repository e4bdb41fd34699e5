"""Encoders that classify (ViT, DeiT, BEiT, DINOv2, BERT, RoBERTa): emulate and plug, with the task head in the adapter.

Tiny random models built from configs (tests/tiny_encoders.py), one per family.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open
from tiny_encoders import ENCODER_FAMILIES, IMAGE_FAMILIES, NUM_LAYERS, encoder_inputs, save_tiny_encoder

from offsite import EmulateConfig, PlugConfig, SplitConfig, emulate, plug
from offsite.arch import get_layers, layer_paths
from offsite.errors import OffsiteError
from offsite.exchange.adapter import Adapter, extract, extract_head, load_adapter
from offsite.exchange.bundle import bundle_index, load_bundle
from offsite.kinds import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION, kind_of
from offsite.loading import load_model
from offsite.training.trainer import freeze_all_but


BLOCK_KEY = re.compile(r"\.layers?\.(\d+)\.")


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    class Dirs(dict):
        def __missing__(self, family):
            self[family] = save_tiny_encoder(family, tmp_path_factory.mktemp(family))
            return self[family]
    return Dirs()


@pytest.fixture(params=ENCODER_FAMILIES)
def encoder(request):
    return request.param


def logits(model, family):
    with torch.no_grad():
        return model(**encoder_inputs(family)).logits


def bundle_of(model_dir, out, emulator_layers=1):
    return emulate(EmulateConfig(model=str(model_dir), output=str(out),
                                 split=SplitConfig(bottom=2, top=2, emulator_layers=emulator_layers)))


def shipped_adapter(bundle, directory, shift: float = 0.0):
    """The bundle's adapter layers and task head (plus `shift` on every weight), saved as an adapter file."""
    model, manifest = load_bundle(bundle)
    positions = bundle_index(manifest)
    layers = extract(model, {i: positions[i] for i in manifest.plan.adapter})
    head = extract_head(model)
    for tensor in [t for named in layers.values() for t in named.values()] + list(head.values()):
        if tensor.is_floating_point():
            tensor += shift
    directory.mkdir()
    Adapter(layers, manifest.fingerprint, manifest.base_model, head=head).save(directory)
    return directory


def test_each_family_is_a_classifier_of_its_kind(encoder, encoder_dirs):
    model = load_model(str(encoder_dirs[encoder]))
    expected = IMAGE_CLASSIFICATION if encoder in IMAGE_FAMILIES else TEXT_CLASSIFICATION
    assert kind_of(model.config) is expected
    assert len(get_layers(model)) == NUM_LAYERS and layer_paths(model).task_head


def test_an_emulator_of_every_middle_block_equals_the_full_model(encoder, encoder_dirs, tmp_path):
    full = load_model(str(encoder_dirs[encoder]))
    bundle = bundle_of(encoder_dirs[encoder], tmp_path / "b", emulator_layers=NUM_LAYERS - 4)
    emulator, _ = load_bundle(bundle)
    assert torch.allclose(logits(full, encoder), logits(emulator, encoder), atol=1e-6)


def test_the_bundle_holds_no_dropped_block_and_loads_with_the_auto_class(encoder, encoder_dirs, tmp_path):
    bundle = bundle_of(encoder_dirs[encoder], tmp_path / "b")
    manifest = json.loads((bundle / "offsite.json").read_text())
    assert [layer["original_index"] for layer in manifest["layers"]] == [0, 1, 2, 4, 5]
    with safe_open(str(bundle / "model.safetensors"), "pt") as weights:  # keys as the checkpoint format names them
        stored = {int(match.group(1)) for key in weights.keys() if (match := BLOCK_KEY.search(key))}
    assert stored == set(range(5))  # five blocks, renumbered; the sixth was never written
    assert len(get_layers(load_model(str(bundle)))) == 5  # plain from_pretrained of its kind


def test_plugging_the_untrained_adapter_and_head_gives_the_full_model_s_logits(encoder, encoder_dirs, tmp_path):
    full = load_model(str(encoder_dirs[encoder]))
    bundle = bundle_of(encoder_dirs[encoder], tmp_path / "b")
    adapter = shipped_adapter(bundle, tmp_path / "a")
    assert load_adapter(adapter).head  # the task head travels with the adapter layers
    for stream in (True, False):
        plugged = plug(PlugConfig(model=str(encoder_dirs[encoder]), adapter=str(adapter),
                                  output=str(tmp_path / f"p{stream}"), bundle=str(bundle), stream=stream))
        assert torch.equal(logits(full, encoder), logits(load_model(str(plugged)), encoder))


def test_a_plugged_head_is_the_adapter_s_head(encoder_dirs, tmp_path):
    family = "bert"
    bundle = bundle_of(encoder_dirs[family], tmp_path / "b")
    adapter = shipped_adapter(bundle, tmp_path / "a", shift=0.01)
    plugged = load_model(str(plug(PlugConfig(model=str(encoder_dirs[family]), adapter=str(adapter),
                                             output=str(tmp_path / "p"), bundle=str(bundle)))))
    shipped = load_adapter(adapter)
    assert set(shipped.head) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                                 "classifier.bias"}
    state = plugged.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in shipped.head.items())


def test_only_the_adapter_blocks_and_the_task_head_get_gradients(encoder, encoder_dirs, tmp_path):
    bundle = bundle_of(encoder_dirs[encoder], tmp_path / "b")
    model, manifest = load_bundle(bundle)
    positions = bundle_index(manifest)
    trained = freeze_all_but(model, [positions[i] for i in manifest.plan.adapter])
    labels = torch.tensor([0, 2])
    model(**encoder_inputs(encoder), labels=labels).loss.backward()
    prefix, head = layer_paths(model).layers, layer_paths(model).task_head
    adapter_prefixes = tuple(f"{prefix}.{positions[i]}." for i in manifest.plan.adapter)
    for name, param in model.named_parameters():
        expected = name.startswith(adapter_prefixes) or name.startswith(tuple(f"{h}." for h in head))
        assert param.requires_grad == expected, name
        if not expected:
            assert param.grad is None, name
    assert {id(p) for p in trained} == {id(p) for p in model.parameters() if p.requires_grad}


def test_an_adapter_for_another_base_is_refused(encoder_dirs, tmp_path):
    bundle = bundle_of(encoder_dirs["vit"], tmp_path / "b")
    adapter = shipped_adapter(bundle, tmp_path / "a")
    other = save_tiny_encoder("vit", tmp_path / "other", seed=5)
    with pytest.raises(OffsiteError, match="was made for another base model"):
        plug(PlugConfig(model=str(other), adapter=str(adapter), output=str(tmp_path / "p"), bundle=str(bundle)))


def test_a_classifier_s_adapter_without_its_head_is_refused(encoder_dirs, tmp_path):
    bundle = bundle_of(encoder_dirs["vit"], tmp_path / "b")
    model, manifest = load_bundle(bundle)
    positions = bundle_index(manifest)
    (tmp_path / "a").mkdir()
    Adapter(extract(model, {i: positions[i] for i in manifest.plan.adapter}), manifest.fingerprint,
            manifest.base_model).save(tmp_path / "a")
    with pytest.raises(OffsiteError, match="classification head's tensors differ from this model's: missing"):
        plug(PlugConfig(model=str(encoder_dirs["vit"]), adapter=str(tmp_path / "a"), output=str(tmp_path / "p"),
                        bundle=str(bundle)))


@pytest.mark.parametrize("model_type, why", [("swin", "merge patches"), ("convnext", "convolutional")])
def test_architectures_that_are_not_one_block_stack_are_refused_with_the_reason(model_type, why, tmp_path):
    from transformers import AutoConfig, AutoModelForImageClassification
    config = AutoConfig.for_model(model_type, num_labels=2, image_size=32, depths=[1, 1], hidden_sizes=[8, 16],
                                  embed_dim=8, num_heads=[1, 2]) if model_type == "swin" else \
        AutoConfig.for_model(model_type, num_labels=2, depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8])
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "m")
    with pytest.raises(OffsiteError, match=f"cannot be offsite-tuned: .*{why}"):
        emulate(EmulateConfig(model=str(tmp_path / "m"), output=str(tmp_path / "b")))


def test_a_headless_encoder_is_refused_with_the_fix(tmp_path):
    from transformers import ViTConfig, ViTModel
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                       image_size=16, patch_size=4)).save_pretrained(tmp_path / "m")
    with pytest.raises(OffsiteError, match="ViTModel without a task head.*AutoModelForImageClassification"):
        load_model(str(tmp_path / "m"))


def write_reviews(path, count=24):
    """A toy sentiment task whose labels ("good", "bad") are not the tiny model's ("cat", "dog", "fish")."""
    # The first token differs: a BERT classifies from its first position, and this tokenizer adds no [CLS].
    words = {"good": "bright warm sunny morning in the harbour", "bad": "cold storm broke the old boats"}
    with open(path, "w") as handle:
        for i in range(count):
            label = "good" if i % 2 else "bad"
            handle.write(json.dumps({"text": f"{words[label]} {i}", "label": label}) + "\n")
    return path


def write_image_folder(root, per_label=6):
    """PNG files under root/<label>/: bright images are "light", dark ones "dark"."""
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for label, base in (("dark", 30), ("light", 220)):
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            noise = torch.randint(-25, 25, (16, 16, 3), generator=generator)
            pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_tuning_a_text_classifier_gives_it_a_head_for_the_data_s_labels_that_plugs(encoder_dirs, tmp_path):
    from offsite import EvalConfig, TrainConfig, TuneConfig, evaluate, tune
    data = write_reviews(tmp_path / "reviews.jsonl")
    bundle = bundle_of(encoder_dirs["bert"], tmp_path / "b")
    adapter = tune(TuneConfig(bundle=str(bundle), data=str(data), output=str(tmp_path / "a"), eval_data=str(data),
                              train=TrainConfig(max_steps=12, batch_size=8, lr=1e-3, seq_len=32, eval_every=4)))
    trained = load_adapter(adapter)
    checks = [r["eval"] for r in map(json.loads, (adapter / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert len(checks) == 3 and all(c["task"] == "classify" for c in checks)
    assert trained.training["summary"]["best_eval"] == max(checks, key=lambda c: c["accuracy"])
    assert trained.labels == ("bad", "good") and trained.head["classifier.weight"].shape[0] == 2
    losses = [json.loads(line)["loss"] for line in (adapter / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    plugged = load_model(str(plug(PlugConfig(model=str(encoder_dirs["bert"]), adapter=str(adapter),
                                             output=str(tmp_path / "p"), bundle=str(bundle)))))
    assert plugged.config.id2label == {0: "bad", 1: "good"}
    assert all(torch.equal(plugged.state_dict()[name], tensor) for name, tensor in trained.head.items())
    result = evaluate(EvalConfig(model=str(tmp_path / "p"), data=str(data), seq_len=32))
    assert result["task"] == "classify" and result["n"] == 24 and result["accuracy"] >= 0.75
    through = evaluate(EvalConfig(model=str(bundle), adapter=str(adapter), data=str(data), seq_len=32))
    assert through["n"] == 24  # the bundle takes the adapter's head too
    settings = json.loads((adapter / "adapter.json").read_text())["training"]["settings"]
    assert settings["train"]["head_lr_scale"] == 10.0
    from offsite import describe
    info = describe(adapter)
    assert info["labels"] == ["bad", "good"] and "classifier.weight" in info["head"]


def test_the_cli_tunes_plugs_and_scores_a_vision_classifier_on_an_image_folder(encoder_dirs, tmp_path, capsys):
    from offsite.cli import main
    images = write_image_folder(tmp_path / "photos")
    model = str(encoder_dirs["vit"])
    steps = [["emulate", model, "-o", str(tmp_path / "b"), "--bottom", "2", "--top", "2", "--emulator-layers", "1"],
             ["tune", str(tmp_path / "b"), "--data", str(images), "-o", str(tmp_path / "a"), "--max-steps", "4",
              "--batch-size", "4", "--lr", "1e-3"],
             ["plug", model, str(tmp_path / "a"), "-o", str(tmp_path / "p"), "--bundle", str(tmp_path / "b")],
             ["eval", str(tmp_path / "p"), "--data", str(images), "--json"]]
    for argv in steps:
        assert main(argv) in (0, None), argv
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "classify" and result["n"] == 12
    assert load_adapter(tmp_path / "a").labels == ("dark", "light")


def test_a_file_that_is_not_an_image_gets_one_line_naming_it(encoder_dirs, tmp_path):
    from offsite import TrainConfig, TuneConfig, tune
    images = write_image_folder(tmp_path / "photos")
    (images / "dark" / "broken.png").write_bytes(b"not a png")
    bundle = bundle_of(encoder_dirs["vit"], tmp_path / "b")
    with pytest.raises(OffsiteError, match="broken.png: not a readable image"):
        tune(TuneConfig(bundle=str(bundle), data=str(images), output=str(tmp_path / "a"),
                        train=TrainConfig(max_steps=1)))
    assert not (tmp_path / "a").exists()


def write_idx(root, part, labels, size=4):
    """An IDX image file (size x size images, each filled with its index, so all differ) and its labels file."""
    import gzip
    import struct
    count = len(labels)
    pixels = torch.arange(count).repeat_interleave(size * size).to(torch.uint8).reshape(count, size, size).numpy()
    with gzip.open(root / f"{part}-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">HBB3I", 0, 8, 3, count, size, size) + pixels.tobytes())
    with gzip.open(root / f"{part}-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">HBBI", 0, 8, 1, count) + bytes(labels))
    return pixels


def test_idx_files_read_as_labelled_images(tmp_path):
    from offsite.data.read import read_data
    pixels = write_idx(tmp_path, "t10k", [7, 2, 7])
    data = read_data(str(tmp_path / "t10k-images-idx3-ubyte.gz"))
    assert data.modality == "image" and data.labels == ("2", "7") and [e.label for e in data.examples] == [1, 0, 1]
    assert (data.examples[2].input == pixels[2]).all() and not (data.examples[1].input == pixels[2]).all()


def test_a_classifier_s_emulator_distils_on_hidden_states_of_unlabelled_images(encoder_dirs, tmp_path):
    from offsite.config import DistillConfig
    images = write_image_folder(tmp_path / "photos")
    heldout = write_image_folder(tmp_path / "heldout", per_label=2)
    plain = bundle_of(encoder_dirs["vit"], tmp_path / "plain")
    bundle = emulate(EmulateConfig(model=str(encoder_dirs["vit"]), output=str(tmp_path / "b"),
                                   split=SplitConfig(bottom=2, top=2, emulator_layers=1),
                                   distill=DistillConfig(corpus=str(images), heldout=str(heldout), steps=4,
                                                         batch_size=4, lr=1e-3, eval_every=2)))
    summary = json.loads((bundle / "offsite.json").read_text())["emulator"]["distill"]
    assert summary["settings"]["kl_weight"] == 0 and summary["settings"]["lm_weight"] == 0  # hidden states only
    assert summary["selected_by"] == "standin_error" and summary["heldout_standin_error_best"] < \
        summary["heldout_standin_error_before"]
    assert all(h["perplexity"] is None for h in summary["heldout"])
    trained, _ = load_bundle(bundle)
    untouched, _ = load_bundle(plain)
    changed = [name for name, tensor in trained.state_dict().items()
               if not torch.equal(tensor, untouched.state_dict()[name])]
    assert changed and all(name.startswith("vit.layers.2.") for name in changed)  # the emulator block only


def test_text_classifiers_distil_on_plain_text(encoder_dirs, tmp_path, sample_text_file):
    from offsite.config import DistillConfig
    lines = tmp_path / "corpus.jsonl"
    lines.write_text("".join(json.dumps({"text": line}) + "\n" for line in sample_text_file.read_text().split(". ")))
    bundle = emulate(EmulateConfig(model=str(encoder_dirs["bert"]), output=str(tmp_path / "b"),
                                   split=SplitConfig(bottom=2, top=2, emulator_layers=1),
                                   distill=DistillConfig(corpus=str(lines), steps=3, batch_size=4, seq_len=32)))
    assert json.loads((bundle / "offsite.json").read_text())["emulator"]["method"] == "uniform+distill"


def test_a_classifier_cannot_be_distilled_by_perplexity_or_aligned(encoder_dirs, tmp_path, sample_text_file):
    from offsite.config import DistillConfig
    with pytest.raises(OffsiteError, match="a classifier has no perplexity"):
        emulate(EmulateConfig(model=str(encoder_dirs["vit"]), output=str(tmp_path / "b"),
                              split=SplitConfig(emulator_layers=1),
                              distill=DistillConfig(corpus=str(sample_text_file), select="perplexity")))
    assert not (tmp_path / "b").exists()


def test_a_few_tune_steps_lower_the_loss_for_every_family(encoder, encoder_dirs, tmp_path):
    from offsite import TrainConfig, TuneConfig, tune
    data = write_image_folder(tmp_path / "photos") if encoder in IMAGE_FAMILIES else write_reviews(tmp_path / "r.jsonl")
    bundle = bundle_of(encoder_dirs[encoder], tmp_path / "b")
    adapter = tune(TuneConfig(bundle=str(bundle), data=str(data), output=str(tmp_path / "a"),
                              train=TrainConfig(max_steps=16, batch_size=6, lr=1e-3, seq_len=32)))
    losses = [r["loss"] for r in map(json.loads, (adapter / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-4:]) < sum(losses[:4])


def test_federating_a_classifier_is_refused_in_one_line(encoder_dirs, tmp_path):
    from offsite.config import FederateConfig
    from offsite.federation.simulation import federate
    bundle = bundle_of(encoder_dirs["bert"], tmp_path / "b")
    data = [str(write_reviews(tmp_path / f"{i}.jsonl")) for i in range(2)]
    with pytest.raises(OffsiteError, match="federating a classifier .* is not built yet"):
        federate(FederateConfig(bundle=str(bundle), client_data=data, output=str(tmp_path / "a")))


def test_the_built_in_fashion_tasks_split_by_class_and_hold_out_validation(tmp_path, monkeypatch):
    from offsite.data import builtin
    write_idx(tmp_path, "train", [i % 10 for i in range(60)])
    write_idx(tmp_path, "t10k", [i % 10 for i in range(20)])
    monkeypatch.setattr(builtin, "fashion_mnist_file", lambda part: tmp_path / f"{part}-images-idx3-ubyte.gz")
    monkeypatch.setattr(builtin, "FASHION_VALIDATION", 5)
    for task in (builtin.fashion_pretrain, builtin.fashion_transfer):
        task.cache_clear()
    pretrain, transfer = builtin.fashion_pretrain(), builtin.fashion_transfer()
    assert pretrain["train"].labels == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
    assert transfer["test"].labels == ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert [len(transfer[s].examples) for s in ("train", "validation", "test")] == [25, 5, 10]
    seen = {bytes(e.input.tobytes()) for s in ("train", "validation") for e in transfer[s].examples}
    assert len(seen) == 30  # train and validation are disjoint images
    pretrained = {bytes(e.input.tobytes()) for e in pretrain["train"].examples}
    assert not seen & pretrained  # the transfer task's images are of classes the pretraining never saw
    for task in (builtin.fashion_pretrain, builtin.fashion_transfer):
        task.cache_clear()


def test_the_built_in_vision_model_is_pretrained_once_and_found_by_its_alias(tmp_path, monkeypatch):
    from offsite.assets import AssetError, resolve_model
    from offsite.data import builtin
    from offsite.studies import vision_model
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError, match="offsite setup-assets --vision"):
        resolve_model("vit-fashion")
    write_idx(tmp_path, "train", [i % 10 for i in range(80)], size=28)
    write_idx(tmp_path, "t10k", [i % 10 for i in range(20)], size=28)
    monkeypatch.setattr(builtin, "fashion_mnist_file", lambda part: tmp_path / f"{part}-images-idx3-ubyte.gz")
    monkeypatch.setattr(builtin, "FASHION_VALIDATION", 5)
    builtin.fashion_pretrain.cache_clear()
    try:
        tiny = vision_model.VisionPretraining(num_layers=2, hidden_size=16, heads=2, epochs=1, batch_size=8)
        built = vision_model.pretrain(tiny)
    finally:
        builtin.fashion_pretrain.cache_clear()
    record = json.loads((built / "pretraining.json").read_text())
    assert record["train_images"] == 35 and record["steps"] == 4 and 0 <= record["test_accuracy"] <= 1
    assert resolve_model("vit-fashion") == str(built)
    model = load_model("vit-fashion")
    assert kind_of(model.config) is IMAGE_CLASSIFICATION and len(get_layers(model)) == 2
    assert model.config.id2label[0] == "T-shirt/top"
    monkeypatch.setattr(vision_model, "pretrain", lambda *a: pytest.fail("pretrained twice"))
    assert vision_model.ensure_vision_model() == built  # cached: not pretrained again


def test_language_model_steps_refuse_a_classifier_in_one_line(encoder_dirs, tmp_path):
    from offsite.api import sample_corpus
    from offsite.config import SampleConfig
    from offsite.studies.demo import demo
    from offsite.studies.settings import DemoConfig
    with pytest.raises(OffsiteError, match="offsite data sample is for language models, and .* is a classifier"):
        sample_corpus(SampleConfig(model=str(encoder_dirs["vit"]), output=str(tmp_path / "s.jsonl")))
    with pytest.raises(OffsiteError, match="is a classifier; the demo's tasks are for language models"):
        demo(DemoConfig(model=str(encoder_dirs["bert"]), output=str(tmp_path / "demo"), quick=True, distill=None))


@pytest.mark.parametrize("method", ["similarity", "gradient"])
def test_a_selection_measured_on_text_is_refused_for_a_classifier(encoder_dirs, tmp_path, sample_text_file, method):
    with pytest.raises(OffsiteError, match=f"--method {method} measures the blocks on text.*uniform selection"):
        emulate(EmulateConfig(model=str(encoder_dirs["vit"]), output=str(tmp_path / "b"),
                              split=SplitConfig(emulator_layers=1, method=method,
                                                calibration=str(sample_text_file))))
    assert not (tmp_path / "b").exists()
