"""The migration path: an agent enrolled before TUF gets its first TUF root without re-enrolling.

Such an agent trusts only the manifest keys it received at enrollment (``Identity.trusted_keys``). The control
plane therefore serves its current root together with a *root pin*: an ed25519 signature, by the registry's
manifest signing key, over a domain-separated statement ``slmops-tuf-root-pin/v1\\n<sha256 of the root bytes>``
(so no manifest signature can ever be taken for a pin, nor a pin for a manifest signature). The agent checks the
pin against the keys it already trusts, checks the root is signed to its own threshold, and stores it as its TUF
trust anchor; from then on only TUF's own root chain (``N.root.json`` signed by old and new root keys) moves it.

Once an agent holds a root, TUF is mandatory for it: a control plane that stops serving TUF metadata cannot turn
it off again. An agent that has no root and finds no pin (404) keeps today's behaviour (signature check only).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from slmops.core.manifest import Signature
from slmops.errors import SignatureError
from slmops.registry.signing import LocalSigner

__all__ = ["RootPin", "pin_message", "sign_root_pin", "verify_root_pin"]

_DOMAIN = b"slmops-tuf-root-pin/v1\n"


class RootPin(BaseModel):
    """``GET /api/v1/tuf/bootstrap``: the current root's bytes and a manifest-key signature over them."""

    model_config = ConfigDict(frozen=True)

    version: int = Field(ge=1)
    root: str = Field(max_length=512_000)  # the root metadata JSON, exactly as served at N.root.json
    signature: Signature


def pin_message(root_bytes: bytes) -> bytes:
    return _DOMAIN + hashlib.sha256(root_bytes).hexdigest().encode("ascii")


def sign_root_pin(root_bytes: bytes, version: int, signer: LocalSigner) -> RootPin:
    return RootPin(version=version, root=root_bytes.decode("utf-8"), signature=signer.sign(pin_message(root_bytes)))


def verify_root_pin(pin: RootPin, trusted: dict[str, Ed25519PublicKey]) -> bytes:
    """The pinned root's bytes, if a key the agent already trusts signed the pin; otherwise :class:`SignatureError`."""
    public = trusted.get(pin.signature.key_id)
    if public is None:
        raise SignatureError(
            f"the TUF root pin is signed by key {pin.signature.key_id}, which this device does not trust "
            f"(it trusts {', '.join(sorted(trusted)) or 'no key'}); re-enroll or install the root by hand"
        )
    data = pin.root.encode("utf-8")
    try:
        public.verify(base64.b64decode(pin.signature.value, validate=True), pin_message(data))
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(
            "the TUF root pin's signature does not verify; the root or the pin was tampered with"
        ) from None
    return data
