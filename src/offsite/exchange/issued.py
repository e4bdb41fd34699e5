"""The model owner's record of the bundles it issued: which layers an adapter for each base may replace.

`plug` must not believe an adapter's own layer list: a data owner can compute a valid fingerprint
over any layers the bundle holds (an uncompressed emulator layer, say) and so overwrite a middle
layer of the full model. The owner decides instead, from the bundle it sent (`--bundle`) or from
the record `offsite emulate` keeps on the owner's machine, one small JSON file per fingerprint.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from pathlib import Path

from offsite.errors import OffsiteError
from offsite.exchange.adapter import Adapter
from offsite.exchange.bundle import Manifest, read_manifest
from offsite.files import read_json, write_json

log = logging.getLogger(__name__)

STATE_ENV = "OFFSITE_STATE"
_FINGERPRINT = re.compile(r"[0-9a-f]{64}", re.ASCII)


def state_dir() -> Path:
    """`$OFFSITE_STATE`, else `$XDG_STATE_HOME/offsite`, else `~/.local/state/offsite`: the model owner's own files."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    if os.environ.get("XDG_STATE_HOME"):
        return Path(os.environ["XDG_STATE_HOME"]).expanduser() / "offsite"
    return Path.home() / ".local" / "state" / "offsite"


def _record_path(fingerprint: str) -> Path:
    if not _FINGERPRINT.fullmatch(fingerprint):  # it becomes a file name: never a path from the other party
        raise OffsiteError(f"fingerprint {fingerprint[:80]!r} is not a SHA-256 in hex")
    return state_dir() / "issued" / f"{fingerprint}.json"


def record(manifest: Manifest, bundle: str | Path) -> Path:
    """Remember, on the model owner's machine, which adapter layers the bundle's adapters may replace."""
    path = _record_path(manifest.fingerprint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"fingerprint": manifest.fingerprint, "adapter_layers": list(manifest.plan.adapter),
                          "base_model": manifest.base_model, "bundle": str(Path(bundle).resolve()),
                          "issued": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    except OSError as error:  # the bundle is written; without the record, plug needs --bundle
        log.warning("could not record the bundle in %s (%s); plug its adapters with --bundle %s",
                    path.parent, error.strerror, bundle)
    return path


def issued_layers(adapter: Adapter, source: str | Path, bundle: str | Path | None = None) -> tuple[int, ...]:
    """The adapter layers of the bundle issued for `adapter`'s base: from `bundle`, else from the owner's record."""
    if bundle is not None:
        manifest = read_manifest(bundle)
        if manifest.fingerprint != adapter.fingerprint:
            raise OffsiteError(f"adapter {source} was not trained on bundle {bundle}: fingerprints "
                               f"{adapter.fingerprint[:16]}… and {manifest.fingerprint[:16]}… differ")
        return manifest.plan.adapter
    path = _record_path(adapter.fingerprint)
    if not path.is_file():
        raise OffsiteError(f"adapter {source}: no bundle issued from this machine has its fingerprint "
                           f"{adapter.fingerprint[:16]}…; pass --bundle BUNDLE, the bundle you sent the data owner")
    layers = read_json(path, "a record of an issued bundle").get("adapter_layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise OffsiteError(f"{path} is damaged (field 'adapter_layers'); pass --bundle BUNDLE instead")
    return tuple(layers)
