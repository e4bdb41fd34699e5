"""Writing artifacts safely: a whole output directory appears at once, or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from offsite.errors import OffsiteError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write JSON to a temp name beside `path`, then rename over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise OffsiteError(f"{path.parent} is not {what}: {path.name} is missing") from None
    except json.JSONDecodeError as error:
        raise OffsiteError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        raise OffsiteError(f"{path} must hold a JSON object")
    return data


def check_output_dir(output: str | Path, overwrite: bool, flag: str = "-o/--output") -> Path:
    """Refuse to replace existing data unless asked, before any long work starts."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise OffsiteError(f"{flag} {path} exists and is not a directory; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OffsiteError(f"{flag} {path} already exists and is not empty; pass --overwrite or choose another path")
    return path


@contextlib.contextmanager
def atomic_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory that replaces `output` only if the block succeeds."""
    final = check_output_dir(output, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            backup = final.with_name(f".{final.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
            os.replace(tmp, final)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
