"""Loading full models and tokenizers by local path or hub id, with errors a user can act on.

Every file may come from the other party, so loading never runs code shipped with a model
(`trust_remote_code=False` on every call, and a model that asks for its own code is refused
outright) and never unpickles weights (safetensors only, local or from a hub).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    BaseImageProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from offsite.arch import check_block_stack
from offsite.assets import resolve_model
from offsite.constants import ADAPTER_METADATA, MODEL_CONFIG, TOKENIZER_CONFIG
from offsite.errors import OffsiteError
from offsite.files import one_line, read_json
from offsite.kinds import IMAGE_CLASSIFICATION, kind_of

log = logging.getLogger(__name__)


def resolve(name_or_path: str) -> str:
    """A local directory for a built-in alias (built on first use), else the argument unchanged."""
    return resolve_model(name_or_path)


def load_config(name_or_path: str) -> PretrainedConfig:
    """A model's config alone (no weights), e.g. to count its layers before any work starts."""
    source = resolve(name_or_path)
    _check_local(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except OffsiteError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers parses what the other party wrote; any failure is theirs
        raise OffsiteError(f"could not read the config of MODEL '{name_or_path}': {one_line(_first_line(error))}"
                           ) from None
    check_block_stack(getattr(config, "model_type", None))
    return config


def check_window(config: PretrainedConfig, seq_len: int, flag: str = "--seq-len") -> None:
    """A window longer than the model's learned positions would index past them: refuse it before any work."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and seq_len > limit:
        raise OffsiteError(f"{flag}={seq_len} is longer than this model's {limit} positions; use {flag} {limit} "
                           "or less")


def load_model(name_or_path: str, dtype: torch.dtype | str = "auto", in_memory: bool = False,
               device_map: str | None = None, max_memory: dict[int | str, str] | None = None) -> PreTrainedModel:
    """`from_pretrained` of the model's kind (offsite.kinds), refusing pickled weights and remote code.

    transformers maps safetensors files into memory, so the weights stay file pages for as
    long as any tensor of the file is alive. `in_memory` (local directories) reads them into
    ordinary memory instead, so that freeing some of them (offsite.training.parking) really frees it.
    `device_map="auto"` (with `max_memory`): accelerate places the blocks over the GPUs, then CPU memory.
    """
    source = resolve(name_or_path)
    _check_local(source)
    kind = kind_of(load_config(name_or_path), name_or_path)
    try:
        if in_memory and _has_safetensors(source):
            model = _load_in_memory(Path(source), dtype)
        else:
            placed = {"device_map": device_map, "max_memory": max_memory} if device_map else {}
            model = kind.auto_class.from_pretrained(source, dtype=dtype, use_safetensors=_has_safetensors(source),
                                                    trust_remote_code=False, **placed)
    except OffsiteError:
        raise
    except Exception as error:  # noqa: BLE001 - as in load_config; truncated weights, odd configs
        raise OffsiteError(
            f"could not load model '{name_or_path}': {one_line(_first_line(error))}. "
            "Pass a local model directory, a built-in alias (smollm2-135m) or a reachable hub id with "
            "safetensors weights (offsite never unpickles: convert a pytorch_model.bin with "
            "`model.save_pretrained(dir, safe_serialization=True)`)"
        ) from error
    model.eval()
    return model


def _load_in_memory(source: Path, dtype: torch.dtype | str) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(source.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", backend="pread") as file:  # read, not mapped
            weights.update({name: file.get_tensor(name) for name in file.keys()})
    return kind_of(config, str(source)).model_class(config).from_pretrained(None, config=config, state_dict=weights,
                                                                            dtype=dtype)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    source = resolve(name_or_path)
    _check_local(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except OffsiteError:
        raise
    except Exception as error:  # noqa: BLE001 - as in load_config
        raise OffsiteError(f"could not load the tokenizer of '{name_or_path}': {one_line(_first_line(error))}"
                           ) from error
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every loss and score, so any id works.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_preprocessor(name_or_path: str) -> PreTrainedTokenizerBase | BaseImageProcessor:
    """What turns raw input into the model's: its tokenizer, or an image model's image processor."""
    if kind_of(load_config(name_or_path), name_or_path) is not IMAGE_CLASSIFICATION:
        return load_tokenizer(name_or_path)
    source = resolve(name_or_path)
    try:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - as in load_config
        raise OffsiteError(f"could not load the image processor of '{name_or_path}': {one_line(_first_line(error))} "
                           "(an image model's directory needs its preprocessor_config.json)") from error


def pad_id(preprocessor) -> int:
    """The id that pads a batch: the tokenizer's, or 0 for an image processor (images come in one size)."""
    return getattr(preprocessor, "pad_token_id", None) or 0


def is_classifier(name_or_path: str) -> bool:
    """Whether the model (or bundle) at `name_or_path` is a classifier (offsite.kinds), from its config alone."""
    return kind_of(load_config(name_or_path), name_or_path).classifies


def _has_safetensors(source: str) -> bool:
    """Always True: safetensors only, so a pickle is never read (a hub id without them fails to load)."""
    path = Path(source)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise OffsiteError(
            f"{path} holds no *.safetensors weights; offsite never loads pickled weights. "
            "Convert it with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    return True


def _check_local(source: str) -> None:
    """A path that can only be local (./x, /x, ~/x) and is missing is an error, not a hub lookup."""
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().is_dir():
        raise OffsiteError(f"model directory {source} does not exist; pass an existing directory, "
                           "a built-in alias (smollm2-135m) or a hub id")
    local = Path(source).expanduser()
    if (local / ADAPTER_METADATA).is_file() and not (local / MODEL_CONFIG).is_file():
        raise OffsiteError(f"{source} is an adapter file, not a model; pass it with --adapter "
                           f"(offsite eval MODEL --adapter {source}) or to offsite plug MODEL {source}")
    if local.is_dir():
        refuse_remote_code(local)


def refuse_remote_code(directory: Path) -> None:
    """A model directory that ships Python code, or whose configs point at some (`auto_map`), is refused.

    transformers would otherwise ask whether to run that code (and run it on "y").
    """
    code = sorted(p.name for p in directory.rglob("*.py"))
    if code:
        raise OffsiteError(f"{directory} holds Python files ({', '.join(code[:3])}); offsite never runs code that "
                           "comes with a model: remove them or ask for a model without them")
    for name in (MODEL_CONFIG, TOKENIZER_CONFIG):
        path = directory / name
        if path.is_file() and "auto_map" in read_json(path, "a model directory"):
            raise OffsiteError(f"{path} has an 'auto_map' entry, which asks to run code shipped with the model; "
                               "offsite never runs it: remove the entry or use a model of a type transformers knows")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].rstrip(".")
