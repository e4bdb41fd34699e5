"""`offsite eval --lm-eval TASKS`: a full model, bundle or plugged model (and an adapter) scored by lm-eval.

The model is loaded once, by offsite's own loader (bundle checks, fingerprint, issued layers), then scored on
`--data` by offsite's scorer and on the lm-eval tasks through the `offsite` model type.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from offsite.api import load_for_eval, score_loaded
from offsite.config import EvalConfig
from offsite.device import Placement, place_model
from offsite.errors import OffsiteError
from offsite.files import atomic_file
from offsite.loading import check_window, is_classifier, load_config

INSTALL = 'pip install "offsite[lm-eval]"'


def require_lm_eval(flag: str = "--lm-eval") -> None:
    """One line naming the install command when the optional extra is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise OffsiteError(f"{flag} needs lm-eval, which is not installed; install it with: {INSTALL}")


def evaluate_with_lm_eval(config: EvalConfig) -> dict[str, Any]:
    """offsite's own scores on `config.data` (if given) and lm-eval's on `config.lm_eval`, from one loaded model.

    Returns offsite's result fields, `lm_eval` ({task: {metric: value}}) and `lm_eval_table` (lm-eval's
    table); lm-eval's whole output (configs, versions, sample counts) goes to `config.lm_eval_output` if set.
    """
    require_lm_eval()
    from offsite.lmeval.model import OffsiteLM  # noqa: PLC0415 - imports lm-eval (seconds), checked just above
    from offsite.lmeval.run import metrics, run_lm_eval, table  # noqa: PLC0415 - the same

    if config.device_map:
        raise OffsiteError("--lm-eval with --device-map: not supported; score the model on one --device")
    if is_classifier(config.model):
        raise OffsiteError(f"--lm-eval: {config.model} is a classifier; lm-eval scores language models")
    check_window(load_config(config.model), config.seq_len)  # before any weight is read
    placement = Placement.of(config.runtime.device, config.runtime.dtype)
    model, tokenizer = load_for_eval(config.model, config.adapter, config.bundle)
    place_model(model, placement)
    result: dict[str, Any] = score_loaded(config, model, tokenizer, placement) if config.data else {}
    found = run_lm_eval(OffsiteLM.of(model, tokenizer, config.seq_len, config.batch_size), config.lm_eval,
                        config.limit)
    if config.lm_eval_output:
        with atomic_file(config.lm_eval_output) as tmp:
            tmp.write_text(json.dumps(found, indent=2))
    return {**result, "lm_eval": metrics(found), "lm_eval_table": table(found)}
