"""How a study judges and prints a result: accuracy (higher is better) or perplexity (lower is better)."""

from __future__ import annotations

from typing import Any


def headline(metrics: dict[str, Any]) -> float:
    """The number a task is judged by: accuracy, or perplexity (lower is better)."""
    return metrics["accuracy"] if metrics["task"] == "choice" else metrics["perplexity"]


def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return headline(a) > headline(b) if a["task"] == "choice" else headline(a) < headline(b)


def format_metric(metrics: dict[str, Any]) -> str:
    return f"{metrics['accuracy']:.3f}" if metrics["task"] == "choice" else f"{metrics['perplexity']:.2f}"
