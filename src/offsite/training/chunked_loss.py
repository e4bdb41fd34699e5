"""Cross-entropy through a frozen head, a chunk of positions at a time: the (N, V) logits never exist at once.

With a loss on every token (language modelling) the head's logits are the largest tensors
of an offsite step: 8 x 160 positions x 49,152 vocabulary x 4 bytes = 250 MB on the
built-in model, and autograd keeps about three such tensors (logits, log-softmax, their
gradient). The head is frozen, so the only gradient it passes on is the one for its input,
(softmax - onehot) @ W. `ChunkedHeadLoss` computes it chunk by chunk during the forward
pass and hands it back in the backward pass: the same multiply-accumulates as the plain
loss, and one chunk of logits in memory instead of N.

It needs the model's logits to be exactly `head(last hidden state)`. Some families change
them afterwards (soft-capping, scaling), so `plain_head` checks this once per model on a
few tokens and the plain loss is used otherwise.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# Above this many logits (positions x vocabulary, 64 MB in float32) the loss is chunked.
CHUNK_LOGITS = 2**24
CHUNK_POSITIONS = 256

_plain_head: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T (+ bias)` against `labels`; the gradient flows to `hidden` only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
        count = labels.numel()
        total = torch.zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden)
        weight_float = weight.float()  # once, not per chunk: a copy for half-precision heads
        for start in range(0, count, CHUNK_POSITIONS):
            rows = slice(start, start + CHUNK_POSITIONS)
            logits = (hidden[rows] @ weight.T).float()
            if bias is not None:
                logits += bias
            targets = labels[rows]
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, targets[:, None]).squeeze(1)).sum()
            probs = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(len(targets)), targets] -= 1
            grad[rows] = (probs @ weight_float).to(hidden.dtype) / count
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers included)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_head(model: nn.Module) -> bool:
    """Whether the model's logits are exactly its output embedding applied to its body's last hidden state.

    Checked once per model on four tokens (in eval mode, so dropout cannot differ); a frozen
    head is also required. The check runs the real blocks: call it before swapping any out.
    """
    model = _unwrapped(model)
    if model in _plain_head:
        return _plain_head[model]
    head = model.get_output_embeddings()
    plain = isinstance(head, nn.Linear) and not any(p.requires_grad for p in head.parameters())
    if plain:
        ids = torch.arange(4)[None] % model.config.vocab_size
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                plain = torch.allclose(head(hidden), model(input_ids=ids, use_cache=False).logits, atol=1e-5)
        finally:
            model.train(was_training)
    _plain_head[model] = plain
    return plain


def chunked_loss(model: nn.Module, batch: dict[str, torch.Tensor], scored: torch.Tensor) -> torch.Tensor:
    """The mean loss at the `scored` positions (B, T mask), through the body once and the head in chunks."""
    causal = _unwrapped(model)
    hidden = causal.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).last_hidden_state
    head = causal.get_output_embeddings()
    return ChunkedHeadLoss.apply(hidden[scored], head.weight, head.bias, batch["labels"][scored])
