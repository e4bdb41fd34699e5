"""offsite: Offsite-Tuning for any Hugging Face transformer.

The model owner `emulate`s a bundle (adapter + compressed emulator), the data
owner `tune`s the adapter through it, and the model owner `plug`s the returned
adapter into the full model.

The names below are imported on first use, so that `import offsite` (and the `offsite`
command's start, which may restart the process with another allocator) does not load torch.
"""

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.1"

_EXPORTS = {
    "EmulateConfig": "offsite.config", "EvalConfig": "offsite.config", "PlugConfig": "offsite.config",
    "SplitConfig": "offsite.config", "TrainConfig": "offsite.config", "TuneConfig": "offsite.config",
    "OffsiteError": "offsite.errors", "emulate": "offsite.bundle", "evaluate": "offsite.evaluate",
    "describe": "offsite.info", "plug": "offsite.plug", "tune": "offsite.tune",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'offsite' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """Keeps `offsite.tune`, `offsite.plug` and `offsite.evaluate` the functions.

    Importing a submodule sets it as an attribute of its package; three submodules share
    their name with the function they export, which must win.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
