"""Scoring with lm-eval: which tasks a user means, and one `simple_evaluate` call over an offsite model.

A task is named three ways: a built-in dataset (`wordnet`, `bbc-news:validation`) or a .txt/.jsonl data file,
written as an lm-eval task over a local jsonl file first (`tasks.write_task`); a task YAML file of one's own;
or any task lm-eval knows (`arc_easy`), whose data lm-eval fetches from a hub or finds in its local cache.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from offsite.data.builtin import BUILTIN, is_builtin
from offsite.errors import OffsiteError
from offsite.lmeval.tasks import write_task

log = logging.getLogger(__name__)

# What a user can score offline: the built-in tasks, which `data export --lm-eval` writes as lm-eval tasks.
OFFLINE_HINT = (f"offline, score a built-in task ({', '.join(n for n in BUILTIN if not n.startswith('fashion'))}), "
                "a .txt/.jsonl data file or a task YAML over local files")


@dataclass(frozen=True)
class TaskSet:
    """lm-eval task names and the folders of the task YAMLs that define the local ones."""

    names: list[str]
    include: list[Path]
    needs_defaults: bool  # a task from lm-eval's own set (its index takes seconds to build)


def resolve_tasks(tasks: list[str], folder: Path) -> TaskSet:
    """Write built-in tasks into `folder`, read the names of YAML files; any other name is lm-eval's own."""
    names, include, defaults = [], [], False
    for task in tasks:
        if is_builtin(task) or task.lower().endswith((".txt", ".jsonl")):
            names.append(_task_field(write_task(task, folder), task))
            include.append(folder)
        elif task.lower().endswith((".yaml", ".yml")):
            path = Path(task)
            if not path.is_file():
                raise OffsiteError(f"--lm-eval {task}: no such task file")
            names.append(_task_field(path, task))
            include.append(path.resolve().parent)
        else:
            names.append(task)
            defaults = True
    return TaskSet(names, list(dict.fromkeys(include)), defaults)


def _task_field(path: Path, given: str) -> str:
    try:
        found = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise OffsiteError(f"--lm-eval {given}: {path} is not a readable task YAML ({error})") from error
    name = found.get("task") if isinstance(found, dict) else None
    if not isinstance(name, str):
        raise OffsiteError(f"--lm-eval {given}: {path} has no 'task' name; an lm-eval task YAML names its task")
    return name


def task_manager(tasks: TaskSet):
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - lm-eval is an optional extra

    return TaskManager(include_path=[str(p) for p in tasks.include] or None, include_defaults=tasks.needs_defaults)


def check_tasks(tasks: TaskSet, manager) -> None:
    """Every task known to lm-eval and its data loadable (lm-eval caches it for the run); else one line."""
    unknown = [name for name in tasks.names if name not in manager.all_tasks]
    if unknown:
        raise OffsiteError(f"--lm-eval: lm-eval knows no task {', '.join(unknown)} (`lm-eval ls tasks` lists them; "
                           f"{OFFLINE_HINT})")
    for name in tasks.names:
        try:
            manager.load([name])
        except (ConnectionError, OSError) as error:  # the datasets library's "couldn't reach" is a ConnectionError
            raise OffsiteError(f"--lm-eval {name}: its data is not on this machine and cannot be fetched "
                               f"({type(error).__name__}: {str(error).splitlines()[0]}); {OFFLINE_HINT}") from error


def run_lm_eval(lm, tasks: list[str], limit: int | None = None, folder: Path | None = None) -> dict[str, Any]:
    """lm-eval's results for `lm` (an `OffsiteLM`) on `tasks`: its whole output dict (results, configs, versions).

    `folder`: where built-in tasks are written (a temporary folder by default).
    """
    import lm_eval  # noqa: PLC0415 - lm-eval is an optional extra

    with tempfile.TemporaryDirectory(prefix="offsite-lm-eval-") as scratch:
        resolved = resolve_tasks(tasks, Path(folder) if folder is not None else Path(scratch))
        manager = task_manager(resolved)
        check_tasks(resolved, manager)
        found = lm_eval.simple_evaluate(model=lm, tasks=resolved.names, task_manager=manager, limit=limit,
                                        log_samples=False)
    return _plain(found)


def _plain(found: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's output without what JSON cannot hold (numpy scalars, callables in the task configs)."""
    return json.loads(json.dumps(found, default=lambda value: value.item() if hasattr(value, "item") else str(value)))


def metrics(found: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results, its "metric,filter" keys as plain metric names."""
    table: dict[str, dict[str, float]] = {}
    for task, values in found["results"].items():
        table[task] = {key.split(",")[0]: value for key, value in values.items()
                       if "," in key and isinstance(value, (int, float)) and not key.startswith("alias")}
    return table


def table(found: dict[str, Any]) -> str:
    """lm-eval's own markdown table of the results."""
    from lm_eval.utils import make_table  # noqa: PLC0415 - lm-eval is an optional extra

    return make_table(found)
