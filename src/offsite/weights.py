"""A local model's weights read tensor by tensor and written shard by shard: never the whole model at once.

The model owner's steps that only move tensors (the bundle of a plain emulator, the plugged model,
the fingerprint) stream through here, so their memory is about one shard whatever the model's size.
The model's structure comes from a skeleton on the meta device (no memory), so every key, shape
and dtype is transformers' own; the output is cut into shards by huggingface_hub's plan and written
by safetensors, exactly as `save_pretrained` writes it (tests/test_streaming.py compares the bytes).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig, PreTrainedModel
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from offsite.arch import check_block_stack, get_layers, layer_paths
from offsite.constants import DEFAULT_SHARD_SIZE, MODEL_CONFIG
from offsite.errors import OffsiteError
from offsite.files import one_line
from offsite.kinds import kind_of
from offsite.loading import refuse_remote_code, resolve

log = logging.getLogger(__name__)

WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"


class WeightFiles:
    """The safetensors tensors of a local model directory (one file or shards), each read only when asked for.

    Files are read with `pread`, not mapped: a mapped file's pages would count against the
    process for as long as the file stays open, which is the whole model by the end.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        paths = sorted(directory.glob("*.safetensors"))
        if not paths:
            raise OffsiteError(f"{directory} holds no *.safetensors weights; offsite never loads pickled weights. "
                               "Convert it with `model.save_pretrained(dir, safe_serialization=True)`")
        self._files: dict[str, object] = {}
        self.location: dict[str, Path] = {}
        for path in paths:
            for name in self._open(path).keys():
                if name in self.location:
                    raise OffsiteError(f"{directory}: tensor {one_line(name)} is in both {self.location[name].name} "
                                       f"and {path.name}; a model's shards hold each tensor once")
                self.location[name] = path

    def _open(self, path: Path):
        if path not in self._files:
            try:
                self._files[path] = safe_open(str(path), framework="pt", backend="pread")  # closed with this object
            except (SafetensorError, OSError) as error:
                raise OffsiteError(f"{path}: not readable safetensors ({one_line(str(error))})") from None
        return self._files[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.location[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._open(self.location[name]).get_tensor(name)


@dataclass
class StreamedModel:
    """A local model as files plus a weightless skeleton that knows its structure."""

    directory: Path
    files: WeightFiles
    skeleton: PreTrainedModel

    @property
    def layers_prefix(self) -> str:
        return layer_paths(self.skeleton).layers


def open_streamed(name_or_path: str) -> StreamedModel | None:
    """The model at `name_or_path` for streaming, or None when it cannot stream (a hub id, no safetensors).

    None means "load it whole instead"; a directory that is there but broken is an error.
    """
    source = Path(resolve(name_or_path)).expanduser()
    if not (source / MODEL_CONFIG).is_file():
        return None
    refuse_remote_code(source)
    files = WeightFiles(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        check_block_stack(getattr(config, "model_type", None))
        with torch.device("meta"):
            skeleton = kind_of(config, name_or_path).auto_class.from_config(config,
                                                                            dtype=_checkpoint_dtype(config, files))
    except OffsiteError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers parses what the other party wrote
        raise OffsiteError(f"could not read the config of MODEL '{name_or_path}': {one_line(str(error))}") from None
    if (source / GENERATION_CONFIG).is_file():
        skeleton.generation_config = GenerationConfig.from_pretrained(source)  # as from_pretrained reads it
    return StreamedModel(source, files, skeleton)


def _checkpoint_dtype(config, files: WeightFiles) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` gives: the config's, else the first floating weight's."""
    if isinstance(getattr(config, "dtype", None), torch.dtype):
        return config.dtype
    for name in sorted(files.location):
        tensor = files.get(name)
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def saved_state(skeleton: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The (weightless) tensors `save_pretrained` writes: no tied copies, none of the keys it ignores."""
    state = skeleton.state_dict()
    for key in skeleton._keys_to_ignore_on_save or ():
        state.pop(key, None)
    return remove_tied_weights_from_state_dict(state, skeleton)


def source_keys(model: StreamedModel, kept: tuple[int, ...]) -> dict[str, str] | None:
    """For each tensor the model reduced to layers `kept` saves, the file key it is read from.

    None (with the reason logged) when the files do not hold exactly those tensors under those
    names and shapes (a checkpoint transformers renames while loading, say): the caller then loads
    the model whole, which handles every checkpoint transformers can read.
    """
    prefix = model.layers_prefix + "."
    wanted = saved_state(model.skeleton)
    mapping: dict[str, str] = {}
    for name, tensor in wanted.items():
        source = name
        if name.startswith(prefix):
            position, _, rest = name[len(prefix):].partition(".")
            source = f"{prefix}{kept[int(position)]}.{rest}"
        if source not in model.files.location or model.files.shape(source) != tuple(tensor.shape):
            log.info("%s: tensor %s is not stored as the model holds it; loading the model whole instead",
                     model.directory, source)
            return None
        mapping[name] = source
    return mapping


def write_streamed(model: StreamedModel, output: Path, mapping: dict[str, str],
                   replace: Callable[[str], torch.Tensor | None] = lambda name: None,
                   max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> None:
    """Write the skeleton's model into `output` as `save_pretrained` would, reading one shard's tensors at a time.

    `mapping`: saved name -> file key (from `source_keys`); `replace(name)`: a tensor to write in
    place of the file's (the adapter's, in `plug`), or None. Each tensor is cast to the skeleton's
    dtype for it, as loading the model would.
    """
    skeleton = model.skeleton
    wanted = saved_state(skeleton)
    assert set(wanted) == set(mapping), "mapping comes from source_keys of this skeleton"
    plan = split_torch_state_dict_into_shards(wanted, filename_pattern="model{suffix}.safetensors",
                                              max_shard_size=max_shard_size)
    for filename, names in plan.filename_to_tensors.items():
        shard = {}
        for name in names:
            tensor = replace(name)
            tensor = model.files.get(mapping[name]) if tensor is None else tensor
            shard[name] = tensor.to(wanted[name].dtype).contiguous()
        save_file(shard, output / filename, metadata={"format": "pt"})
        del shard  # before the next shard is read
    if plan.is_sharded:
        index = {"metadata": {"total_parameters": skeleton.num_parameters(), **plan.metadata},
                 "weight_map": plan.tensor_to_filename}
        (output / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    skeleton.config.dtype = str(skeleton.dtype).split(".")[1]  # what save_pretrained records
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(output)
    if skeleton.can_generate():
        skeleton.generation_config.save_pretrained(output)


def materialize(model: StreamedModel, mapping: dict[str, str]) -> PreTrainedModel:
    """The skeleton (reduced to some layers) with its weights read from the files: memory is those layers only.

    Tied weights are tied again; non-persistent buffers (e.g. rotary frequencies) are left unset, so
    the result is for transforming and saving weights, never for running.
    """
    skeleton = model.skeleton
    wanted = saved_state(skeleton)
    skeleton.to_empty(device="cpu")
    skeleton.load_state_dict({name: model.files.get(source).to(wanted[name].dtype) for name, source in mapping.items()},
                             strict=False)
    skeleton.tie_weights()
    return skeleton


def layer_tensor_names(model: StreamedModel, index: int) -> dict[str, str]:
    """Name inside block `index` -> its file key, for every tensor of that block's state dict."""
    block = get_layers(model.skeleton)[index]
    return {name: f"{model.layers_prefix}.{index}.{name}" for name in block.state_dict()}


def stores_layers(model: StreamedModel, indices: list[int] | tuple[int, ...]) -> bool:
    """Whether the files hold every tensor of the blocks at `indices` under the name the model gives it."""
    return all(key in model.files.location for index in indices for key in layer_tensor_names(model, index).values())
