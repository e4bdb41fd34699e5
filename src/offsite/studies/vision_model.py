"""The built-in vision model: a small ViT that offsite pretrains itself, once, on Fashion-MNIST.

No pretrained vision transformer can be downloaded here, so `offsite setup-assets --vision` trains one
from scratch on the `fashion-pretrain` images (classes 0-4) and caches it like the built-in language
model (`vit-fashion`, under the cache's `models/`). The transfer task, `fashion-transfer`, classifies
the five classes it never saw. Its pretraining time and test accuracy are written beside the weights
(`pretraining.json`) and printed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, get_cosine_schedule_with_warmup

from offsite.assets import VISION_ALIAS, check_cache, vision_model_dir, write_marker
from offsite.data.builtin import load_builtin
from offsite.data.classified import classifier_items, collate_classified
from offsite.files import atomic_dir
from offsite.scoring import classify_accuracy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisionPretraining:
    """The built-in ViT and how it is pretrained (12 blocks, as the issue asks; ViT-Tiny's width)."""

    num_layers: int = 12
    hidden_size: int = 192
    heads: int = 3
    patch_size: int = 4  # 28x28 images: 49 patches and the class token
    epochs: float = 2.0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    train_images: int | None = None  # all 29,000 of fashion-pretrain:train (tests use a few)
    seed: int = 0


def processor() -> ViTImageProcessor:
    """28x28 grey images as 3-channel pixel values in [-1, 1]; no resizing."""
    return ViTImageProcessor(do_resize=False, size={"height": 28, "width": 28}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)


def pretrain(settings: VisionPretraining = VisionPretraining(), output: Path | None = None) -> Path:
    """Pretrain the ViT on `fashion-pretrain` and cache it (or write it to `output`); return its directory."""
    output = output or vision_model_dir()
    torch.manual_seed(settings.seed)
    train, test = load_builtin("fashion-pretrain", "train"), load_builtin("fashion-pretrain:test", "test")
    if settings.train_images is not None:
        train = type(train)(train.examples[: settings.train_images], train.labels, train.modality, train.source)
    config = ViTConfig(image_size=28, patch_size=settings.patch_size, num_channels=3, hidden_size=settings.hidden_size,
                       num_hidden_layers=settings.num_layers, num_attention_heads=settings.heads,
                       intermediate_size=4 * settings.hidden_size, num_labels=len(train.labels),
                       id2label=dict(enumerate(train.labels)), label2id={n: i for i, n in enumerate(train.labels)})
    model = ViTForImageClassification(config)
    prep = processor()
    items = classifier_items(train, prep, 0, train.labels)
    steps = max(1, int(settings.epochs * len(items) / settings.batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    generator = torch.Generator().manual_seed(settings.seed)
    start, order, position = time.perf_counter(), [], 0
    model.train()
    for _ in tqdm(range(steps), desc="pretrain vit", unit="step"):
        if position + settings.batch_size > len(order):
            order, position = torch.randperm(len(items), generator=generator).tolist(), 0
        batch = collate_classified([items[i] for i in order[position: position + settings.batch_size]], 0)
        position += settings.batch_size
        loss = F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = classify_accuracy(model, prep, test, 0, 256)["accuracy"]
    record: dict[str, Any] = {"settings": asdict(settings), "steps": steps, "train_images": len(items),
                              "seconds": seconds, "test_accuracy": accuracy, "test_images": len(test.examples),
                              "threads": torch.get_num_threads()}
    with atomic_dir(output, overwrite=True, markers=None) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        prep.save_pretrained(tmp)
        (tmp / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
        write_marker(tmp, {"alias": VISION_ALIAS, "pretrained_on": "fashion-pretrain:train", **record})
    log.info("pretrained %s in %.1f min: %.1f%% on the %d test images of its 5 classes", VISION_ALIAS,
             seconds / 60, 100 * accuracy, len(test.examples))
    return output


def ensure_vision_model() -> Path:
    """The cached built-in vision model, pretrained first if it is not there (or is damaged)."""
    entry = vision_model_dir()
    if entry.exists() and not check_cache(entry):
        return entry
    log.info("pretraining the built-in vision model %s (once: a ViT trained from scratch)", VISION_ALIAS)
    return pretrain()
