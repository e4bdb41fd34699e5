"""The protocol on one page: the model owner `emulate`s and `plug`s, the data owner `tune`s, anyone `evaluate`s.

Each step is one typed function over a config dataclass (`offsite.config`); the `offsite`
command calls only these and the studies. The pieces they put together live one layer down:
`emulator` (making the emulator), `training` (the trainer), `exchange` (bundle, adapter file,
fingerprint), `data` and `scoring`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offsite.arch import blocks_config, get_layers, layer_paths
from offsite.assets import setup_assets  # noqa: F401 - part of the API: `offsite setup-assets`
from offsite.config import (AlignConfig, DeviceConfig, DistillConfig, EmulateConfig, EvalConfig, ExportConfig, KeygenConfig,
                            PlugConfig, SampleConfig, TuneConfig)
from offsite.constants import ADAPTER_METADATA, METRICS, MODEL_CONFIG
from offsite.data import builtin
from offsite.data.classified import Classified, items_digest
from offsite.data.read import read_data, write_jsonl
from offsite.data.tokens import Sequence
from offsite.data.types import Data, LabelledData, TextData, limit
from offsite.device import DTYPES, Placement, place_model
from offsite.emulator.build import build_emulator, calibration_corpus, compress_reduced, reduce_skeleton, streams
from offsite.emulator.compress import COMPRESSIONS
from offsite.emulator.distill import distill, read_corpus, read_heldout
from offsite.emulator.split import SplitPlan, plan_split
from offsite.errors import OffsiteError
from offsite.exchange import issued, signing
from offsite.exchange.adapter import (HEAD, Adapter, apply, check_fits, check_head, check_plug, extract, extract_head,
                                      head_state, load_adapter, opened_adapter, plug_into)
from offsite.exchange.bundle import (Manifest, bundle_index, check_bundle, emulator_positions, is_bundle, open_bundle,
                                     write_bundle)
from offsite.exchange.fingerprint import file_fingerprint, model_fingerprint
from offsite.files import atomic_dir, check_output_dir, check_output_file, read_json
from offsite.heads import model_labels, rehead
from offsite.loading import (check_window, is_classifier, load_config, load_model, load_preprocessor,
                             load_tokenizer)
from offsite.scoring import score
from offsite import parallel
from offsite.parallel import Processes
from offsite.training.resume import Resumable
from offsite.training.trainer import train_layers, training_sequences
from offsite.weights import materialize, open_streamed, source_keys, stores_layers, write_streamed

log = logging.getLogger(__name__)


def emulate(config: EmulateConfig) -> Path:
    """Model owner: write a bundle of `config.model` split as `config.split` to `config.output`."""
    sources = [config.model, config.split.calibration, config.distill.corpus if config.distill else None,
               config.distill.heldout if config.distill else None]
    check_output_dir(config.output, config.overwrite, inputs=tuple(s for s in sources if s))
    if config.sign:
        signing.check_private_key(config.sign)  # a bad key fails now, not after distilling
    classifier = is_classifier(config.model)
    if classifier and config.split.selection != "uniform":
        raise OffsiteError(f"--method {config.split.selection} measures the blocks on text through a language "
                           "model; a classifier's bundle uses the uniform selection")
    if classifier and config.distill:
        config.distill = classifier_distillation(config.distill)
    corpus = read_corpus(config.distill, classifier) if config.distill else None  # a bad corpus fails now
    if config.distill:
        read_heldout(config.distill, classifier)
        distill_placement(config.runtime)  # a dtype it cannot train in fails now too
        check_window(load_config(config.model), config.distill.seq_len, "--distill-seq-len")
    if config.split.selection == "similarity":
        calibration_corpus(config)
    processes = _distill_processes(config, "emulate")
    if config.stream and streams(config) and _emulate_streamed(config):
        return Path(config.output)
    log.info("loading full model %s", config.model)
    model = load_model(config.model)
    tokenizer = load_preprocessor(config.model)
    plan = plan_split(blocks_config(model.config).num_hidden_layers, config.split)
    base_fingerprint = model_fingerprint(model, plan.adapter)
    checkpoint = Path(config.output).with_name(f".{Path(config.output).name}.distill")
    emulator_model, plan, emulator = build_emulator(model, tokenizer, plan, config, corpus, checkpoint,
                                                    base_fingerprint, processes)
    del model
    if not processes.main:  # it distilled its share; the main process writes the bundle
        return Path(config.output)
    manifest = Manifest(_base_model(config.model, emulator_model, plan), config.split, plan, base_fingerprint, {},
                        emulator)
    write_bundle(config.output, config.overwrite, emulator_model, tokenizer, manifest, sign=config.sign,
                 max_shard_size=config.max_shard_size)
    issued.record(manifest, config.output)  # plug later replaces only these layers
    shutil.rmtree(checkpoint, ignore_errors=True)
    return Path(config.output)


def classifier_distillation(settings: DistillConfig) -> DistillConfig:
    """A classifier's emulator learns the middle block's hidden states only (the paper's vision recipe):
    it has no next-token distribution for the KL and LM terms, and no perplexity to choose a checkpoint by."""
    if settings.select == "perplexity":
        raise OffsiteError("--distill-select perplexity: a classifier has no perplexity; use the default "
                           "(the held-out stand-in error)")
    if settings.kl_weight or settings.lm_weight:
        log.info("a classifier's emulator is distilled on hidden states only: --kl-weight and --lm-weight do not "
                 "apply")
    return dataclasses.replace(settings, kl_weight=0.0, lm_weight=0.0)


def check_text_model(model: str, what: str) -> None:
    """Steps that read or write text through a language model's head (re-alignment, sampling)."""
    if is_classifier(model):
        raise OffsiteError(f"{what} is for language models, and {model} is a classifier (see docs/encoders.md)")


def _distill_processes(config: EmulateConfig | AlignConfig, command: str) -> Processes:
    """The data-parallel processes distillation runs in (one, unless launched: `COMMAND --num-processes`)."""
    processes = parallel.current(config.runtime, config.num_processes, command)
    if processes.parallel and not config.distill:
        raise OffsiteError("several processes distil an emulator: --num-processes needs --distill")
    if config.shard_full_model and not processes.parallel:
        raise OffsiteError("--shard-full-model shares the full model among several processes: add --num-processes N "
                           "(N > 1), or drop it")
    return processes


def _emulate_streamed(config: EmulateConfig) -> bool:
    """`emulate` for a bundle of layers kept as they are, copied from the model's files shard by shard.

    False when the model cannot stream (a hub id, a checkpoint transformers renames while loading):
    then `emulate` loads it whole, with the same result.
    """
    streamed = open_streamed(config.model)
    if streamed is None:
        return False
    skeleton = streamed.skeleton
    plan = plan_split(blocks_config(skeleton.config).num_hidden_layers, config.split)
    base_fingerprint = file_fingerprint(streamed, plan.adapter)
    if base_fingerprint is None:
        return False
    plan, emulator = reduce_skeleton(skeleton, plan, config)
    mapping = source_keys(streamed, plan.kept)
    if mapping is None:
        return False
    log.info("streaming %d tensors of %s into the bundle (the full model is never loaded)", len(mapping),
             config.model)
    if config.split.compression:  # the kept layers alone, loaded and compressed
        bundle_model = materialize(streamed, mapping)
        compress_reduced(bundle_model, plan, config, emulator)
        write = bundle_model
    else:
        write = lambda tmp: write_streamed(streamed, tmp, mapping, max_shard_size=config.max_shard_size)  # noqa: E731
    manifest = Manifest(_base_model(config.model, skeleton, plan), config.split, plan, base_fingerprint, {}, emulator)
    write_bundle(config.output, config.overwrite, write, load_preprocessor(config.model), manifest, sign=config.sign,
                 max_shard_size=config.max_shard_size)
    issued.record(manifest, config.output)
    return True


def _base_model(name_or_path: str, model: PreTrainedModel, plan: SplitPlan) -> dict[str, Any]:
    """The manifest's record of the full model."""
    return {"name_or_path": name_or_path, "revision": getattr(model.config, "_commit_hash", None),
            "model_type": model.config.model_type, "num_layers": plan.num_layers}


def tune(config: TuneConfig, emulator: dict[int, dict[str, torch.Tensor]] | None = None) -> Path:
    """Data owner: train the adapter of `config.bundle` on `config.data`; write the adapter file to `config.output`.

    `emulator`: weights for the bundle's emulator layers (by bundle position, see
    `emulator_positions`) that replace the bundle's own for this run: a federation's re-aligned
    emulator, sent by the model owner with the round's adapter.
    """
    check_output_dir(config.output, config.overwrite,
                     inputs=tuple(s for s in (config.bundle, config.data, config.eval_data) if s))
    if config.sign:
        signing.check_private_key(config.sign)  # a bad key fails now, not after training
    processes = parallel.current(config.runtime, config.num_processes, "tune")
    placement = training_placement(config, processes)
    data = read_data(config.data)
    eval_data = read_data(config.eval_data, "--eval-data", default_split="validation") if config.eval_data else None
    torch.manual_seed(config.train.seed)
    # parking the cached blocks (training.emulator_cache) only frees memory if the weights are not file pages
    model, tokenizer, manifest = open_bundle(config.bundle, in_memory=config.train.cache_emulator or bool(emulator),
                                             trust=config.trust)
    if emulator:
        check_alignable(manifest, config.bundle)
        apply(model, Adapter(emulator, manifest.fingerprint, manifest.base_model, {}), emulator_positions(manifest),
              "the federation's re-aligned emulator")
    check_window(model.config, config.train.seq_len)
    positions = bundle_index(manifest)
    if config.init_adapter:
        start = load_adapter(config.init_adapter)
        if start.fingerprint != manifest.fingerprint:
            raise OffsiteError(f"--init-adapter {config.init_adapter} was not trained for bundle {config.bundle}: "
                               f"fingerprints {start.fingerprint[:16]}… and {manifest.fingerprint[:16]}… differ")
        apply(model, start, positions, config.init_adapter)
    if isinstance(data, LabelledData):
        check_classifier(model, config)
        if rehead(model, data.labels, config.train.seed):
            log.info("a new classification head for the %d labels of --data: %s", len(data.labels),
                     ", ".join(data.labels[:10]))
    sequences = training_sequences(data, tokenizer, config.train.seq_len, model)
    if not sequences:
        raise OffsiteError(f"--data {config.data} gives no training sequence; it needs at least 2 tokens")
    trained = [positions[i] for i in manifest.plan.adapter]
    head = [model.get_submodule(path) for path in layer_paths(model).task_head]
    place_model(model, placement, keep_float32=[get_layers(model)[p] for p in trained] + head)
    resumable = Resumable(Path(config.output).with_name(f".{Path(config.output).name}.tune"),
                          {**_run_identity(manifest, sequences, eval_data, config), "dtype": str(placement.dtype),
                           "processes": processes.count, "emulator": _digest(emulator)},
                          config.checkpoint_every)
    if not processes.main:  # it trains its share; the main process validates and writes the adapter
        with tempfile.TemporaryDirectory(prefix="offsite-worker-") as scratch:
            train_layers(model, tokenizer, sequences, trained, config.train, Path(scratch) / METRICS, eval_data,
                         resumable, placement, processes)  # eval_data: it follows the main process's checks
        return Path(config.output)
    with atomic_dir(config.output, config.overwrite) as tmp:
        model = train_layers(model, tokenizer, sequences, trained, config.train, tmp / METRICS, eval_data, resumable,
                             placement, processes)
        tensors = extract(model, {i: positions[i] for i in manifest.plan.adapter})
        adapter = Adapter(
            tensors={i: {k: v.to("cpu", DTYPES[config.save_dtype]) for k, v in named.items()}
                     for i, named in tensors.items()},
            fingerprint=manifest.fingerprint,
            base_model=manifest.base_model,
            training={"settings": config.to_dict(), "summary": model.offsite_training_summary},
            head={k: v.to("cpu", DTYPES[config.save_dtype]) for k, v in extract_head(model).items()},
            labels=model_labels(model) if head_state(model) else None,
        )
        adapter.save(tmp, sign=config.sign)
    resumable.remove()
    return Path(config.output)


def training_placement(config: TuneConfig, processes: Processes = parallel.ONE) -> Placement:
    """Where `tune` trains, after refusing what it cannot do there."""
    if processes.parallel and config.train.cache_emulator:
        raise OffsiteError("--cache-emulator works in one process only; drop it, or --num-processes")
    placement = processes.placement(config.runtime)
    if config.train.cache_emulator and placement.device.type != "cpu":
        raise OffsiteError(f"--cache-emulator keeps the emulator's outputs in CPU memory and works with --device cpu "
                           f"only; drop it to train on {placement.device}")
    log.info("training on %s, compute dtype %s", placement.device, str(placement.dtype).removeprefix("torch."))
    return placement


def distill_placement(runtime: DeviceConfig, processes: Processes = parallel.ONE) -> Placement:
    """Where distillation runs; float16 is refused (distillation does no loss scaling, unlike `tune`)."""
    placement = processes.placement(runtime)
    if placement.dtype == torch.float16:
        raise OffsiteError("--dtype float16: distillation does no loss scaling; use --dtype bfloat16 (or float32)")
    return placement


def align(config: AlignConfig) -> Path:
    """Model owner: re-distil `config.bundle`'s emulator with `config.adapter` in the loop; write a new bundle.

    Only emulator weights change: the new bundle has the same layers, split, fingerprint and
    format, and ships the bundle's original adapter layers (never the data owner's).
    """
    sources = tuple(s for s in (config.bundle, config.model, config.adapter, config.distill.corpus,
                                config.distill.heldout) if s)
    check_output_dir(config.output, config.overwrite, inputs=sources)
    if config.sign:
        signing.check_private_key(config.sign)
    check_text_model(config.model, "offsite align")
    corpus = read_corpus(config.distill)  # a bad corpus fails now, not after loading
    read_heldout(config.distill)
    processes = _distill_processes(config, "align")
    placement = distill_placement(config.runtime, processes)
    student, tokenizer, manifest = open_bundle(config.bundle, in_memory=True)
    check_window(student.config, config.distill.seq_len, "--distill-seq-len")
    check_alignable(manifest, config.bundle)
    adapter = load_adapter(config.adapter, trust=config.trust)
    if adapter.fingerprint != manifest.fingerprint:
        raise OffsiteError(f"--adapter {config.adapter} was not trained for bundle {config.bundle}: fingerprints "
                           f"{adapter.fingerprint[:16]}… and {manifest.fingerprint[:16]}… differ")
    full = load_model(config.model)
    plug_into(full, adapter, config.adapter, manifest.plan.adapter)  # checks --model is the bundle's base model
    positions = bundle_index(manifest)
    shipped = extract(student, {i: positions[i] for i in manifest.plan.adapter})
    apply(student, adapter, positions, config.adapter)
    checkpoint = Path(config.output).with_name(f".{Path(config.output).name}.distill")
    identity = {"fingerprint": manifest.fingerprint, "bundle": manifest.files, "adapter": adapter.weights_sha256
                or adapter.fingerprint, "dtype": str(placement.dtype)}
    summary = distill(full, student, tokenizer, manifest.plan, config.distill, corpus, checkpoint, identity,
                      placement, processes, config.shard_full_model)
    del full
    if not processes.main:  # it distilled its share; the main process writes the bundle
        return Path(config.output)
    apply(student, Adapter(shipped, manifest.fingerprint, manifest.base_model, {}), positions, config.bundle)
    rounds = [*manifest.emulator.get("alignments", []), {"adapter": str(config.adapter),
                                                         "adapter_fingerprint": adapter.fingerprint, **summary}]
    emulator = {**manifest.emulator, "alignments": rounds}
    new_manifest = Manifest(manifest.base_model, manifest.split, manifest.plan, manifest.fingerprint, {}, emulator)
    write_bundle(config.output, config.overwrite, student, tokenizer, new_manifest, sign=config.sign)
    issued.record(new_manifest, config.output)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return Path(config.output)


def check_alignable(manifest: Manifest, source: str | Path) -> None:
    """Refuse to re-align an emulator whose weights do not train (shared layers, int8)."""
    compression = manifest.emulator.get("compression")
    frozen = compression is not None and not COMPRESSIONS[compression["method"]].before_distillation  # e.g. int8
    if manifest.emulator.get("share") or frozen:
        raise OffsiteError(f"{source}: only plain or lowrank emulators are re-aligned; this one is "
                           f"'{manifest.emulator.get('method')}' (shared layers and int8 weights do not train)")


def _digest(tensors: dict[int, dict[str, torch.Tensor]] | None) -> str | None:
    """A digest of layer weights, so a checkpoint trained through other emulator weights is not resumed."""
    if not tensors:
        return None
    digest = hashlib.sha256()
    for index, named in sorted(tensors.items()):
        for name, tensor in sorted(named.items()):
            digest.update(f"{index}.{name}".encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_classifier(model: PreTrainedModel, config: TuneConfig) -> None:
    """Labelled data trains a classifier only, and without the language-model-only speed-ups."""
    if not head_state(model):
        raise OffsiteError(f"--data {config.data} is labelled data for a classifier, but bundle {config.bundle} is "
                           "a language model: give it text or choice data")
    if config.train.cache_emulator or config.train.lora_rank:
        raise OffsiteError("--cache-emulator and --lora-rank work with language models only; drop them to train "
                           "a classifier")


def _run_identity(manifest: Manifest, sequences: list[Sequence], eval_data: Data | None,
                  config: TuneConfig) -> dict[str, Any]:
    """What a checkpoint must share with a rerun to be resumed: the bundle, the data and the settings."""
    digest = (items_digest(sequences) if sequences and isinstance(sequences[0], Classified) else
              hashlib.sha256(json.dumps([[s.input_ids, s.labels] for s in sequences]).encode()).hexdigest())
    return {"bundle": manifest.files, "fingerprint": manifest.fingerprint, "sequences": digest,
            "eval_data": hashlib.sha256(repr(eval_data).encode()).hexdigest(),  # dataclass repr: every example
            "train": config.train.to_dict()}


def plug(config: PlugConfig) -> Path:
    """Model owner: write the plugged model (full model + adapter) as a standard Hugging Face model directory."""
    check_output_dir(config.output, config.overwrite, inputs=(config.model, config.adapter))
    if is_bundle(config.model):
        raise OffsiteError(f"MODEL {config.model} is a bundle; plug into the full model the bundle was made from")
    if config.stream:
        with opened_adapter(config.adapter, trust=config.trust) as (adapter, read):  # one tensor at a time
            if _plug_streamed(config, adapter, issued.issued_layers(adapter, config.adapter, config.bundle), read):
                return Path(config.output)
    adapter = load_adapter(config.adapter, trust=config.trust)
    layers = issued.issued_layers(adapter, config.adapter, config.bundle)
    model = load_model(config.model)
    plug_into(model, adapter, config.adapter, layers)
    log.info("plugged adapter layers %s into %s", adapter.layers, config.model)
    with atomic_dir(config.output, config.overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=config.max_shard_size)
        load_preprocessor(config.model).save_pretrained(tmp)
    return Path(config.output)


def _plug_streamed(config: PlugConfig, adapter: Adapter, layers: tuple[int, ...],
                   read: Callable[[int, str], torch.Tensor]) -> bool:
    """`plug` as a copy of the full model's files shard by shard, with only the adapter's tensors replaced.

    The same checks as `plug_into`, on a weightless skeleton and the fingerprint read from the files;
    `adapter` holds weightless tensors, and `read(index, name)` reads one when its shard is written.
    False when the model cannot stream; then `plug` loads it whole, with the same result.
    """
    streamed = open_streamed(config.model)
    if streamed is None:
        return False
    skeleton = streamed.skeleton
    num_layers = blocks_config(skeleton.config).num_hidden_layers
    mapping = source_keys(streamed, tuple(range(num_layers)))
    if mapping is None or not stores_layers(streamed, [i for i in adapter.layers if i < num_layers]):
        return False
    check_plug(adapter, config.adapter, layers, num_layers, lambda: file_fingerprint(streamed, adapter.layers) or "")
    if adapter.labels is not None and model_labels(skeleton) != adapter.labels:
        return False  # a head for other labels: its shape changes, which the loaded path handles
    check_head(head_state(skeleton), adapter.head, config.adapter)
    check_fits(skeleton, adapter, {index: index for index in adapter.layers}, config.adapter)
    replacements = {f"{streamed.layers_prefix}.{index}.{name}": (index, name)
                    for index, named in adapter.tensors.items() for name in named}
    replacements.update({name: (HEAD, name) for name in adapter.head})  # a classifier's task head
    if not set(replacements) <= set(mapping):
        return False
    with atomic_dir(config.output, config.overwrite) as tmp:
        write_streamed(streamed, tmp, mapping, replace=lambda key: read(*replacements[key]) if key in replacements
                       else None, max_shard_size=config.max_shard_size)
        load_preprocessor(config.model).save_pretrained(tmp)
    log.info("plugged adapter layers %s into %s (streamed)", adapter.layers, config.model)
    return True


def load_for_eval(model_path: str, adapter_path: str | None, bundle: str | None = None
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A full model, bundle or plugged model and its tokenizer, with an adapter file applied in memory if given.

    An adapter on a full model replaces only the layers of the bundle issued for it (`bundle`, else
    the model owner's record), as `plug` does.
    """
    if not is_bundle(model_path):
        model = load_model(model_path)
        if adapter_path:
            adapter = load_adapter(adapter_path)
            plug_into(model, adapter, adapter_path, issued.issued_layers(adapter, adapter_path, bundle))
        return model, load_preprocessor(model_path)
    model, tokenizer, manifest = open_bundle(model_path)
    if adapter_path:
        adapter = load_adapter(adapter_path)
        if adapter.fingerprint != manifest.fingerprint:
            raise OffsiteError(
                f"adapter {adapter_path} was not trained for bundle {model_path}: fingerprints "
                f"{adapter.fingerprint[:16]}… and {manifest.fingerprint[:16]}… differ"
            )
        apply(model, adapter, bundle_index(manifest), adapter_path)
    return model, tokenizer


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Score `config.model` (optionally with `config.adapter`) on `config.data`: perplexity or choice accuracy.

    (`config.lm_eval` tasks are scored by `offsite.lmeval.evaluate`, which needs the lm-eval extra.)
    """
    if config.data is None:
        raise OffsiteError("offsite eval: give --data FILE (or --lm-eval TASKS, scored by offsite.lmeval)")
    check_window(load_config(config.model), config.seq_len)  # before any weight is read
    placement = Placement.of(config.runtime.device, config.runtime.dtype)
    if config.device_map:
        model, tokenizer = load_spread(config, placement)
    else:
        model, tokenizer = load_for_eval(config.model, config.adapter, config.bundle)
        place_model(model, placement)
    return score_loaded(config, model, tokenizer, placement)


def score_loaded(config: EvalConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 placement: Placement) -> dict[str, Any]:
    """`evaluate` of a model already loaded and placed: `config.data` (its first `config.limit` examples)."""
    data: Data = read_data(config.data, default_split="test")
    if config.limit is not None:
        data = limit(data, config.limit)
    with placement.autocast():
        return score(model, tokenizer, data, config.seq_len, config.batch_size, config.batch_tokens)


def load_spread(config: EvalConfig, placement: Placement) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A full or plugged model placed by accelerate over the devices (`--device-map auto`), in the compute dtype.

    An adapter is plugged into the placed blocks, which must all be in memory: a block offloaded
    to disk has no weights to check the fingerprint on or to replace.
    """
    if is_bundle(config.model):
        raise OffsiteError(f"--device-map: {config.model} is a bundle, which is small by design; score it without "
                           "--device-map (on --device)")
    model = load_model(config.model, dtype=placement.dtype, device_map=config.device_map,
                       max_memory=config.memory_limits())
    placed = getattr(model, "hf_device_map", {})
    log.info("placed by accelerate: %s", sorted(set(map(str, placed.values()))))
    if config.adapter:
        if "disk" in placed.values():
            raise OffsiteError("--device-map with --adapter: some blocks were offloaded to disk; give --max-memory "
                               "room for the whole model, or plug the adapter first (offsite plug) and score that")
        adapter = load_adapter(config.adapter)
        plug_into(model, adapter, config.adapter, issued.issued_layers(adapter, config.adapter, config.bundle))
    return model, load_preprocessor(config.model)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def describe(path: str | Path) -> dict[str, Any]:
    """What `path` is (bundle, adapter or model) and its layers, sizes and fingerprint."""
    root = Path(path)
    if root.is_file():
        raise OffsiteError(f"{root} is a file; pass a bundle, adapter or model directory")
    if not root.is_dir():
        raise OffsiteError(f"{root} does not exist; pass a bundle, adapter or model directory")
    if is_bundle(root):  # a directory in the manifest's place gets read_json's error, not "model"
        manifest = check_bundle(root)  # a damaged or tampered bundle is an error here too
        return {
            "kind": "bundle",
            "path": str(root),
            "base_model": manifest.base_model,
            "split": manifest.split.to_dict(),
            "layers": manifest.to_dict()["layers"],
            "fingerprint": manifest.fingerprint,
            "emulator_method": manifest.emulator.get("method", manifest.split.method),
            "emulator_bytes": manifest.emulator.get("bytes"),
            # From the layers themselves, not from a flag a sender could leave out.
            "carries_whole_model": manifest.plan.keeps_whole_middle,
            # Compressed or shared emulators need offsite's loader; plain ones load with from_pretrained too.
            "loads_with": "offsite" if manifest.emulator.get("compression") or manifest.emulator.get("share")
            else "from_pretrained or offsite",
            "bytes": _size(root),
            "verified": "files match the manifest; no code; weights finite",
        }
    if (root / ADAPTER_METADATA).exists():
        adapter = load_adapter(root)
        return {
            "kind": "adapter",
            "path": str(root),
            "base_model": adapter.base_model,
            "layers": adapter.layers,
            "fingerprint": adapter.fingerprint,
            "parameters": sum(t.numel() for named in [*adapter.tensors.values(), adapter.head] for t in named.values()),
            **({"head": sorted(adapter.head), "labels": list(adapter.labels or [])} if adapter.head else {}),
            "training": adapter.training.get("summary", {}),
            "bytes": _size(root),
            "verified": ("weights match adapter.json's SHA-256; keys canonical; weights finite"
                         if adapter.weights_sha256 else "keys canonical; weights finite (no SHA-256 recorded: "
                         "an adapter written by an older offsite)"),
        }
    if (root / MODEL_CONFIG).is_file():
        config = read_json(root / MODEL_CONFIG, "a model directory")
        return {
            "kind": "model",
            "path": str(root),
            "model_type": config.get("model_type"),
            "num_layers": config.get("num_hidden_layers", config.get("n_layer",
                                                                     config.get("vision_config", {}).get("num_hidden_layers"))),
            "bytes": _size(root),
        }
    raise OffsiteError(f"{root} is not a bundle (offsite.json), an adapter ({ADAPTER_METADATA}) or a model "
                       f"({MODEL_CONFIG})")


def keygen(config: KeygenConfig) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair for signing bundles or adapter files; return (private, public)."""
    return signing.keygen(config.key, config.overwrite)


def sample_corpus(config: SampleConfig) -> Path:
    """Model owner: sample texts from the full model (from its start-of-text token) into a jsonl corpus."""
    output = check_output_file(config.output, config.overwrite)
    check_text_model(config.model, "offsite data sample")
    model, tokenizer = load_model(config.model), load_tokenizer(config.model)
    placement = Placement.of(config.runtime.device, config.runtime.dtype)
    place_model(model, placement)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise OffsiteError(f"{config.model}: the tokenizer has no BOS or EOS token to start sampling from")
    torch.manual_seed(config.seed)
    texts: list[str] = []
    with tqdm(total=config.texts, desc="sample", unit="text") as bar:
        while len(texts) < config.texts:
            count = min(config.batch_size, config.texts - len(texts))
            prompt = torch.full((count, 1), start, dtype=torch.long, device=placement.device)
            with torch.no_grad(), placement.autocast():
                ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                     temperature=config.temperature, top_p=config.top_p, top_k=0,
                                     max_new_tokens=config.length, min_new_tokens=config.length,
                                     pad_token_id=tokenizer.pad_token_id or start)
            texts += [tokenizer.decode(row[1:], skip_special_tokens=True) for row in ids]
            bar.update(count)
    return write_jsonl(TextData([t for t in texts if t.strip()], f"sampled from {config.model}"), output)


def export_data(config: ExportConfig) -> tuple[Path, str]:
    """Write a built-in dataset as jsonl; return the file and the dataset's name."""
    if not builtin.is_builtin(config.name):
        raise OffsiteError(f"'{config.name}' is not a built-in dataset; available: {', '.join(builtin.BUILTIN)}")
    output = check_output_file(config.output, config.overwrite)
    data = read_data(config.name, flag="NAME")
    return write_jsonl(data, output), data.source
