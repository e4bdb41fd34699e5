"""Receiving an adapter file: a multipart upload streamed into the state dir, then checked as `plug` checks it.

The request is `multipart/form-data` with two parts, `weights` (adapter.safetensors) and `metadata`
(adapter.json), as `curl -F weights=@adapter/adapter.safetensors -F metadata=@adapter/adapter.json` sends them.
Bytes are counted as they arrive and the upload is cut off past the size limit; a file name that is a path
is refused. Nothing is written outside the upload's folder under the state dir.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import AsyncIterator, BinaryIO

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from offsite.constants import ADAPTER_METADATA, ADAPTER_WEIGHTS

PARTS = {"weights": ADAPTER_WEIGHTS, "metadata": ADAPTER_METADATA}


class UploadError(Exception):
    """A refused upload: the HTTP status and the message the customer gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _safe_name(filename: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9._-]{1,128}", filename)) and filename not in (".", "..")


async def receive(content_type: str, declared: str | None, body: AsyncIterator[bytes], folder: Path,
                  limit: int) -> None:
    """Stream the upload's two parts into `folder` as adapter.safetensors and adapter.json."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, "send multipart/form-data with the parts 'weights' (adapter.safetensors) and "
                               "'metadata' (adapter.json)")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"the upload ({int(declared)} bytes) is over this service's limit of {limit} bytes")
    receiver = _Receiver(folder)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    total = 0
    try:
        async for chunk in body:
            total += len(chunk)
            if total > limit:
                raise UploadError(413, f"the upload is over this service's limit of {limit} bytes")
            parser.write(chunk)
            receiver.raise_problem()
        parser.finalize()
    finally:
        receiver.close()
    receiver.raise_problem()
    missing = sorted(set(PARTS) - receiver.received)
    if missing or receiver.open_part:
        raise UploadError(400, f"the upload is incomplete (missing or cut-off parts: {missing or [receiver.open_part]})")


class _Receiver:
    """python-multipart's callbacks: each part's headers checked, its data written to its file in `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.received: set[str] = set()
        self.problem: UploadError | None = None
        self.open_part: str | None = None
        self._field, self._value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        self._file: BinaryIO | None = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done, "on_part_data": self._data, "on_part_end": self._end}

    def raise_problem(self) -> None:
        if self.problem is not None:
            raise self.problem

    def _begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename", b"").decode("utf-8", "replace")
        if self.problem is not None:
            return
        if name not in PARTS:
            self.problem = UploadError(400, f"unexpected part {name!r}; send 'weights' and 'metadata'")
        elif filename and not _safe_name(filename):
            self.problem = UploadError(400, f"part {name!r}: file name {filename[:80]!r} is a path or holds odd "
                                            "characters; send a plain file name")
        elif name in self.received:
            self.problem = UploadError(400, f"part {name!r} was sent twice")
        else:
            self.open_part = name
            self._file = open(self.folder / PARTS[name], "wb")  # noqa: SIM115 - closed by _end or close()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.received.add(self.open_part)
            self.open_part = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
