"""The bundles a service hands out: every bundle folder under `--bundles`, checked once at start.

A bundle is listed only if all its files match its manifest and it was made from the service's full model
(its fingerprint is the full model's over its adapter layers), so an adapter trained on it can be served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from offsite.constants import MANIFEST
from offsite.errors import OffsiteError
from offsite.exchange.bundle import Manifest, check_bundle
from offsite.exchange.fingerprint import model_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    id: str
    folder: Path
    manifest: Manifest

    def listing(self) -> dict[str, Any]:
        """What a customer sees of it: the files to download (name, bytes, SHA-256) and the split."""
        files = [{"name": name, "bytes": (self.folder / name).stat().st_size, "sha256": digest}
                 for name, digest in sorted(self.manifest.files.items())]
        files.append({"name": MANIFEST, "bytes": (self.folder / MANIFEST).stat().st_size, "sha256": None})
        return {"id": self.id, "fingerprint": self.manifest.fingerprint, "adapter_layers": list(self.manifest.plan.adapter),
                "emulator_layers": list(self.manifest.plan.emulator), "files": files}


def read_catalogue(folder: str | Path, full: PreTrainedModel) -> dict[str, Bundle]:
    """Bundle id (its folder's name) -> bundle, for every valid bundle made from `full`; the others are skipped
    with a warning naming why."""
    root = Path(folder)
    if not root.is_dir():
        raise OffsiteError(f"--bundles {folder}: no such folder; put the bundles made by `offsite emulate` in it")
    found: dict[str, Bundle] = {}
    fingerprints: dict[tuple[int, ...], str] = {}
    for candidate in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
        try:
            manifest = check_bundle(candidate)
        except OffsiteError as error:
            log.warning("not serving bundle %s: %s", candidate.name, error)
            continue
        layers = tuple(manifest.plan.adapter)
        if layers not in fingerprints:
            fingerprints[layers] = model_fingerprint(full, layers)
        if fingerprints[layers] != manifest.fingerprint:
            log.warning("not serving bundle %s: it was made from another model than --model", candidate.name)
            continue
        found[candidate.name] = Bundle(candidate.name, candidate, manifest)
    if not found:
        raise OffsiteError(f"--bundles {folder}: no bundle of this --model in it (make one with "
                           "`offsite emulate MODEL -o DIR/NAME`)")
    return found
