"""Distillation: the model owner trains the emulator layers to stand in for the full middle block.

The full model runs without gradients, only as far as the end of its middle
block; the compressed model (same bottom adapter, so the same input to the
middle) is trained on the normalised MSE between its emulator output and the
full middle block's output, plus, when `lm_weight` > 0, its own
language-modelling loss. Only emulator layers train; adapter layers,
embeddings, norm and head keep their pretrained weights. Without the LM loss
the compressed model also stops at the end of its middle block, and the full
model's outputs are kept in memory when the corpus is seen more than once.
The checkpoint kept is the one whose emulator stands in best for the middle
block on held-out text (`select="standin"`), or the one with the lowest
held-out perplexity of the compressed model (`select="perplexity"`).
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
from offsite.data.classified import Classified, collate_classified, encoder_inputs, model_inputs
from offsite.data.read import read_data, read_text_corpus
from offsite.data.tokens import Sequence, collate, lm_sequences
from offsite.data.types import Data, TextData, truncate_text
from offsite.device import CPU, Placement, place_model
from offsite.emulator.hidden import hidden_states_at
from offsite.emulator.split import SplitPlan
from offsite.errors import OffsiteError
from offsite.kinds import kind_of
from offsite.loading import pad_id
from offsite.numerics import check_step
from offsite.parallel import ONE, Processes, held_bytes, shard_frozen
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


def kd_loss(student_hidden: dict[int, torch.Tensor], full_hidden: dict[int, torch.Tensor],
            pairs: list[tuple[int, int]], mask: torch.Tensor, normalise: str = "global") -> torch.Tensor:
    """Mean over `pairs` of the emulator's squared error relative to the full model's, over unpadded positions.

    `normalise="token"`: each token's squared error over its own squared norm, averaged over tokens, so
    every token counts the same. `"global"`: the MSE over the mean square of all targets (the paper's),
    which a few tokens with very large activations (e.g. the first) dominate.
    """
    keep = mask.bool() if mask is not None else None  # no mask (images): every position counts
    losses = []
    for s, f in pairs:
        target = (full_hidden[f][keep] if keep is not None else full_hidden[f].flatten(0, -2)).float()  # (tokens, hidden)
        found = student_hidden[s][keep] if keep is not None else student_hidden[s].flatten(0, -2)
        error = (found.float() - target).pow(2)
        if normalise == "token":
            losses.append((error.sum(-1) / target.pow(2).sum(-1).clamp_min(1e-8)).mean())
        else:
            losses.append(error.mean() / target.pow(2).mean().clamp_min(1e-8))
    return torch.stack(losses).mean()


class TeacherOutputs:
    """The full model's hidden states at the alignment targets, per training window.

    Kept (in bfloat16) when the run sees a window more than once and they fit in
    `TEACHER_CACHE_BYTES`; otherwise recomputed, so memory stays bounded.
    """

    def __init__(self, full: PreTrainedModel, wanted: set[int], keep: bool, logits: bool = False):
        self.full, self.wanted, self.keep, self.logits = full, wanted, keep and not logits, logits
        self.stored: dict[int, dict[int, torch.Tensor]] = {}

    def batch(self, indices: list[int], inputs: dict[str, torch.Tensor],
              placement: Placement = CPU) -> dict[int | str, torch.Tensor]:
        """Hidden states by index, and with `logits` the full model's logits under "logits" (never kept)."""
        if self.keep and all(i in self.stored for i in indices):
            return {k: _pad_stack([self.stored[i][k] for i in indices], [len(self.stored[i][k]) for i in indices])
                    for k in self.wanted}
        with torch.no_grad(), placement.autocast():
            found, output = hidden_states_at(self.full, inputs, self.wanted, stop=not self.logits)
        if self.logits:
            return {**found, "logits": output.logits}
        if self.keep:  # the first pass returns the stored precision too, so every epoch sees the same targets
            found = {k: v.to(torch.bfloat16).float() for k, v in found.items()}
            for row, i in enumerate(indices):
                n = int(inputs["attention_mask"][row].sum()) if "attention_mask" in inputs else _width(found)
                self.stored[i] = {k: v[row, :n].to(torch.bfloat16) for k, v in found.items()}
        return found


def _width(found: dict[int, torch.Tensor]) -> int:
    """The positions of unmasked inputs (images: every patch)."""
    return next(iter(found.values())).shape[1]


def _pad_stack(rows: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    width = max(lengths)
    out = torch.zeros((len(rows), width, rows[0].shape[-1]), dtype=torch.float32, device=rows[0].device)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row.float()
    return out


TEACHER_CACHE_BYTES = 3 * 2**30


def keeps_teacher(settings: DistillConfig, windows: int, targets: int, hidden: int) -> bool:
    """Keep the full model's outputs when a window comes back and they fit in `TEACHER_CACHE_BYTES`."""
    seen_again = settings.steps * settings.batch_size > windows
    return seen_again and windows * targets * settings.seq_len * hidden * 2 <= TEACHER_CACHE_BYTES


def read_heldout(settings: DistillConfig, classifier: bool = False) -> Data | None:
    """The text (or images) that picks the best checkpoint: `--distill-heldout`, else a built-in corpus's
    validation split."""
    if settings.heldout is not None:
        if classifier:
            return read_data(settings.heldout, "--distill-heldout", default_split="validation")
        return read_text_corpus(settings.heldout, "--distill-heldout", "the held-out check",
                                default_split="validation")
    if is_builtin(settings.corpus) and ":" not in settings.corpus:
        if classifier:
            return read_data(settings.corpus, "--distill", default_split="validation")
        return read_text_corpus(settings.corpus, "--distill", "distillation", default_split="validation")
    return None


def read_corpus(settings: DistillConfig, classifier: bool = False) -> Data:
    """The distillation corpus: text for a language model; texts or images (labels unused) for a classifier."""
    if classifier:
        return read_data(settings.corpus, "--distill")
    return read_text_corpus(settings.corpus, "--distill", "distillation")


def distill_windows(data: Data, tokenizer, seq_len: int, classifier: bool) -> list[Sequence] | list[Classified]:
    """What the models run on: token windows for a language model, each text or image for a classifier."""
    return encoder_inputs(data, tokenizer, seq_len) if classifier else lm_sequences(tokenizer, data.texts, seq_len)


def _collate(items: list[Sequence] | list[Classified], pad_id: int) -> dict[str, torch.Tensor]:
    return collate_classified(items, pad_id) if isinstance(items[0], Classified) else collate(items, pad_id)


def distill(full: PreTrainedModel, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: SplitPlan,
            settings: DistillConfig, corpus: TextData, checkpoint_dir: Path,
            identity: dict[str, Any] | None = None, placement: Placement = CPU,
            processes: Processes = ONE, shard_full: bool = False) -> dict[str, Any]:
    """Train `student`'s emulator layers in place; return a summary for the manifest.

    `placement`: where both models run and the forward's dtype. The full model, frozen and used
    only as the target, is moved there and held in that dtype (it is the caller's to drop
    afterwards); the student stays float32, since its frozen layers ship in the bundle as they
    are, and comes back to the CPU at the end.

    `checkpoint_dir` holds the run's state every `eval_every` steps (safetensors and
    JSON), so a rerun after an interruption resumes from there, but only a run of the same
    `identity` (the full model's fingerprint, the split and the method: see `emulator.build`).

    `processes`: data-parallel processes (see offsite.parallel): each step's global batch is
    `batch_size` windows per process, each process's gradients are averaged with the others', and the
    held-out checks, the best checkpoint and the checkpoints to resume from are the main process's.
    `shard_full`: each process holds 1/N of the full model's blocks (`parallel.shard_frozen`); its
    outputs are then never kept, since every process must run it at every step.
    """
    classifier = kind_of(full.config).classifies
    heldout = read_heldout(settings, classifier)
    sequences = distill_windows(corpus, tokenizer, settings.seq_len, classifier)
    if not sequences:
        raise OffsiteError(f"--distill {settings.corpus} gives no training window; it needs more text")
    heldout_data = (truncate_text(heldout, settings.eval_windows, settings.seq_len)
                    if isinstance(heldout, TextData) else heldout)
    emulator = _distinct([get_layers(student)[len(plan.bottom) + i] for i in range(len(plan.emulator))])
    if shard_full:
        shard_frozen(full, placement, processes)
    else:
        place_model(full, placement)
    student.to(placement.device)
    student.requires_grad_(False)
    for layer in emulator:
        layer.requires_grad_(True)
    params = [p for layer in emulator for p in layer.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    state = _resume(checkpoint_dir, emulator, optimizer, settings, identity or {})
    pairs = alignment_targets(plan, settings.align)
    teacher = TeacherOutputs(full, {f for _, f in pairs}, not shard_full and keeps_teacher(
        settings, len(sequences), len(pairs), full.config.hidden_size), logits=settings.kl_weight > 0)
    judge = _Judge(full, student, tokenizer, heldout_data, pairs[-1:], settings, placement)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(sequences), generator=generator).tolist()
    full.eval()
    history = state.setdefault("history", [])
    start, step_seconds, steps_run = time.perf_counter(), 0.0, 0
    judge.active = judge.active and processes.main
    width = settings.batch_size * processes.count  # the global batch
    if judge.active and "before" not in state:
        state["heldout"] = [{"step": 0, **judge.scores()}]
        state["before"] = state["heldout"][0][judge.what]
    with tqdm(total=settings.steps, initial=state["step"], desc="distill", unit="step",
              disable=not processes.main) as bar:
        while state["step"] < settings.steps:
            step = state["step"]
            picks = processes.rows([order[(step * width + i) % len(order)] for i in range(width)])
            step_start = time.perf_counter()
            kd, lm, kl = _step(teacher, student, picks, [sequences[i] for i in picks], pad_id(tokenizer), pairs,
                           settings, optimizer, step + 1, placement, processes)
            step_seconds, steps_run = step_seconds + time.perf_counter() - step_start, steps_run + 1
            state["step"] = step + 1
            history.append({"step": step + 1, "kd": kd, "lm": lm, "kl": kl})
            bar.update()
            bar.set_postfix(kd=f"{kd:.4f}", lm=f"{lm:.3f}")
            if judge.active and (state["step"] % settings.eval_every == 0 or state["step"] == settings.steps):
                state["heldout"].append({"step": state["step"], **judge.scores()})
                _offer(state, state["heldout"][-1][judge.what], emulator, checkpoint_dir, judge.what)
            if state["step"] % settings.eval_every == 0 and processes.main:
                _save(checkpoint_dir, emulator, optimizer, state)
    if processes.main:
        _restore_best(state, emulator, checkpoint_dir)
    student.requires_grad_(False)
    student.to("cpu")
    tokens = steps_run * width * settings.seq_len
    return {
        "corpus": settings.corpus, "corpus_sha256": corpus.sha256(),
        "heldout_sha256": heldout.sha256() if heldout else None,
        "settings": settings.to_dict(), "steps": state["step"], "seconds": time.perf_counter() - start,
        "tokens_per_second": tokens / step_seconds if step_seconds else None,
        "teacher_outputs_kept": teacher.keep,
        "full_model_sharded": shard_full, "full_model_bytes_per_process": held_bytes(full),
        "final_kd": history[-1]["kd"] if history else None, "final_lm": history[-1]["lm"] if history else None,
        "final_kl": history[-1].get("kl") if history else None,
        "selected_by": judge.what, f"heldout_{judge.what}_before": state.get("before"),
        f"heldout_{judge.what}_best": state.get("best"), "best_step": state.get("best_step"),
        "heldout": state.get("heldout", []),  # both scores at every check: what the other choice would keep
    }


class _Judge:
    """Scores the student on held-out text: its stand-in error for the middle block and its perplexity.

    Both are measured at every check (so a run shows which step each choice would keep); the
    checkpoint is chosen by `settings.select`.
    """

    def __init__(self, full, student, tokenizer, heldout: TextData | None, pairs, settings: DistillConfig,
                 placement: Placement = CPU):
        self.student, self.tokenizer, self.heldout, self.pairs = student, tokenizer, heldout, pairs
        self.placement = placement
        self.what = "standin_error" if settings.select == "standin" else "perplexity"
        self.active = heldout is not None
        self.normalise = settings.kd_normalise
        self.batches: list[tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]] = []
        self.classifier = kind_of(full.config).classifies  # no next-token perplexity to score
        if self.active:
            windows = distill_windows(heldout, tokenizer, settings.seq_len, self.classifier)[: settings.eval_windows]
            for i in range(0, len(windows), EVAL_BATCH):
                inputs = model_inputs(placement.batch(_collate(windows[i: i + EVAL_BATCH], pad_id(tokenizer))))
                with torch.no_grad(), placement.autocast():  # the full model's side never changes: computed once
                    self.batches.append((inputs, hidden_states_at(full, inputs, {f for _, f in pairs})[0]))

    def scores(self) -> dict[str, float]:
        self.student.eval()
        errors = []
        with torch.no_grad(), self.placement.autocast():
            for inputs, target in self.batches:
                found, _ = hidden_states_at(self.student, inputs, {s for s, _ in self.pairs})
                errors.append(kd_loss(found, target, self.pairs, inputs.get("attention_mask"), self.normalise).item())
            ppl = None if self.classifier else perplexity(self.student, self.tokenizer, self.heldout, 256, 8)["perplexity"]
        return {"standin_error": sum(errors) / len(errors), "perplexity": ppl}


EVAL_BATCH = 8


def _distinct(layers: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Layers with distinct weights: with layer sharing one stored layer runs at several positions."""
    found: dict[int, torch.nn.Module] = {}
    for layer in layers:
        found.setdefault(id(next(layer.parameters())), layer)
    return list(found.values())


def _step(teacher: TeacherOutputs, student, indices: list[int], batch_sequences: list[Sequence], pad_id: int,
          pairs, settings: DistillConfig, optimizer, step: int, placement: Placement = CPU,
          processes: Processes = ONE) -> tuple[float, float, float]:
    batch = placement.batch(_collate(batch_sequences, pad_id))
    inputs = model_inputs(batch)
    full_out = teacher.batch(indices, inputs, placement)
    student.train()
    wanted = {s for s, _ in pairs}
    zero = torch.zeros((), device=placement.device)
    with placement.autocast():  # the forward in the compute dtype; the losses below are float32
        if settings.lm_weight > 0 or settings.kl_weight > 0:
            hidden, out = hidden_states_at(student, inputs, wanted, stop=False)
            lm = (F.cross_entropy(out.logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
                  if settings.lm_weight > 0 else zero)
            kl = output_kl(out.logits, full_out["logits"], batch["attention_mask"]) if settings.kl_weight > 0 else zero
        else:  # only the emulator's output is trained: nothing above it needs to run
            hidden, _ = hidden_states_at(student, inputs, wanted)
            lm = kl = zero
        kd = kd_loss(hidden, full_out, pairs, batch.get("attention_mask"), settings.kd_normalise)
    loss = settings.kd_weight * kd + settings.lm_weight * lm + settings.kl_weight * kl
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    processes.mean_gradients(params)
    losses = processes.sum(torch.stack([loss, kd, lm, kl]).detach().float()) / processes.count
    check_step(losses[0], params, step, "distillation", "lower --distill-lr, or check the corpus and the full model")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses[1].item(), losses[2].item(), losses[3].item()


def output_kl(student_logits: torch.Tensor, full_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(full model's next-token distribution || compressed model's), averaged over unpadded positions."""
    keep = mask.bool()
    full_log = F.log_softmax(full_logits[keep].float(), dim=-1)
    student_log = F.log_softmax(student_logits[keep].float(), dim=-1)
    return F.kl_div(student_log, full_log, log_target=True, reduction="batchmean")


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


def _offer(state: dict[str, Any], value: float, emulator, checkpoint_dir: Path, what: str) -> None:
    """Keep the emulator with the best held-out score (lower is better for both kinds)."""
    log.info("distill step %d: held-out %s %.4g", state["step"], what.replace("_", " "), value)
    if state.get("best") is None or value < state["best"]:
        state["best"], state["best_step"] = value, state["step"]
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        save_file(_emulator_weights(emulator), str(checkpoint_dir / "best.safetensors"))


def _restore_best(state: dict[str, Any], emulator, checkpoint_dir: Path) -> None:
    if state.get("best_step") is not None:
        _load_emulator_weights(emulator, load_file(str(checkpoint_dir / "best.safetensors")))
