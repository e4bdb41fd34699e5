"""What `offsite bench` measures inside each fresh process: one setting's training steps, or choice scoring.

Every function that runs in a spawned process takes plain, picklable arguments (the
BenchConfig as a dict) and returns a JSON-able dict.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from offsite import allocator
from offsite.api import emulate
from offsite.arch import get_layers
from offsite.config import EmulateConfig, SplitConfig
from offsite.data.builtin import BBC_TOPICS, BBC_WORDS
from offsite.data.tokens import IGNORE, Sequence, choice_sequence, collate, token_log_probs
from offsite.data.types import ChoiceExample
from offsite.device import CPU, Placement, place_model
from offsite.emulator.share import executed_layers
from offsite.exchange.bundle import bundle_index, load_bundle
from offsite.loading import load_config, load_model, load_tokenizer
from offsite.processes import current_rss_mb, in_fresh_process, peak_rss_mb
from offsite.scoring import choice_logliks
from offsite.studies.bench.flops import Shapes, read_shapes
from offsite.studies.bench.settings import CACHED, CHECKPOINTED, RANDOM_SHAPES, TOP_ONLY, BenchConfig, uses_lora
from offsite.studies.bench.tensor_memory import TensorPeak, existing_tensors
from offsite.training.checkpointing import checkpointed_blocks
from offsite.training.emulator_cache import EmulatorCache
from offsite.training.loss import batch_loss, mean_loss
from offsite.training.trainer import add_lora, freeze_all_but

LR = 1e-5  # the value does not change the cost of a step
# `offsite eval`'s default window: long enough that no bbc-news-shaped context is cut, so all
# three scoring methods see the same tokens and must agree.
EVAL_SEQ_LEN = 512
LossFunction = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def model_config(config: BenchConfig, num_layers: int | None = None) -> PretrainedConfig:
    """The full model's config (or the random shape's), optionally with fewer layers."""
    if config.random_shape is not None:
        fields = dict(RANDOM_SHAPES[config.random_shape])
        result = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        result = load_config(config.model)
    if num_layers is not None:
        result.num_hidden_layers = num_layers
    return result


def model_shapes(config: BenchConfig) -> Shapes:
    """Layer shapes from a meta-device model: no weights are allocated."""
    with torch.device("meta"):
        return read_shapes(AutoModelForCausalLM.from_config(model_config(config)))


def make_bundle(model: str, split: dict[str, Any], output: str) -> dict[str, Any]:
    """`offsite emulate`, as the model owner runs it."""
    emulate(EmulateConfig(model=model, output=output, split=SplitConfig(**split), overwrite=True))
    return {"bundle": output}


def prepare_bundles(config: BenchConfig, work: Path) -> dict[str, str]:
    """A bundle per offsite setting of a real model; random shapes build their reduced model from the config."""
    if config.random_shape is not None:
        return {}
    made: dict[int, str] = {}
    bundles = {}
    for name in config.settings:
        if name.startswith("offsite"):
            bottom = 0 if name in TOP_ONLY else config.split.bottom
            if bottom not in made:  # the two splits differ only in --bottom
                split = {**config.split.to_dict(), "bottom": bottom}
                made[bottom] = in_fresh_process(config.isolate, make_bundle, config.model, split,
                                                 str(work / f"bundle-bottom{bottom}"))["bundle"]
            bundles[name] = made[bottom]
    return bundles


def _random_model(config: BenchConfig, num_layers: int | None) -> nn.Module:
    torch.manual_seed(config.seed)
    return AutoModelForCausalLM.from_config(model_config(config, num_layers), dtype=torch.float32)


def setting_model(config: BenchConfig, name: str, bundle: str | None) -> tuple[nn.Module, list[int], tuple[int, ...]]:
    """The model a setting trains, the positions of its trainable blocks, and the original layer run at each position.

    A bundle whose emulator shares layers runs some stored blocks at several positions.
    """
    plan = config.plans(model_config(config).num_hidden_layers)[name]
    if name.startswith("full_ft"):
        model = load_model(config.model) if config.model else _random_model(config, None)
        return model, list(range(plan.num_layers)), plan.kept
    if bundle is not None:
        model, manifest = load_bundle(bundle, in_memory=name in CACHED)  # as `tune --cache-emulator` loads it
        originals = tuple(executed_layers(manifest.plan, manifest.emulator))
        return model, [bundle_index(manifest)[i] for i in manifest.plan.adapter], originals
    return _random_model(config, len(plan.kept)), [plan.kept.index(i) for i in plan.adapter], plan.kept


def bench_sequences(config: BenchConfig, vocab_size: int, count: int) -> list[Sequence]:
    """`count` sequences of seq_len random tokens; choice tasks score only the last token(s)."""
    generator = torch.Generator().manual_seed(config.seed)
    rows = torch.randint(0, vocab_size, (count, config.seq_len + 1), generator=generator).tolist()
    unscored = config.seq_len - config.scored_tokens
    return [Sequence(row[:-1], [IGNORE] * unscored + row[1 + unscored:]) for row in rows]


def all_positions_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain-transformers loss: logits (B, T, V) at every position, unscored ones ignored by the loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return mean_loss(logits, batch["labels"])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_of: LossFunction,
               batch: dict[str, torch.Tensor], placement: Placement = CPU) -> float:
    """Seconds for forward, backward and optimizer step."""
    start = time.perf_counter()
    with placement.autocast():
        loss = loss_of(model, batch)
    loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)  # the model's: offsite_emulator_grads fills gradients the optimizer never steps
    placement.synchronize()  # a GPU runs ahead of Python: wait, or the time is only the launch
    return time.perf_counter() - start


def tensor_memory_mb(model: nn.Module, optimizer: torch.optim.Optimizer, loss_of: LossFunction,
                     batch: dict[str, torch.Tensor], extra: list[torch.Tensor],
                     placement: Placement = CPU) -> dict[str, float]:
    """Tensor memory before one more training step (weights, optimizer state, `extra`) and its peak during it.

    Runs once, after the timed steps, so optimizer state exists; tracking slows the step
    (see offsite.studies.bench.tensor_memory).
    """
    tracker = TensorPeak()
    tracker.add_all(existing_tensors(model, optimizer) + list(extra) + list(batch.values()))
    before = tracker.current
    with tracker:
        train_step(model, optimizer, loss_of, batch, placement)
    return {"before_step": before / 2**20, "peak": tracker.peak / 2**20}


def step_batches(sequences: list[Sequence], batch_size: int) -> list[dict]:
    # equal lengths: no padding
    return [collate(sequences[start: start + batch_size], pad_id=0) for start in range(0, len(sequences), batch_size)]


def _start(config_dict: dict[str, Any]) -> BenchConfig:
    """The config, with this process's threads and seed set."""
    config = BenchConfig.from_dict(config_dict)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    return config


@dataclass
class Trainee:
    """A setting's model ready to train: what the optimizer steps, the loss, and the context steps run in."""

    model: nn.Module  # peft-wrapped for the LoRA settings
    stepped: list[nn.Parameter]
    loss_of: LossFunction
    all_logits: bool
    context: contextlib.AbstractContextManager


def prepare_trainee(config: BenchConfig, name: str, model: nn.Module, positions: list[int]) -> Trainee:
    """Set a (non-cached) setting up on its loaded model, whose blocks at `positions` are the trainable ones."""
    trained = add_lora(model, positions, config.lora_rank, None) if uses_lora(name) else model
    stepped = [p for p in trained.parameters() if p.requires_grad]
    if name == "offsite_emulator_grads":
        trained.requires_grad_(True)
    all_logits = name.startswith("full_ft") or name == "offsite_all_logits"
    context = checkpointed_blocks(model, positions) if name in CHECKPOINTED else contextlib.nullcontext()
    return Trainee(trained, stepped, all_positions_loss if all_logits else batch_loss, all_logits, context)


def run_setting(config_dict: dict[str, Any], name: str, bundle: str | None) -> dict[str, Any]:
    """Train one setting for warm-up + timed steps and measure it (runs in a fresh process)."""
    config = _start(config_dict)
    runtime_rss = current_rss_mb()  # Python, torch, transformers, peft: what every setting pays before its model
    model, positions, originals = setting_model(config, name, bundle)
    freeze_all_but(model, positions)
    # The cached settings keep the emulator's outputs in CPU memory (as `tune --cache-emulator`): CPU only.
    placement = CPU if name in CACHED else Placement.of(config.runtime.device, config.runtime.dtype)
    place_model(model, placement, keep_float32=[get_layers(model)[p] for p in positions])
    trained_layers = [originals[i] for i, block in enumerate(get_layers(model))
                      if any(p.requires_grad for p in block.parameters())]
    if name in CACHED:
        measured, all_logits = _measure_cached(config, model, positions, uses_lora(name)), False
    else:
        trainee = prepare_trainee(config, name, model, positions)
        with trainee.context:
            measured = _measure_steps(config, trainee.model, trainee.loss_of, trainee.stepped, placement)
        all_logits = trainee.all_logits
    return {"setting": name, "device_peak_mb": None, **measured, "trained_layers": trained_layers, "model_blocks": len(originals),
            "logits": "all positions" if all_logits else "scored positions", **placement.describe(),
            "torch_threads": torch.get_num_threads(), "allocator": allocator.active(), "runtime_rss_mb": runtime_rss, "peak_rss_mb": peak_rss_mb()}


def _measure_steps(config: BenchConfig, model: nn.Module, loss_of: LossFunction,
                   stepped: list[nn.Parameter], placement: Placement = CPU) -> dict[str, Any]:
    """Median step time over `steps` fresh batches after `warmup_steps`, then one tracked step.

    The optimizer steps `stepped`; the trainable count is theirs.
    """
    count = (config.warmup_steps + config.steps) * config.batch_size
    batches = [placement.batch(b) for b in step_batches(bench_sequences(config, model.config.vocab_size, count),
                                                           config.batch_size)]
    model.train()
    optimizer = torch.optim.AdamW(stepped, lr=LR)
    placement.reset_peak_memory()
    seconds = [train_step(model, optimizer, loss_of, batch, placement) for batch in batches][config.warmup_steps:]
    step = statistics.median(seconds)
    device_peak = placement.peak_memory_mb()  # the accelerator's own count, before the tracked step adds to it
    tensor = tensor_memory_mb(model, optimizer, loss_of, batches[-1], [], placement)
    return {"tokens_per_s": config.batch_size * config.seq_len / step, "step_seconds": step,
            "device_peak_mb": device_peak,
            "trainable_params": sum(p.numel() for p in stepped), "peak_tensor_mb": tensor["peak"], "tensor_mb_before_step": tensor["before_step"]}


def _measure_cached(config: BenchConfig, model: nn.Module, positions: list[int], lora: bool) -> dict[str, Any]:
    """One epoch is `steps` batches: cache them (timed), warm up, then time `epochs` epochs of steps.

    As in `offsite tune --cache-emulator`, the cache is built first and LoRA (if any) added after it,
    the cached blocks' weights are parked on disk while the steps run, and each step pads its
    batch's cached outputs.
    """
    sequences = bench_sequences(config, model.config.vocab_size, config.steps * config.batch_size)
    start = time.perf_counter()
    cache = EmulatorCache.build(model, sequences, positions, pad_id=0, batch_size=config.batch_size)
    with cache.frozen_blocks_parked():
        cache_seconds = time.perf_counter() - start  # building the cache and parking the weights
        trained = add_lora(model, positions, config.lora_rank, None) if lora else model
        batches = step_batches(sequences, config.batch_size)

        def with_cached_output(index: int) -> dict[str, torch.Tensor]:
            rows = range(index * config.batch_size, min((index + 1) * config.batch_size, len(sequences)))
            return {**batches[index], "frozen_output": cache.batch(list(rows))}

        trained.train()
        stepped = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(stepped, lr=LR)
        for step in range(config.warmup_steps):
            train_step(trained, optimizer, cache.loss, with_cached_output(step % len(batches)))
        start = time.perf_counter()
        seconds = [train_step(trained, optimizer, cache.loss, with_cached_output(index))
                   for _ in range(config.epochs) for index in range(len(batches))]
        training_seconds = time.perf_counter() - start  # the steps and the padding of their cached outputs
        tensor = tensor_memory_mb(trained, optimizer, cache.loss, with_cached_output(len(batches) - 1),
                                  cache.outputs)
    tokens = config.epochs * len(sequences) * config.seq_len
    step = statistics.median(seconds)
    return {"tokens_per_s": tokens / (cache_seconds + training_seconds), "step_seconds": step,
            "tokens_per_s_steady": config.batch_size * config.seq_len / step, "cache_seconds": cache_seconds,
            "epochs": config.epochs, "cache_mb": sum(o.numel() * o.element_size() for o in cache.outputs) / 2**20,
            "blocks_run_per_step": len(get_layers(model)) - cache.prefix,
            "trainable_params": sum(p.numel() for p in stepped), "peak_tensor_mb": tensor["peak"],
            "tensor_mb_before_step": tensor["before_step"]}


# Filler for bbc-news-shaped contexts; the words do not change the cost.
WORDS = ("the government said on monday that its plans for the new market would cut prices and raise growth "
         "while the team won the match after a late goal and the film took more money than expected at the "
         "box office as users of the new phone service reported faster speeds").split()


def choice_examples(count: int, seed: int) -> list[ChoiceExample]:
    """bbc-news-shaped examples: a 100-word article, five one-token topics."""
    rng = random.Random(seed)
    return [ChoiceExample(f"Article: {' '.join(rng.choices(WORDS, k=BBC_WORDS))}\nTopic:",
                          tuple(BBC_TOPICS.values()), 0) for _ in range(count)]


@torch.no_grad()
def naive_logliks(model: nn.Module, tokenizer, example: ChoiceExample, seq_len: int, batch_size: int) -> list[float]:
    """Context + choice through the whole model once per choice (batch_size choices per forward)."""
    sequences = [choice_sequence(tokenizer, example.context, choice, seq_len) for choice in example.choices]
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(sequences[start: start + batch_size],
                                                           tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores += token_log_probs(logits, batch["labels"]).sum(-1).tolist()
    return scores


def run_evaluation(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Choice-scoring examples/s: offsite's evaluator against one forward per choice (runs in a fresh process)."""
    config = _start(config_dict)
    model, tokenizer = load_model(config.model), load_tokenizer(config.model)
    placement = Placement.of(config.runtime.device, config.runtime.dtype)
    place_model(model, placement)
    examples = choice_examples(config.eval_examples, config.seed)
    choices = len(examples[0].choices)
    methods = {
        "offsite": lambda ex: choice_logliks(model, tokenizer, ex, EVAL_SEQ_LEN),
        "naive": lambda ex: naive_logliks(model, tokenizer, ex, EVAL_SEQ_LEN, 1),
        "batched": lambda ex: naive_logliks(model, tokenizer, ex, EVAL_SEQ_LEN, choices),
    }
    rates, scores = {}, {}
    for method, score_one in methods.items():
        with placement.autocast():
            score_one(examples[0])  # warm-up
            start = time.perf_counter()
            scores[method] = [score_one(ex) for ex in examples]
            placement.synchronize()
        rates[method] = len(examples) / (time.perf_counter() - start)
    diff = max(abs(a - b) for x, y in zip(scores["offsite"], scores["naive"]) for a, b in zip(x, y))
    return {"examples": len(examples), "choices": choices, "offsite_examples_per_s": rates["offsite"],
            "naive_examples_per_s": rates["naive"], "batched_examples_per_s": rates["batched"],
            "speedup": rates["offsite"] / rates["naive"], "speedup_vs_batched": rates["offsite"] / rates["batched"],
            "max_abs_loglik_diff": diff, "peak_rss_mb": peak_rss_mb()}


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
