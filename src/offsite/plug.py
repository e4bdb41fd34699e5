"""Model owner: put a returned adapter into the full model."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedModel

from offsite.adapter import Adapter, apply, load_adapter
from offsite.bundle import MANIFEST, model_fingerprint
from offsite.config import PlugConfig
from offsite.errors import OffsiteError
from offsite.files import atomic_dir, check_output_dir
from offsite.loading import load_model, load_tokenizer

log = logging.getLogger(__name__)


def plug_into(model: PreTrainedModel, adapter: Adapter, source: str | Path) -> None:
    """Replace the full model's adapter layers in place, after checking the adapter was made for it."""
    num_layers = model.config.num_hidden_layers
    if any(index >= num_layers for index in adapter.layers):
        raise OffsiteError(f"adapter {source} has layers {adapter.layers} but the model has only {num_layers} layers")
    actual = model_fingerprint(model, adapter.layers)
    if actual != adapter.fingerprint:
        raise OffsiteError(
            f"adapter {source} was made for another base model: its fingerprint is {adapter.fingerprint[:16]}…, "
            f"this model's is {actual[:16]}…; plug it into the model its bundle was made from "
            f"({adapter.base_model.get('name_or_path', 'unknown')})"
        )
    apply(model, adapter, {index: index for index in adapter.layers}, source)


def plug(config: PlugConfig) -> Path:
    """Write the plugged model (full model + adapter) as a standard Hugging Face model directory."""
    check_output_dir(config.output, config.overwrite, inputs=(config.model, config.adapter))
    if (Path(config.model) / MANIFEST).is_file():
        raise OffsiteError(f"MODEL {config.model} is a bundle; plug into the full model the bundle was made from")
    adapter = load_adapter(config.adapter)
    model = load_model(config.model)
    plug_into(model, adapter, config.adapter)
    log.info("plugged adapter layers %s into %s", adapter.layers, config.model)
    with atomic_dir(config.output, config.overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(config.model).save_pretrained(tmp)
    return Path(config.output)
