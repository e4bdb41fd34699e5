"""Describing a bundle, an adapter file or a model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offsite.adapter import METADATA, load_adapter
from offsite.bundle import MANIFEST, read_manifest
from offsite.errors import OffsiteError
from offsite.files import read_json


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def describe(path: str | Path) -> dict[str, Any]:
    """What `path` is (bundle, adapter or model) and its layers, sizes and fingerprint."""
    root = Path(path)
    if root.is_file():
        raise OffsiteError(f"{root} is a file; pass a bundle, adapter or model directory")
    if not root.is_dir():
        raise OffsiteError(f"{root} does not exist; pass a bundle, adapter or model directory")
    if (root / MANIFEST).exists():  # a directory in its place gets read_json's error, not "model"
        manifest = read_manifest(root)
        return {
            "kind": "bundle",
            "path": str(root),
            "base_model": manifest.base_model,
            "split": manifest.split.to_dict(),
            "layers": manifest.to_dict()["layers"],
            "fingerprint": manifest.fingerprint,
            "emulator_method": manifest.emulator.get("method", manifest.split.method),
            "emulator_bytes": manifest.emulator.get("bytes"),
            # Compressed or shared emulators need offsite's loader; plain ones load with from_pretrained too.
            "loads_with": "offsite" if manifest.emulator.get("compression") or manifest.emulator.get("share")
            else "from_pretrained or offsite",
            "bytes": _size(root),
        }
    if (root / METADATA).exists():
        adapter = load_adapter(root)
        return {
            "kind": "adapter",
            "path": str(root),
            "base_model": adapter.base_model,
            "layers": adapter.layers,
            "fingerprint": adapter.fingerprint,
            "parameters": sum(t.numel() for named in adapter.tensors.values() for t in named.values()),
            "training": adapter.training.get("summary", {}),
            "bytes": _size(root),
        }
    if (root / "config.json").is_file():
        config = read_json(root / "config.json", "a model directory")
        return {
            "kind": "model",
            "path": str(root),
            "model_type": config.get("model_type"),
            "num_layers": config.get("num_hidden_layers", config.get("n_layer")),
            "bytes": _size(root),
        }
    raise OffsiteError(f"{root} is not a bundle ({MANIFEST}), an adapter ({METADATA}) or a model (config.json)")
