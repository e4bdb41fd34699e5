"""offsite: Offsite-Tuning for any Hugging Face transformer.

The model owner `emulate`s a bundle (adapter + compressed emulator), the data
owner `tune`s the adapter through it, and the model owner `plug`s the returned
adapter into the full model.
"""

__version__ = "0.1.0"

from offsite.bundle import emulate  # noqa: E402
from offsite.config import EmulateConfig, EvalConfig, PlugConfig, SplitConfig, TrainConfig, TuneConfig  # noqa: E402
from offsite.errors import OffsiteError  # noqa: E402
from offsite.evaluate import evaluate  # noqa: E402
from offsite.info import describe  # noqa: E402
from offsite.plug import plug  # noqa: E402
from offsite.tune import tune  # noqa: E402

__all__ = [
    "EmulateConfig", "EvalConfig", "OffsiteError", "PlugConfig", "SplitConfig", "TrainConfig", "TuneConfig",
    "describe", "emulate", "evaluate", "plug", "tune",
]
