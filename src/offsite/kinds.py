"""What a model does, and so which Auto class loads it and what the data owner trains.

offsite began with causal language models. Encoders that classify (ViT, DeiT, BEiT, DINOv2 for
images; BERT, RoBERTa, MiniLM for text) are the other kind: their data owner also trains the
classification head, which travels in the adapter file. A checkpoint's config names its class
(`architectures`, written by `save_pretrained`), and the class's suffix says the kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from offsite.errors import OffsiteError


@dataclass(frozen=True)
class Kind:
    name: str
    auto_class: type  # the transformers Auto class that loads a checkpoint of this kind
    suffix: str  # of the model class names of this kind (config.architectures)
    classifies: bool  # a head of labels, trained by the data owner and shipped in its adapter

    def model_class(self, config: PretrainedConfig) -> type:
        """The concrete model class of `config` for this kind (e.g. ViTForImageClassification)."""
        found = self.auto_class._model_mapping[type(config)]
        if isinstance(found, (list, tuple)):  # e.g. DeiT: with and without a distillation token
            names = list(getattr(config, "architectures", None) or [])
            found = next((cls for cls in found if cls.__name__ in names), found[0])
        return found


CAUSAL_LM = Kind("causal-lm", AutoModelForCausalLM, "ForCausalLM", classifies=False)
IMAGE_CLASSIFICATION = Kind("image-classification", AutoModelForImageClassification, "ForImageClassification",
                            classifies=True)
TEXT_CLASSIFICATION = Kind("text-classification", AutoModelForSequenceClassification, "ForSequenceClassification",
                           classifies=True)
KINDS = (CAUSAL_LM, IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION)

def kind_of(config: PretrainedConfig, source: str = "MODEL") -> Kind:
    """The kind named by `config.architectures`: a classifier by its class's suffix; a bare encoder (its
    base class, e.g. ViTModel) is refused; anything else is a causal LM, as offsite has always loaded it
    (e.g. GPT2LMHeadModel, or a config that names no class)."""
    names = list(getattr(config, "architectures", None) or [])
    for kind in (IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION):
        if any(name.endswith(kind.suffix) for name in names):
            return kind
    if names and set(names) <= _base_classes(config):
        raise OffsiteError(f"{source} is a {names[0]} without a task head; offsite tunes causal language models "
                           "and classifiers: save it with its head first, e.g. "
                           "`AutoModelForImageClassification.from_pretrained(dir, num_labels=N).save_pretrained(out)` "
                           "(or AutoModelForSequenceClassification for text)")
    return CAUSAL_LM


def _base_classes(config: PretrainedConfig) -> set[str]:
    """The names of the head-less model classes of `config`'s type (e.g. {"ViTModel"})."""
    try:
        found = MODEL_MAPPING[type(config)]
    except KeyError:
        return set()
    return {cls.__name__ for cls in (found if isinstance(found, (list, tuple)) else [found])}
