"""The analytic cost of one training token in each benchmark setting, from the model's layer shapes.

Costs are multiply-accumulates (MACs) per training token; only ratios are reported, so
the unit cancels. The formula (also in docs/performance.md):

    forward of block i   = W_i + A          W_i: weights of the block's matmuls (Linear/Conv1D)
                                             A = d_attn * (T + 1): QK^T and AV, averaged over causal positions
    block that trains    = 3 W_i + 3 A      forward, input gradient, weight gradient
    block gradients pass = 2 W_i + 3 A      frozen, but a trainable block lies below it
    ... checkpointed     = 3 W_i + 4 A      the same, with its forward run again in the backward pass
    block with LoRA      = 2 W_i + 3 A + 3 R_i    R_i = rank * sum of (in + out) over its matmuls
    block below every trainable block = W_i + A   (forward only, no graph)
    head                 = 2 V C * s / T    frozen head: forward and input gradient at s scored positions
                                             (s = T when logits are computed everywhere)
    top-only cached, E epochs: blocks below the adapter cost (W_i + A) / E, paid once in epoch 1

    flop_ratio_limit(setting) = cost(full_ft) / cost(setting)

Left out: embeddings (a lookup), norms, softmax and cross-entropy (O(V) per scored position,
not O(V C)), and the optimizer (O(parameters) per step, elementwise). These matter when a step
is memory-bound, which is one reason measured ratios fall short of the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from offsite.arch import get_layers

FORMULA = (
    "MACs per training token, blocks i: trains 3(W_i+A), passes gradients 2W_i+3A (checkpointed 3W_i+4A), "
    "LoRA 2W_i+3A+3R_i, "
    "forward only W_i+A (divided by the epochs E when cached); head 2VC*s/T; "
    "W_i = block matmul weights, A = d_attn*(T+1), R_i = rank*sum(in+out), s = scored positions per sequence; "
    "limit = cost(full_ft) / cost(setting)"
)


@dataclass(frozen=True)
class Shapes:
    """What the cost depends on, read off a model (a meta-device model is enough)."""

    block_weights: list[int]  # W_i
    block_lora_widths: list[int]  # sum of (in + out) over the block's matmuls; R_i = rank * this
    attention_width: int  # d_attn = heads * head_dim
    head_weights: int  # V * C

    @property
    def num_layers(self) -> int:
        return len(self.block_weights)


def _matmuls(block: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every Linear/Conv1D in a block."""
    shapes = []
    for module in block.modules():
        if isinstance(module, nn.Linear):
            shapes.append((module.in_features, module.out_features))
        elif isinstance(module, Conv1D):
            shapes.append(tuple(module.weight.shape))  # Conv1D stores (in, out)
    return shapes


def read_shapes(model: nn.Module) -> Shapes:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    blocks = [_matmuls(block) for block in get_layers(model)]
    head = model.get_output_embeddings().weight
    return Shapes(block_weights=[sum(i * o for i, o in block) for block in blocks],
                  block_lora_widths=[sum(i + o for i, o in block) for block in blocks],
                  attention_width=heads * head_dim, head_weights=head.shape[0] * head.shape[1])


@dataclass(frozen=True)
class Plan:
    """How a setting treats each block of the full model: which train, which run, and where logits are."""

    modes: list[str]  # per original block: "train", "lora", "pass", "recompute", "forward" or "skip" (dropped)
    scored_fraction: float  # s / T
    forward_share: float = 1.0  # 1/E for cached blocks, else 1


def token_cost(shapes: Shapes, plan: Plan, seq_len: int, lora_rank: int) -> float:
    attention = shapes.attention_width * (seq_len + 1)
    total = 2 * shapes.head_weights * plan.scored_fraction
    for mode, weights, width in zip(plan.modes, shapes.block_weights, shapes.block_lora_widths):
        total += {
            "train": 3 * (weights + attention),
            "lora": 2 * weights + 3 * attention + 3 * lora_rank * width,
            "pass": 2 * weights + 3 * attention,
            "recompute": 3 * weights + 4 * attention,
            "forward": (weights + attention) * plan.forward_share,
            "skip": 0.0,
        }[mode]
    return total


def plan_modes(num_layers: int, kept: tuple[int, ...], adapter: tuple[int, ...], lora: bool) -> list[str]:
    """Per original block: adapter blocks train; kept blocks pass gradients if an adapter block lies below."""
    lowest = min(adapter)
    modes = []
    for index in range(num_layers):
        if index in adapter:
            modes.append("lora" if lora else "train")
        elif index not in kept:
            modes.append("skip")
        else:
            modes.append("pass" if index > lowest else "forward")
    return modes
