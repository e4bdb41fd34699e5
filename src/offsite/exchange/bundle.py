"""The bundle: an ordinary Hugging Face model directory holding adapter + emulator, plus its manifest.

`offsite.json` records where every bundle layer came from, the split, the
SHA-256 of every file and the base fingerprint that ties adapters to the full model.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offsite import __version__
from offsite.config import SplitConfig
from offsite.constants import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, DEFAULT_SHARD_SIZE, MANIFEST
from offsite.emulator.compress import valid_spec
from offsite.emulator.load import load_emulator
from offsite.emulator.share import executed_layers
from offsite.emulator.split import ROLES, SplitPlan
from offsite.errors import OffsiteError
from offsite.exchange import signing
from offsite.files import atomic_dir, copy_hashing, is_version, one_line, read_json_bytes, sha256_file, write_json
from offsite.loading import load_preprocessor, refuse_remote_code
from offsite.numerics import refuse_non_finite


@dataclass(frozen=True)
class Manifest:
    """The parsed `offsite.json` of a bundle."""

    base_model: dict[str, Any]
    split: SplitConfig
    plan: SplitPlan
    fingerprint: str
    files: dict[str, str]
    emulator: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "offsite_version": __version__,
            "base_model": self.base_model,
            "split": self.split.to_dict(),
            "layers": [
                {"bundle_index": position, "original_index": original, "role": role}
                for position, (original, role) in enumerate(self.plan.roles())
            ],
            "emulator": self.emulator,
            "fingerprint": self.fingerprint,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> "Manifest":
        if data.get("format") != BUNDLE_FORMAT or not is_version(data.get("format_version"), BUNDLE_FORMAT_VERSION):
            raise OffsiteError(
                f"{source} is not an offsite bundle manifest of format version {BUNDLE_FORMAT_VERSION} "
                f"(found format={data.get('format')!r}, format_version={data.get('format_version')!r})"
            )
        try:
            num_layers = int(data["base_model"]["num_layers"])
            layers = [(e["original_index"], e["role"]) for e in data["layers"]]
            _check_layers(layers, num_layers, source)
            roles = {role: tuple(index for index, r in layers if r == role) for role in ROLES}
            plan = SplitPlan(num_layers, roles["adapter_bottom"], roles["emulator"], roles["adapter_top"])
            manifest = cls(data["base_model"], SplitConfig.from_dict(data["split"]), plan,
                           str(data["fingerprint"]), dict(data["files"]), dict(data.get("emulator") or {}))
        except (KeyError, TypeError, ValueError) as error:
            raise OffsiteError(f"{source} is malformed: missing or invalid field {error}") from None
        _check_emulator_entry(manifest.emulator, plan, source)
        return manifest


def _check_layers(layers: list[tuple[Any, Any]], num_layers: int, source: Path) -> None:
    for index, role in layers:
        if role not in ROLES:
            raise OffsiteError(f"{source}: layer role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_layers:
            raise OffsiteError(f"{source}: layer original_index {index!r} is not a layer of a "
                               f"{num_layers}-layer base model")


def _check_emulator_entry(info: dict[str, Any], plan: SplitPlan, source: Path) -> None:
    """The emulator entry steers loading (shared layers, compressed modules): refuse one that cannot be right."""
    share = info.get("share")
    if share is not None:
        schedule = share.get("schedule") if isinstance(share, dict) else None
        if not isinstance(schedule, list) or not schedule or any(i not in plan.emulator for i in schedule):
            raise OffsiteError(f"{source}: emulator.share.schedule must list emulator layers, from "
                               f"{list(plan.emulator)}")
    compression = info.get("compression")
    if compression is not None:
        modules = compression.get("modules") if isinstance(compression, dict) else None
        if not isinstance(modules, dict) or not all(valid_spec(spec) for spec in modules.values()):
            raise OffsiteError(f"{source}: emulator.compression.modules must map module names to "
                               "{\"kind\": \"int8\"} or {\"kind\": \"lowrank\", \"rank\": <positive int>}")


def is_bundle(path: str | Path) -> bool:
    """Whether `path` holds a bundle manifest (a broken one too: reading it then names the problem)."""
    return (Path(path) / MANIFEST).exists()


def write_bundle(output: str | Path, overwrite: bool, model: PreTrainedModel | Callable[[Path], None],
                 tokenizer: PreTrainedTokenizerBase, manifest: Manifest, sign: str | Path | None = None,
                 max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Save the bundle's model and tokenizer, then `manifest` with their files' SHA-256 (signed with the
    private key `sign`, if given), all at once.

    `model`: the bundle's model, or a function that writes its files into a directory (a streamed bundle).
    """
    with atomic_dir(output, overwrite) as tmp:
        if callable(model) and not isinstance(model, PreTrainedModel):
            model(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / MANIFEST, replace(manifest, files=files).to_dict())
        if sign is not None:
            signing.sign(tmp / MANIFEST, sign)
    return Path(output)


def read_manifest(bundle: str | Path, trust: str | Path | None = None) -> Manifest:
    """The bundle's manifest; with `trust` (a public key), only if signed by it."""
    path = Path(bundle) / MANIFEST
    if not Path(bundle).is_dir():
        raise OffsiteError(f"bundle {bundle} does not exist or is not a directory; make one with `offsite emulate`")
    raw, data = read_json_bytes(path, "an offsite bundle (make one with `offsite emulate`)")
    if trust is not None:
        signing.verify(raw, path, trust)  # the very bytes parsed below
    return Manifest.from_dict(data, path)


@contextlib.contextmanager
def verified_copy(bundle: str | Path, manifest: Manifest) -> Iterator[Path]:
    """A private copy of the bundle's files, each read once, hashed and checked against the manifest.

    Loading from the copy means what was checked is what is loaded: a file swapped in the bundle
    after the check is never read. A bundle is a flat folder of the listed files and nothing else.
    """
    root = Path(bundle)
    entries = list(root.iterdir())
    odd = sorted(p.name for p in entries if p.is_symlink() or not p.is_file())
    if odd:
        raise OffsiteError(f"bundle {root} holds symlinks or folders ({one_line(', '.join(odd))}); a bundle is a "
                           "flat folder of files: ask the model owner for a fresh bundle")
    present = {p.name for p in entries} - {MANIFEST, signing.signature_file(MANIFEST)}
    unexpected = sorted(present - set(manifest.files))
    missing = sorted(set(manifest.files) - present)
    if unexpected or missing:
        raise OffsiteError(f"bundle {root} does not match its manifest: missing files {one_line(str(missing))}, "
                           f"unexpected files {one_line(str(unexpected))}; ask the model owner for a fresh bundle")
    with tempfile.TemporaryDirectory(prefix="offsite-bundle-") as private:
        for name, expected in manifest.files.items():
            if copy_hashing(root / name, Path(private) / name) != expected:
                raise OffsiteError(f"bundle file {root / name} has been modified (SHA-256 differs from {MANIFEST}); "
                                   "ask the model owner for a fresh bundle")
        refuse_remote_code(Path(private))
        yield Path(private)


def open_bundle(bundle: str | Path, in_memory: bool = False, trust: str | Path | None = None
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Manifest]:
    """The bundle's model (as the data owner trains it), its tokenizer and its manifest, from a verified copy.

    `in_memory`: read the weights into ordinary memory rather than mapping the file (for parking).
    `trust`: the model owner's public key; the bundle must be signed with it.
    """
    manifest = read_manifest(bundle, trust)
    with verified_copy(bundle, manifest) as private:
        model = load_emulator(private, manifest.emulator, manifest.plan, in_memory)
        tokenizer = load_preprocessor(str(private))
    refuse_non_finite(model.state_dict().items(), f"bundle {bundle}")
    return model, tokenizer, manifest


def check_bundle(bundle: str | Path) -> Manifest:
    """Everything loading checks, without building the model: files against the manifest, no code, finite weights."""
    manifest = read_manifest(bundle)
    with verified_copy(bundle, manifest) as private:
        for path in sorted(private.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as weights:
                    refuse_non_finite(((name, weights.get_tensor(name)) for name in weights.keys()),
                                      f"bundle {bundle}, {path.name}")
            except SafetensorError as error:
                raise OffsiteError(f"bundle {bundle}, {path.name}: not readable safetensors ({one_line(str(error))})"
                                   ) from None
    return manifest


def load_bundle(bundle: str | Path, in_memory: bool = False) -> tuple[PreTrainedModel, Manifest]:
    """`open_bundle` without the tokenizer."""
    model, _, manifest = open_bundle(bundle, in_memory)
    return model, manifest


def emulator_positions(manifest: Manifest) -> dict[int, int]:
    """The emulator layers' positions in the model `load_bundle` returns (each to itself).

    The keys a re-aligned emulator's weights go by (`api.tune`'s `emulator`); for an emulator
    without shared layers, whose positions each hold their own weights.
    """
    start = len(manifest.plan.bottom)
    return {position: position for position in range(start, start + len(manifest.plan.emulator))}


def bundle_index(manifest: Manifest) -> dict[int, int]:
    """Original index of each adapter layer -> its position in the model `load_bundle` returns."""
    executed = executed_layers(manifest.plan, manifest.emulator)
    return {original: executed.index(original) for original in manifest.plan.adapter}
