"""The lm-eval model type `offsite`: lm-eval's requests scored through offsite's own loading and scoring.

`lm_eval ... --model offsite --model_args pretrained=PATH[,adapter=A][,bundle=B][,device=D][,dtype=T]` scores a
full model, a bundle (its emulator), a bundle or full model with an adapter applied in memory, or a plugged
model, loaded by `offsite.api.load_for_eval` (bundle checks, fingerprint, issued layers, compressed emulators).

Scoring conventions, the same as `offsite eval` (docs/lm-eval.md lists where they differ from lm-eval's `hf`):
- `loglikelihood`: context and continuation split as `offsite.data.tokens.encode_pair` splits them (lm-eval's
  rule); an empty context starts from the end-of-text token, as lm-eval's.
- `loglikelihood_rolling`: offsite's perplexity windows (`lm_sequences`): the document's tokens and an
  end-of-text token, in windows of `max_length` predictions; every token after the first is scored once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from offsite.api import load_for_eval
from offsite.config import DeviceConfig, EvalConfig
from offsite.data.tokens import Sequence, choice_sequence, collate, lm_sequences, sequence_totals
from offsite.device import Placement, place_model
from offsite.errors import OffsiteError
from offsite.loading import is_classifier, pad_id
from offsite.scoring import batches

log = logging.getLogger(__name__)

MODEL_TYPE = "offsite"
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # lm-eval's EvaluatorConfig.device


@register_model(MODEL_TYPE)
class OffsiteLM(LM):
    """A model, bundle or plugged model (optionally with an adapter file) as lm-eval sees it."""

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, bundle: str | None = None,
                 device: str | None = None, dtype: str = "auto", batch_size: int | str | None = 8,
                 max_length: int = EvalConfig.seq_len, model=None, tokenizer=None, **ignored: Any) -> None:
        super().__init__()
        if ignored:
            log.debug("lm-eval model arguments offsite does not use: %s", sorted(ignored))
        if model is None:
            if not pretrained:
                raise OffsiteError("--model_args: pretrained=PATH is required (a full model, bundle or plugged model)")
            if is_classifier(pretrained):
                raise OffsiteError(f"pretrained={pretrained} is a classifier; lm-eval scores language models")
            model, tokenizer = load_for_eval(str(pretrained), adapter and str(adapter), bundle and str(bundle))
            if device == LM_EVAL_DEFAULT_DEVICE and not torch.cuda.is_available():
                # lm-eval's command line passes its default device even when no --device was given
                log.warning("lm-eval asks for %s (its default), which this machine lacks; running on the device "
                            "offsite picks (--device cpu says so explicitly)", device)
                device = None
            runtime = DeviceConfig(device=device or "auto", dtype=dtype)
            self.placement = Placement.of(runtime.device, runtime.dtype)
            place_model(model, self.placement)
        else:  # an in-memory model (the demo's stages): already placed where it runs
            self.placement = Placement(next(model.parameters()).device, next(model.parameters()).dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length)

    @classmethod
    def of(cls, model, tokenizer, max_length: int = EvalConfig.seq_len, batch_size: int = 8) -> "OffsiteLM":
        return cls(model=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)

    # --- lm-eval's three request types -------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation after the context, whether greedy decoding gives it)."""
        sequences = [self.pair_sequence(*request.args[:2]) for request in requests]
        return self.score(sequences, "lm-eval loglikelihood", disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's summed log-likelihood in offsite's perplexity windows."""
        found = []
        for request in tqdm(requests, desc="lm-eval rolling", disable=disable_tqdm, leave=False, unit="doc"):
            windows = lm_sequences(self.tokenizer, [request.args[0]], self.max_length)
            found.append(sum(total for total, _ in self.score(windows, "", True)) if windows else 0.0)
        return found

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation until a stop string or `max_gen_toks` tokens (lm-eval's default 256)."""
        found = []
        for request in tqdm(requests, desc="lm-eval generate", disable=disable_tqdm, leave=False, unit="request"):
            context, settings = request.args[0], dict(request.args[1] or {})
            until = settings.pop("until", None) or [self.tokenizer.decode([self.tokenizer.eos_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(settings.pop("max_gen_toks", 256))
            ids = self.tokenizer(context)["input_ids"][-max(1, self.max_length - new_tokens):]
            inputs = torch.tensor([ids], device=self.model.device)
            with self.placement.autocast():
                output = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                                             do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                             stop_strings=until, tokenizer=self.tokenizer)
            text = self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
            for stop in until:  # the stop string itself is not part of the answer (lm-eval's convention)
                text = text.split(stop)[0]
            found.append(text)
        return found

    # --- scoring -----------------------------------------------------------------------------------

    def pair_sequence(self, context: str, continuation: str) -> Sequence:
        """Context + continuation with only the continuation scored, cut from the left to `max_length` inputs,
        as `offsite eval` scores a choice; an empty context becomes the end-of-text token (lm-eval's rule)."""
        if context:
            return choice_sequence(self.tokenizer, context, continuation, self.max_length)
        ids = ([self.tokenizer.eos_token_id] + self.tokenizer(continuation)["input_ids"])[-(self.max_length + 1):]
        return Sequence(ids[:-1], ids[1:])

    @torch.no_grad()
    def score(self, sequences: list[Sequence], desc: str, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(summed log-probability of the scored tokens, whether each is the argmax) per sequence, in order."""
        found: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
        chunks = batches([len(s.input_ids) for s in sequences], self.batch_size)
        for chunk in tqdm(chunks, desc=desc, disable=disable_tqdm or not desc, leave=False, unit="batch"):
            batch = {k: v.to(self.model.device)
                     for k, v in collate([sequences[i] for i in chunk], pad_id(self.tokenizer)).items()}
            with self.placement.autocast():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            totals, greedy = sequence_totals(logits, batch["labels"])
            for row, index in enumerate(chunk):
                found[index] = (float(totals[row]), bool(greedy[row]))
        return found
