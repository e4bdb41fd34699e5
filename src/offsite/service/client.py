"""`offsite remote`: a customer's side of the service (httpx): bundles down, adapters up, requests through them.

The token comes from `--token` or the environment (`OFFSITE_TOKEN`), so it need not be on a command line.
A bundle download is resumable: files land in `OUT.partial/` and an interrupted file continues with an HTTP
range request; each file is checked against the SHA-256 the service sends, and the whole bundle against its
manifest (`check_bundle`) before it is moved to OUT.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from offsite.constants import ADAPTER_METADATA, ADAPTER_WEIGHTS
from offsite.errors import OffsiteError
from offsite.exchange.bundle import check_bundle

TOKEN_ENV = "OFFSITE_TOKEN"
CHUNK = 1 << 20


class Remote:
    def __init__(self, url: str, token: str | None, timeout: float = 300.0):
        token = token or os.environ.get(TOKEN_ENV)
        if not token:
            raise OffsiteError(f"no token: pass --token or set {TOKEN_ENV} (the model owner gives it with "
                               "`offsite serve --add-customer NAME`)")
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise OffsiteError(f"{self.url} answered {response.status_code}: {message}")
        return response.json()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return self._json(self.http.request(method, path, **kwargs))
        except httpx.HTTPError as error:
            raise OffsiteError(f"cannot reach {self.url}: {error}") from error

    def bundles(self) -> list[dict[str, Any]]:
        return self._call("GET", "/bundles")

    def adapters(self) -> list[dict[str, Any]]:
        return self._call("GET", "/adapters")

    def upload(self, adapter: str | Path, bundle: str) -> dict[str, Any]:
        folder = Path(adapter)
        if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder / ADAPTER_METADATA).is_file():
            raise OffsiteError(f"adapter {adapter}: expected {ADAPTER_WEIGHTS} and {ADAPTER_METADATA} in it "
                               "(made by `offsite tune`)")
        with open(folder / ADAPTER_WEIGHTS, "rb") as weights, open(folder / ADAPTER_METADATA, "rb") as metadata:
            return self._call("POST", "/adapters", params={"bundle": bundle},
                              files={"weights": (ADAPTER_WEIGHTS, weights), "metadata": (ADAPTER_METADATA, metadata)})

    def complete(self, adapter: str, prompt: str, max_tokens: int = 16) -> dict[str, Any]:
        return self._call("POST", "/v1/completions", json={"adapter": adapter, "prompt": prompt,
                                                           "max_tokens": max_tokens})

    def score(self, adapter: str, prompt: str, continuations: list[str]) -> dict[str, Any]:
        return self._call("POST", "/v1/score", json={"adapter": adapter, "prompt": prompt,
                                                     "continuations": continuations})

    def download(self, bundle: str, output: str | Path) -> Path:
        """Fetch every file of `bundle` into `output` (resuming an earlier attempt), checked before it is kept."""
        output = Path(output)
        if output.exists():
            raise OffsiteError(f"-o {output} exists; choose another folder")
        partial = output.with_name(output.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        for entry in self._call("GET", f"/bundles/{bundle}")["files"]:
            self._fetch(bundle, entry, partial / entry["name"])
        check_bundle(partial)  # every file against the manifest, before the folder is called a bundle
        partial.rename(output)
        return output

    def _fetch(self, bundle: str, entry: dict[str, Any], path: Path) -> None:
        have = path.stat().st_size if path.exists() else 0
        if have > entry["bytes"]:
            path.unlink()
            have = 0
        if have < entry["bytes"] or not path.exists():
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with self.http.stream("GET", f"/bundles/{bundle}/files/{entry['name']}", headers=headers) as response:
                    if response.status_code >= 400:
                        self._json(response.read() and response)
                    mode = "ab" if response.status_code == 206 else "wb"  # a server ignoring the range sends it all
                    with open(path, mode) as handle:
                        for chunk in response.iter_bytes(CHUNK):
                            handle.write(chunk)
            except httpx.HTTPError as error:
                raise OffsiteError(f"download of {entry['name']} interrupted ({error}); run the same command again "
                                   "to resume it") from error
        if entry["sha256"] is not None and _sha256(path) != entry["sha256"]:
            path.unlink()
            raise OffsiteError(f"{entry['name']} arrived damaged (SHA-256 differs); run the command again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def start_server(arguments: list[str], port: int, seconds: float = 300.0, **popen: Any) -> subprocess.Popen:
    """`offsite serve ARGUMENTS --port PORT` in a new process, returned once `/health` answers on 127.0.0.1
    (for load tests and tests; an error with its output if it exits or does not answer within `seconds`)."""
    process = subprocess.Popen([sys.executable, "-m", "offsite.cli", "serve", *arguments, "--port", str(port)],
                               **popen)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise OffsiteError(f"offsite serve exited with status {process.returncode}: {output[-2000:]}")
    process.kill()
    raise OffsiteError(f"offsite serve did not answer on port {port} within {seconds:.0f} s")
