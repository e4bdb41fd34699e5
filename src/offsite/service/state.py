"""The service's state under `--state DIR`: customers and their tokens, adapters, and an audit log, in SQLite;
adapter files on disk, content-addressed.

    DIR/state.sqlite            customers, adapters, audit (WAL journal: a crash loses no committed row)
    DIR/adapters/<id>/          adapter.safetensors + adapter.json; <id> is the SHA-256 of both
    DIR/incoming/               uploads being received and checked; emptied at every start

An adapter is registered by one transaction after its folder is in place, so a crash at any point leaves
either nothing registered (an unregistered folder is removed at the next start) or the whole adapter.

A token is `ofs_<key id>_<secret>`; only a salted SHA-256 of the secret is stored, and it is compared in
constant time. The secret is 32 random bytes, so a fast hash is enough: there is nothing to guess.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from offsite.errors import OffsiteError

DATABASE = "state.sqlite"
ADAPTERS = "adapters"
INCOMING = "incoming"
TOKEN_PREFIX = "ofs"

SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    name TEXT PRIMARY KEY, key_id TEXT UNIQUE NOT NULL, salt BLOB NOT NULL, secret_hash BLOB NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    id TEXT PRIMARY KEY, customer TEXT NOT NULL REFERENCES customers(name), bundle TEXT NOT NULL,
    fingerprint TEXT NOT NULL, layers TEXT NOT NULL, bytes INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, customer TEXT, action TEXT NOT NULL,
    target TEXT, detail TEXT);
"""


def hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


class ServiceState:
    """Customers, adapters and the audit log of one service; safe to share between the server's threads."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ADAPTERS).mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.root / DATABASE, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.recover()

    def recover(self) -> None:
        """Drop what an interrupted run left: half-received uploads and adapter folders never registered."""
        shutil.rmtree(self.root / INCOMING, ignore_errors=True)
        (self.root / INCOMING).mkdir()
        known = {row[0] for row in self.db.execute("SELECT id FROM adapters")}
        for folder in (self.root / ADAPTERS).iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)

    # --- customers ---------------------------------------------------------------------------------

    def add_customer(self, name: str) -> str:
        """Register `name`; return its token, which is shown once and stored only as a salted hash."""
        if not name or not all(c.isalnum() or c in "-_." for c in name) or len(name) > 64:
            raise OffsiteError(f"--add-customer {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_bytes(16)
        with self._lock:
            try:
                self.db.execute("INSERT INTO customers VALUES (?, ?, ?, ?, ?)",
                                (name, key_id, salt, hash_secret(salt, secret), time.time()))
            except sqlite3.IntegrityError as error:
                raise OffsiteError(f"--add-customer {name}: a customer of that name exists") from error
        self.audit(name, "customer added")
        return f"{TOKEN_PREFIX}_{key_id}_{secret}"

    def customer_of(self, token: str | None) -> str | None:
        """The customer a token belongs to, or None; the secret is compared in constant time."""
        prefix, _, rest = (token or "").partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != TOKEN_PREFIX or not key_id or not secret:
            return None
        with self._lock:
            row = self.db.execute("SELECT name, salt, secret_hash FROM customers WHERE key_id = ?",
                                  (key_id,)).fetchone()
        if row is None:
            hmac.compare_digest(hash_secret(b"0" * 16, secret), b"0" * 32)  # same work as a known key id
            return None
        name, salt, expected = row
        return name if hmac.compare_digest(hash_secret(salt, secret), expected) else None

    def customers(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self.db.execute("SELECT name FROM customers ORDER BY name")]

    # --- adapters ----------------------------------------------------------------------------------

    def incoming(self) -> Path:
        """A fresh folder under the state dir for one upload (removed by the caller, or at the next start)."""
        return Path(tempfile.mkdtemp(dir=self.root / INCOMING))

    def register_adapter(self, customer: str, bundle: str, folder: Path, adapter_id: str, fingerprint: str,
                         layers: list[int]) -> str:
        """Move a checked adapter `folder` to its content address and register it for `customer`.

        The same file uploaded again by the same customer is the same adapter; by another customer it is
        refused (content ids are shared, so one customer could otherwise learn of another's adapter).
        """
        target = self.root / ADAPTERS / adapter_id
        size = sum(p.stat().st_size for p in folder.iterdir())
        with self._lock:
            row = self.db.execute("SELECT customer FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
            if row is not None:
                shutil.rmtree(folder, ignore_errors=True)
                if row[0] != customer:
                    raise OffsiteError("this adapter file is registered already")
                return adapter_id
            folder.rename(target)  # same file system: atomic
            self.db.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (adapter_id, customer, bundle, fingerprint, ",".join(map(str, layers)), size, time.time()))
        self.audit(customer, "adapter uploaded", adapter_id, f"bundle {bundle}, {size} bytes")
        return adapter_id

    def adapter(self, adapter_id: str, customer: str) -> dict[str, Any] | None:
        """The adapter's record, only if it is `customer`'s (another's is as absent as an unknown one)."""
        with self._lock:
            row = self.db.execute("SELECT id, bundle, fingerprint, layers, bytes, created FROM adapters "
                                  "WHERE id = ? AND customer = ?", (adapter_id, customer)).fetchone()
        return _adapter_record(row) if row else None

    def adapters_of(self, customer: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute("SELECT id, bundle, fingerprint, layers, bytes, created FROM adapters "
                                   "WHERE customer = ? ORDER BY created", (customer,)).fetchall()
        return [_adapter_record(row) for row in rows]

    def all_adapters(self) -> list[tuple[str, str]]:
        """(adapter id, customer) of every registered adapter, for loading them at start."""
        with self._lock:
            return list(self.db.execute("SELECT id, customer FROM adapters ORDER BY created"))

    def adapter_folder(self, adapter_id: str) -> Path:
        return self.root / ADAPTERS / adapter_id

    # --- audit -------------------------------------------------------------------------------------

    def audit(self, customer: str | None, action: str, target: str | None = None, detail: str | None = None) -> None:
        with self._lock:
            self.db.execute("INSERT INTO audit (time, customer, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                            (time.time(), customer, action, target, detail))

    def audit_log(self, customer: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT time, customer, action, target, detail FROM audit"
        with self._lock:
            rows = (self.db.execute(query + " WHERE customer = ? ORDER BY id", (customer,)) if customer
                    else self.db.execute(query + " ORDER BY id")).fetchall()
        return [dict(zip(("time", "customer", "action", "target", "detail"), row)) for row in rows]

    def close(self) -> None:
        self.db.close()


def _adapter_record(row: tuple) -> dict[str, Any]:
    adapter_id, bundle, fingerprint, layers, size, created = row
    return {"id": adapter_id, "bundle": bundle, "fingerprint": fingerprint,
            "layers": [int(i) for i in layers.split(",")], "bytes": size, "created": created}
