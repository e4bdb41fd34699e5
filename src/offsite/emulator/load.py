"""A bundle's emulator brought back to life: compressed modules rebuilt, shared layers expanded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedModel

from offsite.arch import blocks_config
from offsite.emulator.compress import rebuild
from offsite.emulator.share import executed_positions, expand
from offsite.emulator.split import SplitPlan
from offsite.errors import OffsiteError
from offsite.files import one_line
from offsite.kinds import kind_of
from offsite.loading import load_model


def load_emulator(bundle: Path, info: dict[str, Any], plan: SplitPlan, in_memory: bool = False) -> PreTrainedModel:
    """A bundle's model as it runs: compressed modules rebuilt, shared layers expanded.

    `in_memory`: see offsite.loading.load_model (compressed bundles are always read into memory).
    """
    model = (_load_compressed(bundle, info["compression"]) if info.get("compression")
             else load_model(str(bundle), in_memory=in_memory))
    if blocks_config(model.config).num_hidden_layers != len(plan.kept):
        raise OffsiteError(f"bundle {bundle}: config.json has {blocks_config(model.config).num_hidden_layers} layers but "
                           f"its manifest lists {len(plan.kept)}")
    if info.get("share"):
        expand(model, executed_positions(plan, info))
    return model


def _load_compressed(bundle: Path, compression: dict[str, Any]) -> PreTrainedModel:
    """Build the architecture without weights, swap in the compressed modules, then load the stored tensors."""
    try:
        config = AutoConfig.from_pretrained(bundle, trust_remote_code=False)
        with init_empty_weights():
            model = kind_of(config, f"bundle {bundle}").auto_class.from_config(config, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - transformers parses what the other party wrote
        raise OffsiteError(f"bundle {bundle}: config.json does not describe a model ({one_line(str(error))[:300]})"
                           ) from None
    rebuild(model, compression)
    state = {}
    try:
        for path in sorted(bundle.glob("*.safetensors")):
            state.update(load_file(str(path)))
        result = model.load_state_dict(state, strict=False, assign=True)
    except (SafetensorError, RuntimeError) as error:  # truncated files, tensors of the wrong shape
        raise OffsiteError(f"bundle {bundle}: its weights do not fit its manifest ({one_line(str(error))[:300]})"
                           ) from None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or empty:
        raise OffsiteError(f"bundle {bundle} does not match its manifest's compression: "
                           f"unexpected tensors {result.unexpected_keys[:5]}, missing {empty[:5]}")
    model.eval()
    return model
