"""Optional Ed25519 signatures of the two exchanged files: who made this bundle, or this adapter file?

Hashes catch damage inside a file set; a signature also catches a sender who rewrote the whole set.
What is signed is the metadata file (`offsite.json` of a bundle, `adapter.json` of an adapter file),
which holds the SHA-256 of every other file, so one signature covers everything. The signature sits
beside it (`offsite.json.sig`, `adapter.json.sig`) as JSON. Keys are PEM files: `offsite keygen KEY`
writes the private KEY (mode 0600) and the public KEY.pub, which the other party passes to `--trust`.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite.errors import OffsiteError
from offsite.files import atomic_file, check_output_file, read_json, write_json

SIGNATURE_SUFFIX = ".sig"
FORMAT = "offsite-signature"


def keygen(path: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new private key to `path` (readable by its owner only) and its public key to `path`.pub."""
    private, public = check_output_file(path, overwrite, "KEY"), Path(f"{path}.pub")
    check_output_file(public, overwrite, "KEY")
    key = Ed25519PrivateKey.generate()
    with atomic_file(private) as tmp:
        tmp.touch(mode=0o600)
        tmp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    with atomic_file(public) as tmp:
        tmp.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def check_private_key(path: str | Path) -> None:
    """Refuse a --sign KEY that is not an Ed25519 private key, before any work."""
    _private_key(path)


def _private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise OffsiteError(f"--sign {path}: not a private key made by `offsite keygen` ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise OffsiteError(f"--sign {path}: not an Ed25519 private key; make one with `offsite keygen KEY`")
    return key


def _public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as error:
        raise OffsiteError(f"--trust {path}: not a public key (KEY.pub of `offsite keygen`) ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise OffsiteError(f"--trust {path}: not an Ed25519 public key")
    return key


def sign(metadata: Path, key: str | Path) -> Path:
    """Sign the bytes of `metadata`; write the signature beside it."""
    private = _private_key(key)
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = private.sign(metadata.read_bytes())
    target = metadata.with_name(metadata.name + SIGNATURE_SUFFIX)
    write_json(target, {"format": FORMAT, "algorithm": "ed25519", "signed_file": metadata.name,
                        "public_key": base64.b64encode(public).decode(), "signature": base64.b64encode(signature).decode()})
    return target


def verify(metadata_bytes: bytes, metadata: Path, trust: str | Path) -> None:
    """Refuse `metadata` (as read, once) unless its signature is valid under the trusted public key."""
    target = metadata.with_name(metadata.name + SIGNATURE_SUFFIX)
    if not target.is_file():
        raise OffsiteError(f"{metadata.parent} is not signed ({target.name} is missing), and --trust {trust} asks for "
                           "a signature: ask the sender to sign it (--sign KEY)")
    document: dict[str, Any] = read_json(target, "a signature")
    try:
        signature = base64.b64decode(document["signature"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise OffsiteError(f"{target}: field 'signature' is missing or not base64") from None
    try:
        _public_key(trust).verify(signature, metadata_bytes)
    except InvalidSignature:
        raise OffsiteError(f"{metadata} is not signed by the key --trust {trust} names (or was changed after "
                           "signing); refusing it") from None


def signature_file(metadata_name: str) -> str:
    return metadata_name + SIGNATURE_SUFFIX


