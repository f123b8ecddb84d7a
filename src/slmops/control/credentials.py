"""Credentials: who a bearer secret belongs to, and the operators' API tokens.

An operator calls with an API token (``slmops_op_...``, a name and a role); a device with the credential it claimed
(``slmops_dev_...``). Only hashes are stored (see :mod:`slmops.control.auth`). The last active admin token cannot be
revoked, so an operator can never lock every admin out of the API.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.control.auth import DEVICE_PREFIX, OPERATOR_PREFIX, Principal, hash_secret, new_secret
from slmops.control.db import ApiTokenRow
from slmops.control.repository import ControlRepository
from slmops.control.schemas import ApiTokenCreated, ApiTokenPublic, Role
from slmops.errors import AuthenticationError, ConflictError, NotFoundError, PermissionDeniedError

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = ["CredentialCache", "authenticate", "create_api_token", "list_api_tokens", "revoke_api_token"]


class CredentialCache:
    """Approved devices' credentials checked recently: credential hash -> (device id, valid until)."""

    MAX_ENTRIES = 200_000

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, float]] = {}

    def device_for(self, credential_hash: str) -> str | None:
        cached = self._entries.get(credential_hash)
        return cached[0] if cached is not None and cached[1] > time.monotonic() else None

    def remember(self, credential_hash: str, device_id: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        if len(self._entries) > self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[credential_hash] = (device_id, time.monotonic() + ttl_s)

    def clear(self) -> None:
        """Forget every credential (after one was replaced or a device lost its approval)."""
        self._entries.clear()


def authenticate(plane: ControlPlane, secret: str) -> Principal:
    """The caller of a credential. An approved device's credential is remembered for ``auth_cache_ttl_s`` (a
    heartbeat then costs no credential query); revoking, decommissioning or re-claiming a device through this
    process forgets it at once, through another replica within the TTL."""
    token_hash = hash_secret(secret)
    if secret.startswith(DEVICE_PREFIX):
        cached = plane.credential_cache.device_for(token_hash)
        if cached is not None:
            return Principal("device", cached)
    with Session(plane.engine) as session:
        repo = ControlRepository(session)
        if secret.startswith(DEVICE_PREFIX):
            device = repo.device_by_credential(token_hash)
            if device is None:
                raise AuthenticationError("unknown or replaced device credential; claim a new one or re-enroll")
            if device.state != "approved":
                raise PermissionDeniedError(f"device {device.id} is {device.state}; it may not call the API")
            plane.credential_cache.remember(token_hash, device.id, plane.settings.auth_cache_ttl_s)
            return Principal("device", device.id)
        token = repo.api_token_by_hash(token_hash)
        if token is None or token.revoked:
            raise AuthenticationError(
                "unknown or revoked API token; create one with `slmops token create --role ROLE --name NAME`"
            )
        return Principal("operator", token.name, token.role)  # type: ignore[arg-type]


def create_api_token(plane: ControlPlane, name: str, role: Role, created_by: str) -> ApiTokenCreated:
    secret = new_secret(OPERATOR_PREFIX)
    row = ApiTokenRow(
        name=name,
        role=role,
        token_hash=hash_secret(secret),
        created_at=plane.now_iso(),
        created_by=created_by,
        revoked=False,
    )
    with Session(plane.engine) as session:
        repo = ControlRepository(session)
        if repo.api_token(name) is not None:
            raise ConflictError(f"an API token named '{name}' exists already; pick another name or revoke it")
        try:
            repo.add_api_token(row)
            session.commit()
        except SQLIntegrityError:
            raise ConflictError(f"an API token named '{name}' exists already; pick another name") from None
        return ApiTokenCreated(**_token_public(row).model_dump(), token=secret)


def list_api_tokens(plane: ControlPlane) -> list[ApiTokenPublic]:
    with Session(plane.engine) as session:
        return [_token_public(row) for row in ControlRepository(session).api_tokens()]


def revoke_api_token(plane: ControlPlane, name: str) -> ApiTokenPublic:
    """Revoke a token at once; the last active admin token is refused (create another admin token first)."""
    with Session(plane.engine) as session:
        repo = ControlRepository(session)
        row = repo.api_token(name)
        if row is None:
            raise NotFoundError(f"no API token named '{name}' (list them with `slmops token list`)")
        if not row.revoked:
            if not repo.revoke_api_token(name):
                raise ConflictError(
                    f"API token '{name}' is the last active admin token; revoking it would leave nobody able to "
                    "manage tokens. Create another admin token first "
                    "(`slmops token create --role admin --name NAME`), then revoke this one"
                )
            session.commit()
        return _token_public(row)


def _token_public(row: ApiTokenRow) -> ApiTokenPublic:
    return ApiTokenPublic.model_validate(row, from_attributes=True)
