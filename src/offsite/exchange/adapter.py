"""The adapter file: what the data owner returns.

`adapter.safetensors` holds only adapter-layer tensors, keyed by *original*
layer index (`layers.<original>.<name>`), so it means the same thing inside the
bundle and inside the full model; a classifier's adapter also holds the task head
the data owner trained (`head.<name in the model>`, see offsite.kinds). `adapter.json`
ties it to its base through the fingerprint and records how it was trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn
from transformers import PreTrainedModel

from offsite import __version__
from offsite.arch import blocks_config, get_layers, layer_paths
from offsite.constants import ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, ADAPTER_METADATA, ADAPTER_WEIGHTS
from offsite.errors import OffsiteError
from offsite.exchange import signing
from offsite.exchange.fingerprint import model_fingerprint
from offsite.files import atomic_file, copy_hashing, is_version, one_line, read_json_bytes, write_json
from offsite.heads import rehead
from offsite.numerics import refuse_non_finite


@dataclass
class Adapter:
    """Adapter weights by original layer index, and the metadata that travels with them."""

    tensors: dict[int, dict[str, torch.Tensor]]
    fingerprint: str
    base_model: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None  # as adapter.json recorded it (older adapter files have none)
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # a classifier's task head, by name in the model
    labels: tuple[str, ...] | None = None  # a classifier's label names, by index: the head's outputs

    @property
    def layers(self) -> list[int]:
        return sorted(self.tensors)

    def save(self, directory: Path, sign: str | Path | None = None) -> None:
        """Write the adapter file into `directory`; `sign`: a private key to sign adapter.json with."""
        flat = {f"layers.{index}.{name}": tensor.detach().contiguous().cpu()
                for index, named in self.tensors.items() for name, tensor in named.items()}
        flat.update({f"{HEAD_PREFIX}{name}": tensor.detach().contiguous().cpu() for name, tensor in self.head.items()})
        refuse_non_finite(flat, "the adapter to export")
        weights = save(flat, metadata={"format": ADAPTER_FORMAT})
        with atomic_file(directory / ADAPTER_WEIGHTS) as tmp:
            tmp.write_bytes(weights)
        write_json(directory / ADAPTER_METADATA, {
            "format": ADAPTER_FORMAT,
            "format_version": ADAPTER_FORMAT_VERSION,
            "offsite_version": __version__,
            "fingerprint": self.fingerprint,
            "base_model": self.base_model,
            "layers": self.layers,
            **({"head": sorted(self.head)} if self.head else {}),
            **({"labels": list(self.labels)} if self.labels is not None else {}),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "training": self.training,
        })
        if sign is not None:
            signing.sign(directory / ADAPTER_METADATA, sign)


# layers.<original index>.<name>: ASCII digits without leading zeros, so no two keys name one tensor
_KEY = re.compile(r"layers\.(0|[1-9][0-9]*)\.([A-Za-z0-9_.]+)", re.ASCII)
HEAD_PREFIX = "head."
_HEAD_KEY = re.compile(r"head\.([A-Za-z0-9_.]+)", re.ASCII)


def load_adapter(directory: str | Path, trust: str | Path | None = None, scratch: str | Path | None = None) -> Adapter:
    """Read an adapter file strictly: checked against `adapter.json` (SHA-256), canonical keys, finite values only.

    `trust`: the data owner's public key; `adapter.json` must be signed with it. `scratch`: where the
    private copy of the weights is made (default: the system's temporary folder).
    """
    with opened_adapter(directory, trust, scratch) as (adapter, read):
        adapter.tensors = {index: {name: read(index, name) for name in named} for index, named in adapter.tensors.items()}
        adapter.head = {name: read(HEAD, name) for name in adapter.head}
        return adapter


HEAD = -1  # what `opened_adapter`'s reader takes in place of a layer index for the task head's tensors


@contextlib.contextmanager
def opened_adapter(directory: str | Path, trust: str | Path | None = None, scratch: str | Path | None = None
                   ) -> Iterator[tuple[Adapter, Callable[[int, str], torch.Tensor]]]:
    """The adapter file checked as `load_adapter` checks it, with weightless tensors (their shapes and dtypes)
    and a function that reads one tensor: memory holds one tensor at a time (a streamed `plug`).

    The weights are read once into a private copy while hashed, and only the copy is read after, so
    what was checked is what is used.
    """
    root = Path(directory)
    meta = _read_metadata(root, trust)
    path = root / ADAPTER_WEIGHTS
    with tempfile.TemporaryDirectory(prefix="offsite-adapter-", dir=scratch) as private:
        copy = Path(private) / ADAPTER_WEIGHTS
        try:
            digest = copy_hashing(path, copy)
            if "weights_sha256" in meta and digest != meta["weights_sha256"]:
                raise OffsiteError(f"{path} has been modified or damaged (SHA-256 differs from {ADAPTER_METADATA}); "
                                   "ask the data owner to send the adapter again")
            weights = safe_open(str(copy), framework="pt", backend="pread")
            keys = _layer_keys(list(weights.keys()), path)
            shapes: dict[int, dict[str, torch.Tensor]] = {}
            for index, named in keys.items():
                for name, key in named.items():
                    tensor = weights.get_tensor(key)
                    refuse_non_finite([(key, tensor)], str(path))
                    shapes.setdefault(index, {})[name] = tensor.to("meta")
            head = shapes.pop(HEAD, {})
        except (SafetensorError, OSError, ValueError) as error:
            raise OffsiteError(f"cannot read {path}: {one_line(str(error))}") from None
        if sorted(shapes) != sorted(meta.get("layers", [])):
            raise OffsiteError(f"{root}: {ADAPTER_WEIGHTS} holds layers {sorted(shapes)} but {ADAPTER_METADATA} lists "
                               f"{meta.get('layers')}")
        if sorted(head) != meta.get("head", []):
            raise OffsiteError(f"{root}: {ADAPTER_WEIGHTS} holds head tensors {sorted(head)} but {ADAPTER_METADATA} "
                               f"lists {meta.get('head', [])}")
        adapter = Adapter(shapes, str(meta.get("fingerprint")), meta.get("base_model", {}), meta.get("training", {}),
                          meta.get("weights_sha256"), head,
                          tuple(meta["labels"]) if "labels" in meta else None)
        yield adapter, lambda index, name: weights.get_tensor(keys[index][name])


def _read_metadata(root: Path, trust: str | Path | None) -> dict[str, Any]:
    """`adapter.json`, checked (and its signature, with `trust`), after refusing anything but a flat folder."""
    if not root.is_dir():
        raise OffsiteError(f"adapter {root} does not exist or is not a directory; make one with `offsite tune`")
    links = sorted(p.name for p in root.iterdir() if p.is_symlink() or p.is_dir())
    if links:
        raise OffsiteError(f"adapter {root} holds symlinks or folders ({one_line(', '.join(links))}); an adapter file "
                           "is a flat folder of files: ask the data owner to send it again")
    raw, meta = read_json_bytes(root / ADAPTER_METADATA, "an offsite adapter (make one with `offsite tune`)")
    if trust is not None:
        signing.verify(raw, root / ADAPTER_METADATA, trust)  # the very bytes parsed above
    if meta.get("format") != ADAPTER_FORMAT or not is_version(meta.get("format_version"), ADAPTER_FORMAT_VERSION):
        raise OffsiteError(f"{root / ADAPTER_METADATA} is not an offsite adapter of format version "
                           f"{ADAPTER_FORMAT_VERSION}")
    _check_metadata(meta, root / ADAPTER_METADATA)
    return meta


def _layer_keys(keys: list[str], path: Path) -> dict[int, dict[str, str]]:
    """Original layer index (`HEAD` for the task head) -> name -> the file's key, refusing any key not in
    canonical form."""
    found: dict[int, dict[str, str]] = {}
    for key in keys:
        match, head = _KEY.fullmatch(key), _HEAD_KEY.fullmatch(key)
        if match is None and head is None:
            raise OffsiteError(f"{path}: unexpected tensor key {one_line(key)} (expected layers.<index>.<name>, "
                               "the index in ASCII digits without leading zeros, or head.<name>)")
        if match is not None:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = key
        else:
            found.setdefault(HEAD, {})[head.group(1)] = key
    return found


def _check_metadata(meta: dict[str, Any], path: Path) -> None:
    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in layers):
        raise OffsiteError(f"{path}: field 'layers' must be a list of layer indices, got {layers!r}")
    for name in ("base_model", "training"):
        if not isinstance(meta.get(name, {}), dict):
            raise OffsiteError(f"{path}: field '{name}' must be a JSON object")
    if not isinstance(meta.get("fingerprint"), str) or not re.fullmatch(r"[0-9a-f]{64}", meta["fingerprint"]):
        raise OffsiteError(f"{path}: field 'fingerprint' must be a SHA-256 in hex")
    for name in ("head", "labels"):
        names = meta.get(name, [])
        if not isinstance(names, list) or not all(isinstance(item, str) for item in names):
            raise OffsiteError(f"{path}: field '{name}' must be a list of names, got {names!r}")
    if "weights_sha256" in meta and not (isinstance(meta["weights_sha256"], str)
                                         and re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"])):
        raise OffsiteError(f"{path}: field 'weights_sha256' must be a SHA-256 in hex")


def extract(model: nn.Module, positions: dict[int, int]) -> dict[int, dict[str, torch.Tensor]]:
    """Copy the adapter layers' weights out of `model`; `positions` maps original index -> layer position."""
    layers = get_layers(model)
    return {original: {k: v.detach().clone() for k, v in layers[position].state_dict().items()}
            for original, position in positions.items()}


def extract_head(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy a classifier's task head out of `model` (empty for a language model: its head is not trained)."""
    return {name: tensor.detach().clone() for name, tensor in head_state(model).items()}


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The task head's tensors by their names in `model` (offsite.arch: `task_head`)."""
    return {f"{path}.{name}": tensor for path in layer_paths(model).task_head
            for name, tensor in model.get_submodule(path).state_dict().items()}


def apply(model: nn.Module, adapter: Adapter, positions: dict[int, int], source: str | Path) -> None:
    """Load the adapter into `model` strictly: same keys, shapes and dtypes as the layers it replaces.

    A classifier's adapter trained for other labels than `model`'s head gives it a head for them first.
    """
    if adapter.head and adapter.labels is not None:
        rehead(model, adapter.labels, seed=0)  # its weights are the adapter's, loaded below
    check_fits(model, adapter, positions, source)
    layers = get_layers(model)
    for original, named in adapter.tensors.items():
        layers[positions[original]].load_state_dict(named, strict=True)  # casts a float adapter to the model's dtype
    for path in layer_paths(model).task_head if adapter.head else ():
        prefix = f"{path}."
        model.get_submodule(path).load_state_dict(
            {name[len(prefix):]: tensor for name, tensor in adapter.head.items() if name.startswith(prefix)}, strict=True)


def check_fits(model: nn.Module, adapter: Adapter, positions: dict[int, int], source: str | Path) -> None:
    """Refuse an adapter whose keys, shapes or dtypes are not those of the layers it would replace.

    `model` may be a weightless skeleton (a streamed plug): only names, shapes and dtypes are read.
    """
    layers = get_layers(model)
    dtypes = sorted({str(t.dtype) for named in [*adapter.tensors.values(), adapter.head] for t in named.values()})
    if len(dtypes) > 1:
        raise OffsiteError(f"adapter {source} mixes dtypes {dtypes}; an adapter file holds one dtype")
    if adapter.head:  # layers alone may be applied anywhere (e.g. an emulator's); a head only where it fits
        check_head(head_state(model), adapter.head, source)
    for original, named in adapter.tensors.items():
        if original not in positions:
            raise OffsiteError(f"adapter {source} has layer {original}, which this model has no place for "
                               f"(adapter layers here: {sorted(positions)})")
        layer = layers[positions[original]]
        expected = layer.state_dict()
        missing = sorted(set(expected) - set(named))
        unexpected = sorted(set(named) - set(expected))
        if missing or unexpected:
            raise OffsiteError(f"adapter {source}, layer {original}: missing keys {missing}, unexpected keys {unexpected}")
        for name, tensor in named.items():
            want = expected[name]
            if tensor.shape != want.shape or not _castable(tensor.dtype, want.dtype):
                raise OffsiteError(
                    f"adapter {source}, layers.{original}.{name}: shape {tuple(tensor.shape)} {tensor.dtype} "
                    f"but the model expects {tuple(want.shape)} {want.dtype}"
                )


def check_head(expected: dict[str, torch.Tensor], head: dict[str, torch.Tensor], source: str | Path) -> None:
    """A classifier's adapter carries exactly its task head; a language model's carries none."""
    if not expected and head:
        raise OffsiteError(f"adapter {source} carries a classification head ({sorted(head)[0]}, ...), but this model "
                           "has none to replace: it was trained for a classifier")
    missing, unexpected = sorted(set(expected) - set(head)), sorted(set(head) - set(expected))
    if missing or unexpected:
        raise OffsiteError(f"adapter {source}: the classification head's tensors differ from this model's: missing "
                           f"{missing}, unexpected {unexpected}")
    for name, tensor in head.items():
        want = expected[name]
        if tensor.shape != want.shape or not _castable(tensor.dtype, want.dtype):
            raise OffsiteError(f"adapter {source}, head.{name}: shape {tuple(tensor.shape)} {tensor.dtype} but the "
                               f"model expects {tuple(want.shape)} {want.dtype} (another number of labels?)")


def _castable(stored: torch.dtype, wanted: torch.dtype) -> bool:
    """Same dtype, or both floating (an adapter saved with --save-dtype, a model loaded in another)."""
    return stored == wanted or (stored.is_floating_point and wanted.is_floating_point)


def plug_into(model: PreTrainedModel, adapter: Adapter, source: str | Path, issued: tuple[int, ...]) -> None:
    """Replace the full model's adapter layers in place, after checking the adapter was made for it.

    `issued`: the adapter layers of the bundle the model owner sent (see `exchange.issued`). The
    adapter's own list is not trusted: a fingerprint can be computed over any layers the bundle holds.
    """
    check_plug(adapter, source, issued, blocks_config(model.config).num_hidden_layers,
               lambda: model_fingerprint(model, adapter.layers))
    if head_state(model) and not adapter.head:  # a classifier's adapter must bring its head
        check_head(head_state(model), adapter.head, source)
    apply(model, adapter, {index: index for index in adapter.layers}, source)


def check_plug(adapter: Adapter, source: str | Path, issued: tuple[int, ...], num_layers: int,
               base_fingerprint: Callable[[], str]) -> None:
    """Refuse an adapter for other layers than the bundle issued, or for another base model.

    `base_fingerprint()`: the full model's fingerprint over the adapter's layers (asked for only
    once the layers are known to exist).
    """
    if not adapter.layers or tuple(adapter.layers) != tuple(sorted(issued)):
        raise OffsiteError(f"adapter {source} replaces layers {adapter.layers}, but the bundle issued for this "
                           f"base has adapter layers {sorted(issued)}; refusing to plug it")
    if any(index >= num_layers for index in adapter.layers):
        raise OffsiteError(f"adapter {source} has layers {adapter.layers} but the model has only {num_layers} layers")
    actual = base_fingerprint()
    if actual != adapter.fingerprint:
        raise OffsiteError(
            f"adapter {source} was made for another base model: its fingerprint is {adapter.fingerprint[:16]}…, "
            f"this model's is {actual[:16]}…; plug it into the model its bundle was made from "
            f"({adapter.base_model.get('name_or_path', 'unknown')})"
        )
