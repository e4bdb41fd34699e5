"""How a study judges and prints a result: accuracy (higher is better) or perplexity (lower is better)."""

from __future__ import annotations

import math
from typing import Any

ACCURACY_TASKS = ("choice", "classify")  # scored by accuracy; the rest ("lm") by perplexity


def is_accuracy(metrics: dict[str, Any]) -> bool:
    return metrics["task"] in ACCURACY_TASKS


def headline(metrics: dict[str, Any]) -> float:
    """The number a task is judged by: accuracy, or perplexity (lower is better)."""
    return metrics["accuracy"] if is_accuracy(metrics) else metrics["perplexity"]


def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return headline(a) > headline(b) if is_accuracy(a) else headline(a) < headline(b)


def format_metric(metrics: dict[str, Any]) -> str:
    return f"{metrics['accuracy']:.3f}" if is_accuracy(metrics) else f"{metrics['perplexity']:.2f}"


def _log_scale(metrics: dict[str, Any]) -> float:
    """Accuracy, or minus log-perplexity: the scale on which gains add up (higher is better)."""
    return metrics["accuracy"] if is_accuracy(metrics) else -math.log(metrics["perplexity"])


def gain_kept(result: dict[str, Any], zero_shot: dict[str, Any], reference: dict[str, Any]) -> float | None:
    """Share of `reference`'s gain over zero-shot that `result` keeps: (result - zero) / (reference - zero).

    Accuracy for a choice task, log-perplexity for language modelling (a perplexity ratio is what a
    user notices). None when the reference gains nothing, so there is nothing to keep.
    """
    gain = _log_scale(reference) - _log_scale(zero_shot)
    if gain <= 0:
        return None
    return (_log_scale(result) - _log_scale(zero_shot)) / gain


def protection(plug_in: dict[str, Any], emulator_finetune: dict[str, Any]) -> float:
    """How much better the plug-in is than what the emulator alone gives the data owner.

    Accuracy points for a choice task (positive protects the model owner); for language modelling the
    emulator's perplexity over the plug-in's (above 1 protects).
    """
    if is_accuracy(plug_in):
        return plug_in["accuracy"] - emulator_finetune["accuracy"]
    return emulator_finetune["perplexity"] / plug_in["perplexity"]


def format_protection(plug_in: dict[str, Any], value: float) -> str:
    return f"{value * 100:+.1f} pts" if is_accuracy(plug_in) else f"{value:.2f}×"
