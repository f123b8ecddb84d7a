"""ed25519 keys for TUF roles as PKCS#8 PEM files, loaded as ``securesystemslib`` signers.

Offline roles (root, targets) keep their keys in the operator's TUF directory (``slmops keys tuf init``), one file
per key, e.g. ``keys/root-1.key``; online roles (snapshot, timestamp) keep theirs on the control plane under
``<SLMOPS_HOME>/keys/tuf-online``. A key file is written once, mode 0600, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Key, SSlibKey  # type: ignore[attr-defined]

from slmops.errors import ConfigError

__all__ = ["create_key_file", "key_from_dict", "key_to_dict", "load_signer"]


def create_key_file(path: Path) -> CryptoSigner:
    """A new ed25519 key written to ``path`` (refused when the file exists: keys are never silently replaced)."""
    if path.exists():
        raise ConfigError(f"a key already exists at {path}; move it away first if you really mean to replace it")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return CryptoSigner(private)


def load_signer(path: Path) -> CryptoSigner:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no TUF key at {path}; create the keys with `slmops keys tuf init`") from None
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise ConfigError(f"the TUF key {path} is unreadable ({exc}); restore it from its backup") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"the TUF key {path} is not an ed25519 key")
    return CryptoSigner(private)


def key_to_dict(key: Key) -> dict[str, Any]:
    return {"keyid": key.keyid, **key.to_dict()}


def key_from_dict(data: dict[str, Any]) -> Key:
    body = {k: v for k, v in data.items() if k != "keyid"}
    try:
        key = SSlibKey.from_dict(str(data["keyid"]), body)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"not a TUF public key (keyid, keytype, scheme, keyval): {exc}") from None
    return key
