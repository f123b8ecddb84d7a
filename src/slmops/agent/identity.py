"""The device's identity: its ed25519 key, its id and credential, and the manifest keys it trusts."""

from __future__ import annotations

import base64
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from slmops.agent._files import atomic_write
from slmops.agent.state import DataDir
from slmops.core.wire import claim_message
from slmops.errors import ConfigError
from slmops.registry.signing import format_public_key, key_id_for, parse_public_key

__all__ = ["DeviceKey", "Identity", "IdentityStore"]


class Identity(BaseModel):
    model_config = ConfigDict(frozen=True)

    server_url: str
    device_id: str
    state: Literal["pending", "approved"]
    trusted_keys: list[str] = Field(default_factory=list)
    poll_interval_s: float = 30.0

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        keys: dict[str, Ed25519PublicKey] = {}
        for text in self.trusted_keys:
            public = parse_public_key(text, "a trusted manifest key from the control plane")
            keys[key_id_for(public)] = public
        return keys


class DeviceKey:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private

    @property
    def public_text(self) -> str:
        return format_public_key(self.private.public_key()).strip()

    def sign_claim(self, device_id: str, timestamp: int) -> str:
        return base64.b64encode(self.private.sign(claim_message(device_id, timestamp))).decode("ascii")


class IdentityStore:
    def __init__(self, data: DataDir) -> None:
        self.data = data

    def key(self) -> DeviceKey:
        """The device key, created (mode 0600) on first use."""
        path = self.data.key_file
        if not path.exists():
            private = Ed25519PrivateKey.generate()
            pem = private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            atomic_write(path, pem, 0o600)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an ed25519 private key; move it away to create a new device identity")
        return DeviceKey(loaded)

    def identity(self) -> Identity | None:
        try:
            return Identity.model_validate_json(self.data.identity_file.read_bytes())
        except FileNotFoundError:
            return None

    def save_identity(self, identity: Identity) -> None:
        atomic_write(self.data.identity_file, identity.model_dump_json(indent=1).encode("utf-8"), 0o600)

    def credential(self) -> str | None:
        try:
            return self.data.credential_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def save_credential(self, credential: str) -> None:
        atomic_write(self.data.credential_file, credential.encode("utf-8"), 0o600)
