"""The trainer: chosen blocks of a model train (the adapter, or every block for full fine-tuning), the rest frozen.

The data owner's `tune` trains a bundle's adapter with it; the demo's full fine-tuning baseline
trains every block of the full model with the same loop, so the two differ only in what trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup
from transformers.pytorch_utils import Conv1D

from offsite.arch import get_layers, layer_paths
from offsite.config import TrainConfig
from offsite.data.classified import Classified, classifier_items, collate_classified
from offsite.data.tokens import IGNORE, Sequence, collate, lm_sequences, train_choice_sequence
from offsite.data.types import ChoiceData, Data, LabelledData
from offsite.device import CPU, Placement
from offsite.heads import model_labels
from offsite.loading import pad_id
from offsite.numerics import check_step
from offsite.scoring import score
from offsite.training.checkpointing import checkpointed_blocks
from offsite.training.emulator_cache import EmulatorCache
from offsite.training.loss import batch_loss
from offsite.parallel import ONE, Processes
from offsite.training.resume import Resumable

log = logging.getLogger(__name__)


def freeze_all_but(model: nn.Module, positions: list[int]) -> list[nn.Parameter]:
    """Make only the blocks at `positions` (and a classifier's task head) trainable; return their parameters."""
    model.requires_grad_(False)
    layers = get_layers(model)
    for position in positions:
        layers[position].requires_grad_(True)
    for path in layer_paths(model).task_head:
        model.get_submodule(path).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def add_lora(model: PreTrainedModel, positions: list[int], rank: int, alpha: float | None) -> nn.Module:
    """Wrap the linear maps of the adapter blocks (and only those) with peft LoRA."""
    prefix = layer_paths(model).layers
    targets = [
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
        and any(name.startswith(f"{prefix}.{p}.") for p in positions)
    ]
    lora = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=targets,
                      fan_in_fan_out=isinstance(model.get_submodule(targets[0]), Conv1D))
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5 for a renamed attribute; nothing the user can act on
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)


def training_sequences(data: Data, tokenizer, seq_len: int, model: PreTrainedModel | None = None
                       ) -> list[Sequence] | list[Classified]:
    """What a step trains on; labelled data needs the classifier (`model`), whose head gives the label order."""
    if isinstance(data, LabelledData):
        assert model is not None, "labelled data trains a classifier"
        return classifier_items(data, tokenizer, seq_len, model_labels(model))
    if isinstance(data, ChoiceData):
        return [train_choice_sequence(tokenizer, ex, seq_len) for ex in data.examples]
    return lm_sequences(tokenizer, data.texts, seq_len)


@dataclass
class Best:
    """Best validation result so far and the trainable weights that produced it."""

    metric: float | None = None
    step: int | None = None
    result: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] | None = None

    def offer(self, result: dict[str, Any], step: int, model: nn.Module) -> None:
        # Higher accuracy is better; lower perplexity is better: compare on one scale.
        value = result["accuracy"] if result["task"] in ("choice", "classify") else -result["perplexity"]
        if self.metric is None or value > self.metric:
            self.metric, self.step, self.result = value, step, result
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def restore(self, model: nn.Module) -> None:
        if self.weights is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in self.weights.items():
                    params[name].copy_(value)


def train_layers(model: PreTrainedModel, tokenizer, sequences: list[Sequence], positions: list[int],
                 settings: TrainConfig, metrics_path: Path, eval_data: Data | None = None,
                 checkpoint: Resumable | None = None, placement: Placement = CPU,
                 processes: Processes = ONE) -> PreTrainedModel:
    """Train the blocks at `positions` of `model` (everything else frozen) and return the trained model.

    With LoRA the adapters are merged back, so the result has plain weights.
    The training summary (steps, losses, timing; `seconds_per_step` excludes
    validation) is stored in `model.offsite_training_summary`. With
    `settings.cache_emulator`, the frozen blocks below the lowest trainable one
    run once per sequence and are replayed, their weights parked on disk between
    validations (see offsite.training.emulator_cache); with
    `settings.checkpoint_emulator`, the frozen blocks above it recompute their
    activations in the backward pass (see offsite.training.checkpointing). With
    `checkpoint`, the run saves its state every few steps and on SIGTERM, and resumes from
    it (see offsite.training.resume). `placement`: the device and compute dtype of the forward
    (the model already placed with offsite.device.place_model: the trained blocks in float32).
    `processes`: the data-parallel processes this one is part of (see offsite.parallel);
    `settings.batch_size` is then per process.
    """
    freeze_all_but(model, positions)
    start = time.perf_counter()
    cache = (EmulatorCache.build(model, sequences, positions, tokenizer.pad_token_id, settings.batch_size)
             if settings.cache_emulator else None)
    cache_seconds = time.perf_counter() - start
    trained = add_lora(model, positions, settings.lora_rank, settings.lora_alpha) if settings.lora_rank else model
    checkpointing = checkpointed_blocks(model, positions) if settings.checkpoint_emulator else contextlib.nullcontext()
    parking = cache.frozen_blocks_parked() if cache is not None else contextlib.nullcontext()
    with checkpointing, parking:
        summary = _train(trained, tokenizer, sequences, eval_data, settings, metrics_path, cache, checkpoint,
                         placement, processes)
    if cache is not None:
        summary["cache_seconds"] = cache_seconds
    if settings.lora_rank:
        model = trained.merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    model.offsite_training_summary = summary
    return model


def _train(model: nn.Module, tokenizer, sequences: list[Sequence], eval_data: Data | None,
           settings: TrainConfig, metrics_path: Path, cache: EmulatorCache | None = None,
           checkpoint: Resumable | None = None, placement: Placement = CPU,
           processes: Processes = ONE) -> dict[str, Any]:
    groups = parameter_groups(model, settings)
    params = [p for group in groups for p in group["params"]]
    # Where the weights start, taken before a checkpoint is resumed: the proximal term's anchor.
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu else None
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    # Steps, shuffling and batches are those of one process with the global batch.
    global_settings = dataclasses.replace(settings, batch_size=settings.batch_size * processes.count)
    steps = global_settings.total_steps(len(sequences))
    eval_every = settings.eval_every or max(1, steps // 5)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    batches = _batch_stream(sequences, global_settings, pad_id(tokenizer), cache)
    # float16 underflows small gradients: scale the loss up, and skip a step whose gradients overflowed.
    scaler = torch.amp.GradScaler(placement.device.type) if placement.dtype == torch.float16 else None
    best, start, loss, step_seconds = Best(), time.perf_counter(), float("nan"), 0.0
    stopped_at = None
    done = checkpoint.resume(model, optimizer, scheduler, best, metrics_path, scaler) if checkpoint else 0
    for _ in range(done * settings.grad_accum):  # the data position: the same batches in the same order
        next(batches)
    save_every = (checkpoint.every if checkpoint else None) or min(eval_every, 100)
    model.train()
    with (open(metrics_path, "a") as metrics,
          tqdm(total=steps, initial=done, desc="train", unit="step", disable=not processes.main) as bar,
          checkpoint.saved_on_sigterm() if checkpoint else contextlib.nullcontext() as stop):
        for step in range(done + 1, steps + 1):
            step_start = time.perf_counter()
            loss = _optimizer_step(model, batches, settings.grad_accum, optimizer, scheduler, cache, step, placement,
                                   processes, scaler, Proximal(settings.proximal_mu, anchor) if anchor else None)
            step_seconds += time.perf_counter() - step_start
            _log(metrics, {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0]})
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            if eval_data is not None and (step % eval_every == 0 or step == steps):
                stop_now = False
                if processes.main:  # every process holds the same weights: one validates and keeps the best
                    with (cache.frozen_blocks_loaded() if cache is not None else contextlib.nullcontext(),
                          placement.autocast()):
                        result = score(model, tokenizer, eval_data, settings.seq_len, settings.batch_size)
                    best.offer(result, step, model)
                    _log(metrics, {"step": step, "eval": result})
                    log.info("step %d validation %s", step, result)
                    stop_now = bool(settings.patience and step < steps
                                    and step - best.step >= settings.patience * eval_every)
                    if stop_now:
                        log.info("step %d: no better validation for %d checks since step %d; stopping",
                                 step, settings.patience, best.step)
                if processes.from_main(stop_now):
                    stopped_at = step
                    break
            if checkpoint and processes.main and step < steps and (step % save_every == 0 or stop.requested):
                checkpoint.save(step, model, optimizer, scheduler, best, metrics_path, scaler)
                if stop.requested:
                    raise KeyboardInterrupt  # the CLI says how to resume
    seconds = time.perf_counter() - start
    best.restore(model)
    ran = stopped_at or steps
    return {"steps": ran, "max_steps": steps, "stopped_early": stopped_at is not None, "final_loss": loss,
            "best_step": best.step, "best_eval": best.result, "train_sequences": len(sequences),
            "trainable_params": sum(p.numel() for p in params), "seconds": seconds,
            "seconds_per_step": step_seconds / max(1, ran - done), "processes": processes.count,
            "global_batch": settings.batch_size * processes.count * settings.grad_accum}


def parameter_groups(model: nn.Module, settings: TrainConfig) -> list[dict[str, Any]]:
    """The trained parameters; a classifier's new task head in a group of its own at `head_lr_scale` x the lr."""
    head = {id(p) for path in layer_paths(_unwrapped(model)).task_head
            for p in _unwrapped(model).get_submodule(path).parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if id(p) not in head], "lr": settings.lr}]
    if head:
        groups.append({"params": [p for p in trained if id(p) in head], "lr": settings.lr * settings.head_lr_scale})
    return [group for group in groups if group["params"]]


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _batch_stream(sequences: list[Sequence] | list[Classified], settings: TrainConfig, pad_id: int,
                  cache: EmulatorCache | None = None):
    """Endless shuffled micro-batches, reshuffled every epoch with the run's seed."""
    generator = torch.Generator().manual_seed(settings.seed)
    gather = collate_classified if sequences and isinstance(sequences[0], Classified) else collate
    while True:
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for start in range(0, len(order), settings.batch_size):
            indices = order[start: start + settings.batch_size]
            batch = gather([sequences[i] for i in indices], pad_id)
            if cache is not None:
                batch["frozen_output"] = cache.batch(indices)
            yield batch


@dataclass
class Proximal:
    """FedProx's proximal term mu/2 * ||w - anchor||^2 over the trained parameters."""

    mu: float
    anchor: list[torch.Tensor]

    def add_gradient(self, params: list[nn.Parameter]) -> torch.Tensor:
        """Add the term's gradient mu * (w - anchor) to each parameter's (unscaled) gradient; return the term."""
        value = torch.zeros((), device=params[0].device)
        with torch.no_grad():
            for param, start in zip(params, self.anchor):
                difference = param - start
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.add_(difference, alpha=self.mu)
                value += difference.float().pow(2).sum()
        return value * self.mu / 2


def _optimizer_step(model: nn.Module, batches, grad_accum: int, optimizer, scheduler,
                    cache: EmulatorCache | None, step: int, placement: Placement = CPU,
                    processes: Processes = ONE, scaler: torch.amp.GradScaler | None = None,
                    proximal: Proximal | None = None) -> float:
    total = torch.zeros((), device=placement.device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(grad_accum):
        batch, share = processes.shard(next(batches), IGNORE)
        if share == 0:  # this process's rows of a short last batch score nothing
            continue
        batch = placement.batch(batch)
        with placement.autocast():  # the forward in the compute dtype; the backward follows it
            loss = (cache.loss if cache is not None else batch_loss)(model, batch) * share / grad_accum
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
    processes.sum_gradients(params)
    total = processes.sum(total)
    hint = "lower --lr (or --weight-decay), or check the data and the bundle"
    if scaler is None:
        if proximal is not None:  # after the all-reduce: every process adds the same term
            total += proximal.add_gradient(params)
        check_step(total, params, step, "training", hint)
        optimizer.step()
    else:  # the scaler checks the gradients itself: an overflow lowers the scale and skips the step
        check_step(total, [], step, "training", hint + " (or train in --dtype bfloat16)")
        scaler.unscale_(optimizer)
        if proximal is not None:
            total += proximal.add_gradient(params)
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total.item()


def _log(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()
