"""Where each architecture keeps its transformer blocks, final norm and head.

All architecture knowledge lives in `ARCHITECTURES`, keyed by `config.model_type`.
Models not in the table are probed: the blocks are the largest `nn.ModuleList`
whose children all share one class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from offsite.errors import OffsiteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPaths:
    """Dotted attribute paths inside a `*ForCausalLM` model, or a classifier (`*ForImageClassification`,
    `*ForSequenceClassification`)."""

    layers: str
    final_norm: str | None
    head: str
    # A classifier's task head (its pooler, if any, and its classifier): trained by the data owner and
    # shipped in the adapter. Empty for language models, whose head stays the model owner's.
    task_head: tuple[str, ...] = ()


_LLAMA_LIKE = LayerPaths("model.layers", "model.norm", "lm_head")

ARCHITECTURES: dict[str, LayerPaths] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "phi": LayerPaths("model.layers", "model.final_layernorm", "lm_head"),
    "gpt2": LayerPaths("transformer.h", "transformer.ln_f", "lm_head"),
    "gptj": LayerPaths("transformer.h", "transformer.ln_f", "lm_head"),
    "bloom": LayerPaths("transformer.h", "transformer.ln_f", "lm_head"),
    "falcon": LayerPaths("transformer.h", "transformer.ln_f", "lm_head"),
    "opt": LayerPaths("model.decoder.layers", "model.decoder.final_layer_norm", "lm_head"),
    "gpt_neox": LayerPaths("gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head"),
    # Encoders that classify (offsite.kinds): images
    "vit": LayerPaths("vit.layers", "vit.layernorm", "classifier", ("classifier",)),
    "deit": LayerPaths("deit.layers", "deit.layernorm", "classifier", ("classifier",)),
    "dinov2": LayerPaths("dinov2.encoder.layer", "dinov2.layernorm", "classifier", ("classifier",)),
    "beit": LayerPaths("beit.layers", "beit.pooler.layernorm", "classifier", ("classifier",)),
    # image-text models' vision towers with a linear head (their block settings: `blocks_config`)
    "clip": LayerPaths("vision_model.encoder.layers", "vision_model.post_layernorm", "classifier", ("classifier",)),
    "siglip": LayerPaths("vision_model.encoder.layers", "vision_model.post_layernorm", "classifier", ("classifier",)),
    # and text (MiniLM checkpoints are BERT's type)
    "bert": LayerPaths("bert.encoder.layer", None, "classifier", ("bert.pooler", "classifier")),
    "roberta": LayerPaths("roberta.encoder.layer", None, "classifier", ("classifier",)),
}

# Image-text models whose classifier is their vision tower: the vision config describes the blocks.
NESTED_BLOCKS = {"clip": "vision_config", "siglip": "vision_config"}


def blocks_config(config):
    """The config that describes the blocks (`num_hidden_layers`, per-layer lists): the model's own, or
    the vision config of a CLIP or SigLIP classifier."""
    nested = NESTED_BLOCKS.get(getattr(config, "model_type", None))
    return getattr(config, nested) if nested else config


# Architectures whose blocks are not one uniform stack, so there is no middle to emulate.
NOT_A_BLOCK_STACK = {
    "swin": "Swin's stages merge patches between them, so its blocks change resolution and width along the stack",
    "swinv2": "Swin V2's stages merge patches between them, so its blocks change resolution and width",
    "convnext": "ConvNeXt is convolutional: its stages change resolution and width along the network",
    "convnextv2": "ConvNeXt V2 is convolutional: its stages change resolution and width along the network",
    "resnet": "ResNet is convolutional: its stages change resolution and width along the network",
}


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def check_block_stack(model_type: str | None) -> None:
    """Refuse, with the reason, an architecture whose blocks are not one uniform stack."""
    if model_type in NOT_A_BLOCK_STACK:
        raise OffsiteError(f"model type {model_type!r} cannot be offsite-tuned: {NOT_A_BLOCK_STACK[model_type]}; "
                           "offsite needs a stack of identical transformer blocks (e.g. ViT, DeiT, DINOv2, BEiT)")


def layer_paths(model: nn.Module) -> LayerPaths:
    """The paths for `model`, from the table or, for unknown types, by probing."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    check_block_stack(model_type)
    paths = probe(model)
    log.warning("model type %r is not in offsite's table; probed its blocks at '%s'", model_type, paths.layers)
    return paths


def probe(model: nn.Module) -> LayerPaths:
    """Find the block list of an unknown model: the largest ModuleList of same-class modules."""
    candidates = [
        (len(module), name)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1
        and len({type(child) for child in module}) == 1
    ]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not candidates or head is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise OffsiteError(
            f"model type {model_type!r} is not supported: no list of transformer blocks or output head found; "
            f"supported types: {', '.join(sorted(ARCHITECTURES))}"
        )
    _, layers = max(candidates)
    head_path = next(name for name, module in model.named_modules() if module is head)
    return LayerPaths(layers, _probe_final_norm(model, layers), head_path)


def _probe_final_norm(model: nn.Module, layers_path: str) -> str | None:
    """The last norm module outside the blocks, which is where decoders apply their final norm."""
    norms = [
        name for name, module in model.named_modules()
        if "norm" in type(module).__name__.lower() and not name.startswith(layers_path + ".")
    ]
    return norms[-1] if norms else None


def get_layers(model: nn.Module) -> nn.ModuleList:
    layers = model.get_submodule(layer_paths(model).layers)
    assert isinstance(layers, nn.ModuleList)
    return layers

