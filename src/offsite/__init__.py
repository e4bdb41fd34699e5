"""offsite: Offsite-Tuning for any Hugging Face transformer.

The model owner `emulate`s a bundle (adapter + compressed emulator), the data
owner `tune`s the adapter through it, and the model owner `plug`s the returned
adapter into the full model (see `offsite.api`).

The names below are imported on first use, so that `import offsite` (and the `offsite`
command's start, which may restart the process with another allocator) does not load torch.
"""

import importlib
from typing import Any

__version__ = "0.1.1"

_EXPORTS = {
    "EmulateConfig": "offsite.config", "EvalConfig": "offsite.config", "PlugConfig": "offsite.config",
    "SplitConfig": "offsite.config", "TrainConfig": "offsite.config", "TuneConfig": "offsite.config",
    "DeviceConfig": "offsite.config", "FederateConfig": "offsite.config",
    "DistillConfig": "offsite.config", "OffsiteError": "offsite.errors",
    "emulate": "offsite.api", "tune": "offsite.api", "plug": "offsite.api", "evaluate": "offsite.api",
    "describe": "offsite.api", "federate": "offsite.federation.simulation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'offsite' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
