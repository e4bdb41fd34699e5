"""Distillation: the model owner trains the emulator layers to stand in for the full middle block.

The full model runs without gradients and returns its hidden states; the
compressed model (same bottom adapter, so the same input to the middle) is
trained on the normalised MSE between its emulator output and the full middle
block's output, plus its own language-modelling loss. Only emulator layers
train; adapter layers, embeddings, norm and head keep their pretrained weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offsite.arch import get_layers
from offsite.checkpoints import load_optimizer, load_tensors, optimizer_tensors, read_state, save_checkpoint
from offsite.config import DistillConfig
from offsite.data.builtin import is_builtin
from offsite.data.read import read_text_corpus
from offsite.data.tokens import Sequence, collate, lm_sequences
from offsite.data.types import TextData, truncate_text
from offsite.emulator.split import SplitPlan
from offsite.errors import OffsiteError
from offsite.numerics import check_step
from offsite.scoring import perplexity

log = logging.getLogger(__name__)


def alignment_targets(plan: SplitPlan, align: str) -> list[tuple[int, int]]:
    """(compressed-model hidden-state index, full-model hidden-state index) pairs to match.

    Hidden state k is the output of block k-1 (0 is the embeddings). A kept
    middle layer stands for itself and the dropped layers after it, so its output
    is matched with the full stack's output just before the next kept layer.
    """
    b = len(plan.bottom)
    ends = list(plan.emulator[1:]) + [plan.num_layers - len(plan.top)]
    pairs = [(b + i + 1, end) for i, end in enumerate(ends)]
    return pairs if align == "per-layer" else pairs[-1:]


def kd_loss(student_hidden: tuple[torch.Tensor, ...], full_hidden: tuple[torch.Tensor, ...],
            pairs: list[tuple[int, int]], mask: torch.Tensor) -> torch.Tensor:
    """Mean over `pairs` of MSE(student, full) / mean square of full, over unpadded positions."""
    keep = mask.bool()
    losses = []
    for s, f in pairs:
        target = full_hidden[f][keep].float()  # (tokens, hidden)
        losses.append(F.mse_loss(student_hidden[s][keep].float(), target) / target.pow(2).mean().clamp_min(1e-8))
    return torch.stack(losses).mean()


def _heldout(corpus: str) -> TextData | None:
    """The validation split of a built-in corpus, used to pick the best checkpoint."""
    if is_builtin(corpus) and ":" not in corpus:
        return read_text_corpus(corpus, "--distill", "distillation", default_split="validation")
    return None


def read_corpus(settings: DistillConfig) -> TextData:
    return read_text_corpus(settings.corpus, "--distill", "distillation")


def distill(full: PreTrainedModel, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: SplitPlan,
            settings: DistillConfig, corpus: TextData, checkpoint_dir: Path,
            identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `student`'s emulator layers in place; return a summary for the manifest.

    `checkpoint_dir` holds the run's state every `eval_every` steps (safetensors and
    JSON), so a rerun after an interruption resumes from there, but only a run of the same
    `identity` (the full model's fingerprint, the split and the method: see `emulator.build`).
    """
    heldout = _heldout(settings.corpus)
    sequences = lm_sequences(tokenizer, corpus.texts, settings.seq_len)
    if not sequences:
        raise OffsiteError(f"--distill {settings.corpus} gives no training window; it needs more text")
    heldout_data = truncate_text(heldout, settings.eval_windows, settings.seq_len) if heldout else None
    emulator = _distinct([get_layers(student)[len(plan.bottom) + i] for i in range(len(plan.emulator))])
    student.requires_grad_(False)
    for layer in emulator:
        layer.requires_grad_(True)
    params = [p for layer in emulator for p in layer.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    state = _resume(checkpoint_dir, emulator, optimizer, settings, identity or {})
    pairs = alignment_targets(plan, settings.align)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(sequences), generator=generator).tolist()
    full.eval()
    history = state.setdefault("history", [])
    start = time.perf_counter()
    if heldout_data is not None and "before" not in state:
        state["before"] = _score(student, tokenizer, heldout_data)
    with tqdm(total=settings.steps, initial=state["step"], desc="distill", unit="step") as bar:
        while state["step"] < settings.steps:
            step = state["step"]
            picks = [order[(step * settings.batch_size + i) % len(order)] for i in range(settings.batch_size)]
            kd, lm = _step(full, student, [sequences[i] for i in picks], tokenizer.pad_token_id, pairs, settings,
                           optimizer, step + 1)
            state["step"] = step + 1
            history.append({"step": step + 1, "kd": kd, "lm": lm})
            bar.update()
            bar.set_postfix(kd=f"{kd:.4f}", lm=f"{lm:.3f}")
            if heldout_data is not None and (state["step"] % settings.eval_every == 0 or state["step"] == settings.steps):
                _offer(state, _score(student, tokenizer, heldout_data), emulator, checkpoint_dir)
            if state["step"] % settings.eval_every == 0:
                _save(checkpoint_dir, emulator, optimizer, state)
    _restore_best(state, emulator, checkpoint_dir)
    student.requires_grad_(False)
    return {
        "corpus": settings.corpus, "corpus_sha256": corpus.sha256(),
        "settings": settings.to_dict(), "steps": state["step"], "seconds": time.perf_counter() - start,
        "final_kd": history[-1]["kd"] if history else None, "final_lm": history[-1]["lm"] if history else None,
        "heldout_perplexity_before": state.get("before"), "heldout_perplexity_best": state.get("best"),
        "best_step": state.get("best_step"),
    }


def _distinct(layers: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Layers with distinct weights: with layer sharing one stored layer runs at several positions."""
    found: dict[int, torch.nn.Module] = {}
    for layer in layers:
        found.setdefault(id(next(layer.parameters())), layer)
    return list(found.values())


def _score(model: PreTrainedModel, tokenizer, data: TextData) -> float:
    model.eval()
    return perplexity(model, tokenizer, data, 256, 8)["perplexity"]


def _step(full, student, batch_sequences: list[Sequence], pad_id: int, pairs, settings: DistillConfig,
          optimizer, step: int) -> tuple[float, float]:
    batch = collate(batch_sequences, pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        full_hidden = full(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states
    student.train()
    if settings.lm_weight > 0:
        out = student(**inputs, output_hidden_states=True)
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
    else:
        out = student(**inputs, output_hidden_states=True, logits_to_keep=1)
        lm = torch.zeros(())
    kd = kd_loss(out.hidden_states, full_hidden, pairs, batch["attention_mask"])
    loss = settings.kd_weight * kd + settings.lm_weight * lm
    loss.backward()
    check_step(loss, [p for group in optimizer.param_groups for p in group["params"]], step, "distillation",
               "lower --distill-lr, or check the corpus and the full model")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return kd.item(), lm.item()


# --- checkpoints: the model owner's local state, so an interrupted run resumes ------------------

def _emulator_weights(emulator: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": t.detach().clone() for i, layer in enumerate(emulator)
            for name, t in layer.state_dict().items()}


def _load_emulator_weights(emulator: list[torch.nn.Module], weights: dict[str, torch.Tensor]) -> None:
    for i, layer in enumerate(emulator):
        prefix = f"{i}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)


def _resume(checkpoint_dir: Path, emulator, optimizer, settings: DistillConfig,
            identity: dict[str, Any]) -> dict[str, Any]:
    # More steps may be asked for: the other settings, the full model, the split and the method must match.
    identity = {**identity, "settings": {k: v for k, v in settings.to_dict().items() if k != "steps"}}
    fresh: dict[str, Any] = {"step": 0, "settings": settings.to_dict(), "identity": identity}
    state = read_state(checkpoint_dir, identity)
    if state is None:
        return fresh
    saved = load_tensors(checkpoint_dir, "emulator")
    expected = {name: tensor.shape for name, tensor in _emulator_weights(emulator).items()}
    if {name: tensor.shape for name, tensor in saved.items()} != expected:
        log.warning("ignoring checkpoint %s: it holds another emulator's layers", checkpoint_dir)
        return fresh
    _load_emulator_weights(emulator, saved)
    load_optimizer(optimizer, load_tensors(checkpoint_dir, "optimizer"))
    log.info("resuming distillation from step %d (%s)", state["step"], checkpoint_dir)
    return state


def _save(checkpoint_dir: Path, emulator, optimizer, state: dict[str, Any]) -> None:
    save_checkpoint(checkpoint_dir, {"emulator": _emulator_weights(emulator), "optimizer": optimizer_tensors(optimizer)},
                    state)


def _offer(state: dict[str, Any], heldout_ppl: float, emulator, checkpoint_dir: Path) -> None:
    """Keep the emulator with the best held-out perplexity."""
    log.info("distill step %d: held-out perplexity %.2f", state["step"], heldout_ppl)
    if state.get("best") is None or heldout_ppl < state["best"]:
        state["best"], state["best_step"] = heldout_ppl, state["step"]
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        save_file(_emulator_weights(emulator), str(checkpoint_dir / "best.safetensors"))


def _restore_best(state: dict[str, Any], emulator, checkpoint_dir: Path) -> None:
    if state.get("best_step") is not None:
        _load_emulator_weights(emulator, load_file(str(checkpoint_dir / "best.safetensors")))
