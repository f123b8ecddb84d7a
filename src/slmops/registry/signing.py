"""ed25519 signing of manifests, and the set of keys this registry trusts.

Layout under ``<SLMOPS_HOME>/keys``::

    signing.key            this registry's private key (PKCS#8 PEM, mode 0600)
    trusted/<key_id>.pub   public keys whose signatures we accept, one line "ed25519 <base64>"

A signature signs the manifest's canonical JSON bytes, i.e. exactly the bytes whose sha256 is its digest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slmops.core.manifest import Signature, SignedManifest
from slmops.errors import ConfigError, ConflictError, SignatureError

__all__ = [
    "KeyRing",
    "LocalSigner",
    "format_public_key",
    "key_id_for",
    "parse_public_key",
    "verify_envelope",
]

log = logging.getLogger(__name__)
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def key_id_for(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def format_public_key(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"ed25519 {base64.b64encode(raw).decode('ascii')}\n"


def parse_public_key(text: str, source: str = "public key") -> Ed25519PublicKey:
    parts = text.strip().split()
    if len(parts) != 2 or parts[0] != "ed25519":
        raise SignatureError(f"{source} must be one line 'ed25519 <base64 of 32 bytes>', got {text[:60]!r}")
    try:
        raw = base64.b64decode(parts[1], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{source} is not a valid ed25519 public key: {exc}") from None


@dataclass(frozen=True)
class LocalSigner:
    key_id: str
    private_key: Ed25519PrivateKey

    def sign(self, data: bytes) -> Signature:
        value = base64.b64encode(self.private_key.sign(data)).decode("ascii")
        return Signature(key_id=self.key_id, value=value)


def verify_envelope(envelope: SignedManifest, trusted: dict[str, Ed25519PublicKey]) -> str:
    """Check the digest and at least one trusted signature; returns the key id that verified."""
    canonical = envelope.manifest.canonical()
    actual = "sha256:" + hashlib.sha256(canonical).hexdigest()
    name = f"{envelope.manifest.name}@{envelope.manifest.version}"
    if actual != envelope.digest:
        raise SignatureError(
            f"manifest {name} was changed: its recorded digest is {envelope.digest} but its content hashes to {actual}"
        )
    if not envelope.signatures:
        raise SignatureError(f"manifest {name} ({envelope.digest}) is not signed")
    unknown: list[str] = []
    for signature in envelope.signatures:
        public = trusted.get(signature.key_id)
        if public is None:
            unknown.append(signature.key_id)
            continue
        try:
            public.verify(base64.b64decode(signature.value, validate=True), canonical)
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(
                f"manifest {name} ({envelope.digest}) has a signature by key {signature.key_id} that does not verify; "
                "the manifest or its signature was tampered with"
            ) from None
        return signature.key_id
    raise SignatureError(
        f"manifest {name} is signed only by untrusted key(s) {', '.join(unknown)}; "
        "trust the signer with `slmops keys trust KEYFILE` if you know it"
    )


class KeyRing:
    """The signing key and trusted public keys kept in one directory."""

    def __init__(self, key_dir: Path) -> None:
        self.key_dir = key_dir
        self._private_path = key_dir / "signing.key"
        self._trusted_dir = key_dir / "trusted"

    @property
    def has_signing_key(self) -> bool:
        return self._private_path.is_file()

    def init(self, force: bool = False) -> str:
        """Create this registry's signing key; returns its key id."""
        if self.has_signing_key and not force:
            raise ConflictError(
                f"a signing key already exists at {self._private_path} (key {self.signer().key_id}); "
                "pass --force to replace it (manifests signed by the old key stay trusted)"
            )
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.key_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.key_dir, 0o700)
        tmp = self._private_path.with_name(".signing.key.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._private_path)
        return self.trust(format_public_key(private.public_key()))

    def ensure_signing_key(self) -> LocalSigner:
        if not self.has_signing_key:
            key_id = self.init()
            log.warning("created signing key %s in %s (back it up; `slmops keys show` prints it)", key_id, self.key_dir)
        return self.signer()

    def signer(self) -> LocalSigner:
        try:
            pem = self._private_path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"no signing key at {self._private_path}; run `slmops keys init`") from None
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except ValueError as exc:
            raise ConfigError(
                f"the signing key {self._private_path} is unreadable ({exc}); restore it from backup"
            ) from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(f"the signing key {self._private_path} is not an ed25519 key")
        return LocalSigner(key_id_for(private.public_key()), private)

    def trust(self, public_key_text: str, source: str = "public key") -> str:
        public = parse_public_key(public_key_text, source)
        key_id = key_id_for(public)
        self._trusted_dir.mkdir(parents=True, exist_ok=True)
        target = self._trusted_dir / f"{key_id}.pub"
        if not target.exists():
            tmp = target.with_name(f".{key_id}.tmp")
            tmp.write_text(format_public_key(public))
            os.replace(tmp, target)
        return key_id

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        keys: dict[str, Ed25519PublicKey] = {}
        if not self._trusted_dir.is_dir():
            return keys
        for path in sorted(self._trusted_dir.glob("*.pub")):
            if not _KEY_ID_RE.match(path.stem):
                continue
            public = parse_public_key(path.read_text(), str(path))
            if key_id_for(public) == path.stem:
                keys[path.stem] = public
        return keys

    def public_key_text(self, key_id: str) -> str:
        path = self._trusted_dir / f"{key_id}.pub"
        if not _KEY_ID_RE.match(key_id) or not path.is_file():
            raise SignatureError(f"no trusted public key {key_id!r} in {self._trusted_dir}")
        return path.read_text()
