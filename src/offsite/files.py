"""Writing artifacts safely: a whole output directory appears at once, or not at all."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from offsite.constants import ADAPTER_METADATA, MANIFEST, MODEL_CONFIG
from offsite.errors import OffsiteError

# What makes a directory an offsite output, which --overwrite may replace: a bundle, an adapter file,
# a (plugged) model directory.
OUTPUT_MARKERS = (MANIFEST, ADAPTER_METADATA, MODEL_CONFIG)


def one_line(text: str, limit: int | None = 200) -> str:
    """A string from the other party as it may reach a terminal: control characters (newlines, escape codes)
    escaped, so it stays on one line and cannot move the cursor or recolour the screen; cut short at `limit`."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if limit is None or len(shown) <= limit else shown[:limit] + "…"


def is_version(value: Any, version: int) -> bool:
    """`value` is the integer `version` (JSON's true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value == version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashing(source: Path, target: Path) -> str:
    """Copy `source` to `target` and return the SHA-256 of exactly the bytes copied."""
    digest = hashlib.sha256()
    descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # a symlink swapped in is not followed
    with os.fdopen(descriptor, "rb") as reader, open(target, "wb") as writer:
        for chunk in iter(lambda: reader.read(1 << 22), b""):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; what the block writes there replaces `path` only if it succeeds."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON to a temp name beside `path`, then rename over it."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_bytes(path: Path, flag: str = "") -> bytes:
    """A file's bytes, or a one-line error naming it (and the flag that named it) and the fix."""
    named = f"{flag} {path}" if flag else str(path)
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise OffsiteError(f"{named} is a directory; pass a file") from None
    except PermissionError:
        raise OffsiteError(f"{named} cannot be read (permission denied); make it readable or pass a copy") from None


def read_text(path: Path, flag: str = "") -> str:
    """A UTF-8 text file's contents, or a one-line error naming it (and the flag that named it) and the fix."""
    return decode_utf8(read_bytes(path, flag), f"{flag} {path}" if flag else str(path))


def decode_utf8(data: bytes, named: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise OffsiteError(f"{named} is not UTF-8 text (byte {error.start}); convert it to UTF-8 "
                           "(e.g. iconv -t UTF-8)") from None


# offsite.json, adapter.json and model configs are kilobytes; a bigger one is damaged or hostile.
JSON_LIMIT = 64 * 2**20


def read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_bytes(path, what)[1]


def read_json_bytes(path: Path, what: str) -> tuple[bytes, dict[str, Any]]:
    """A JSON object file's bytes, read once, and the object they hold (e.g. to verify a signature of them)."""
    try:
        if path.is_file() and path.stat().st_size > JSON_LIMIT:
            raise OffsiteError(f"{path} is larger than {JSON_LIMIT >> 20} MiB; it cannot be {what}'s JSON")
        raw = read_bytes(path)
        data = json.loads(decode_utf8(raw, str(path)))
    except FileNotFoundError:
        raise OffsiteError(f"{path.parent} is not {what}: {path.name} is missing") from None
    except json.JSONDecodeError as error:
        raise OffsiteError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    except RecursionError:
        raise OffsiteError(f"{path} nests too deeply to be {what}'s JSON") from None
    if not isinstance(data, dict):
        raise OffsiteError(f"{path} must hold a JSON object")
    return raw, data


def check_output_dir(output: str | Path, overwrite: bool, flag: str = "-o/--output",
                     inputs: tuple[str | Path, ...] = (), markers: tuple[str, ...] | None = OUTPUT_MARKERS) -> Path:
    """Refuse to replace existing data unless asked, before any long work starts.

    `inputs` are the paths the command reads: even with --overwrite, an output may not replace one of them.
    `markers`: --overwrite replaces a directory only if it holds one of these files (None: any directory).
    """
    path = Path(output)
    if path.is_symlink():
        raise OffsiteError(f"{flag} {path} is a symlink; pass the directory it points to, or another path")
    if path.exists() and not path.is_dir():
        raise OffsiteError(f"{flag} {path} exists and is not a directory; choose another path")
    if path.resolve() == Path.cwd().resolve() or path.resolve() in Path.cwd().resolve().parents:
        raise OffsiteError(f"{flag} {path} is the current directory or above it; choose a new directory")
    _check_inputs_kept(path, flag, inputs)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OffsiteError(f"{flag} {path} already exists and is not empty; pass --overwrite or choose another "
                               "path")
        if markers is not None and not any((path / marker).is_file() for marker in markers):
            raise OffsiteError(f"{flag} {path} is not an offsite output (no {', '.join(markers)}); "
                               "--overwrite replaces only those, so your files stay: choose another path")
    _check_writable_parent(path, flag)
    return path


def check_output_file(output: str | Path, overwrite: bool, flag: str = "-o/--output") -> Path:
    """The file counterpart of check_output_dir."""
    path = Path(output)
    if path.is_dir():
        raise OffsiteError(f"{flag} {path} is a directory; pass a file path")
    if path.exists() and not overwrite:
        raise OffsiteError(f"{flag} {path} already exists; pass --overwrite or choose another path")
    _check_writable_parent(path, flag)
    return path


def _check_inputs_kept(path: Path, flag: str, inputs: tuple[str | Path, ...]) -> None:
    target = path.resolve()
    for source in inputs:
        resolved = Path(source).resolve()
        if Path(source).exists() and (resolved == target or target in resolved.parents):
            raise OffsiteError(f"{flag} {path} would replace the input {source}; choose another path")


def _check_writable_parent(path: Path, flag: str) -> None:
    """The output's nearest existing ancestor must be a directory we may write into (parents are created)."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OffsiteError(f"{flag} {path}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OffsiteError(f"{flag} {path}: cannot write into {ancestor} (permission denied); choose another path")


def _remove_stale(final: Path) -> None:
    """Temp directories of earlier runs on `final` that were killed (their process is gone) are removed."""
    for stale in final.parent.glob(f".{glob.escape(final.name)}.tmp-*-*"):
        pid = stale.name[len(final.name) + 6:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(output: str | Path, overwrite: bool = False,
               markers: tuple[str, ...] | None = OUTPUT_MARKERS) -> Iterator[Path]:
    """Yield a temp directory that replaces `output` only if the block succeeds (`markers`: see check_output_dir)."""
    final = check_output_dir(output, overwrite, markers=markers)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become the output's mode
    except OSError as error:
        raise OffsiteError(f"-o/--output {final}: cannot create a directory there ({error.strerror}); "
                           "choose another path") from None
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
