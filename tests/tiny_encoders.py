"""Tiny, randomly initialised classifiers (image and text encoders), built offline from configs.

Helper for tests (not a test module), the encoder counterpart of tiny_models.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BeitConfig,
    BertConfig,
    CLIPConfig,
    DeiTConfig,
    Dinov2Config,
    RobertaConfig,
    SiglipConfig,
    ViTConfig,
    ViTImageProcessor,
)

from tiny_models import VOCAB_SIZE, tiny_tokenizer

IMAGE_FAMILIES = ["vit", "deit", "beit", "dinov2", "clip", "siglip"]
TEXT_FAMILIES = ["bert", "roberta"]
ENCODER_FAMILIES = IMAGE_FAMILIES + TEXT_FAMILIES
NUM_LAYERS = 6
IMAGE_SIZE = 16
LABELS = ["cat", "dog", "fish"]

_COMMON = {"hidden_size": 32, "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 2, "intermediate_size": 48,
           "num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)),
           "label2id": {label: i for i, label in enumerate(LABELS)}}
_IMAGE = {"image_size": IMAGE_SIZE, "patch_size": 4, "num_channels": 3}
_LABELS = {key: _COMMON[key] for key in ("num_labels", "id2label", "label2id")}
_TOWER = {key: _COMMON[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
_CONFIGS = {
    "vit": lambda: ViTConfig(**_COMMON, **_IMAGE),
    "deit": lambda: DeiTConfig(**_COMMON, **_IMAGE, architectures=["DeiTForImageClassification"]),
    "beit": lambda: BeitConfig(**_COMMON, **_IMAGE),
    "dinov2": lambda: Dinov2Config(**_COMMON, **_IMAGE),
    # the image-text models' classifiers use only their vision tower (its settings in vision_config)
    "clip": lambda: CLIPConfig(vision_config={**_TOWER, **_IMAGE}, text_config=_TOWER, **_LABELS),
    "siglip": lambda: SiglipConfig(vision_config={**_TOWER, **_IMAGE}, text_config=_TOWER, **_LABELS),
    "bert": lambda: BertConfig(**_COMMON, vocab_size=VOCAB_SIZE, max_position_embeddings=128),
    "roberta": lambda: RobertaConfig(**_COMMON, vocab_size=VOCAB_SIZE, max_position_embeddings=130, pad_token_id=0),
}


def save_tiny_encoder(family: str, directory: Path, seed: int = 0) -> Path:
    """A tiny classifier of `family` with its tokenizer or image processor, saved as a model directory."""
    torch.manual_seed(seed)
    config = _CONFIGS[family]()
    auto = AutoModelForImageClassification if family in IMAGE_FAMILIES else AutoModelForSequenceClassification
    model = auto.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    if family in IMAGE_FAMILIES:
        ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    else:
        tiny_tokenizer().save_pretrained(directory)
    return directory


def encoder_inputs(family: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random inputs of the right shape for `family`'s forward."""
    generator = torch.Generator().manual_seed(seed)
    if family in IMAGE_FAMILIES:
        return {"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}
    ids = torch.randint(4, 400, (batch, 12), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
