"""Hidden states at chosen depths, computing no more of the model than they need.

Distillation compares the full model and the emulator at the end of the middle
block; everything above it (the top blocks, the final norm and the head: a
large share of a small model's work) would be computed and thrown away. Forward
hooks on the blocks record their outputs, and the hook of the deepest block
wanted stops the forward pass there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from offsite.arch import get_layers


class _Enough(Exception):
    """Raised by the deepest hook: the rest of the forward pass is not needed."""


def hidden_states_at(model: nn.Module, inputs: dict[str, torch.Tensor], wanted: set[int],
                     stop: bool = True) -> tuple[dict[int, torch.Tensor], Any]:
    """({k: hidden state k} for k in `wanted`, the model's output or None when stopped early).

    Hidden state k is the output of block k-1, as in `output_hidden_states` (k >= 1).
    With `stop=False` the model runs to the end (its output is returned, e.g. for a
    language-modelling loss) and the states are recorded on the way.
    """
    layers = get_layers(model)
    found: dict[int, torch.Tensor] = {}
    deepest = max(wanted)
    handles = []
    for k in sorted(wanted):
        block = layers[k - 1]

        def record(module: nn.Module, args: Any, output: Any, k: int = k, block: nn.Module = block) -> None:
            # Shared layers are shallow copies that share one hook table: only this position counts.
            if module is not block:
                return
            found[k] = output[0] if isinstance(output, tuple) else output
            if stop and k == deepest:
                raise _Enough

        handles.append(block.register_forward_hook(record))
    output = None
    try:
        output = model(**inputs, use_cache=False)  # no KV cache: nothing reads it
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise RuntimeError(f"hidden states {missing} were not produced: the blocks did not run")
    return found, output
