"""Credentials: who a bearer secret belongs to, and the operators' API tokens.

An operator calls with an API token (``slmops_op_...``, a name and a role); a device with the credential it claimed
(``slmops_dev_...``). Only hashes are stored (see :mod:`slmops.control.auth`). The last active admin token cannot be
revoked, so an operator can never lock every admin out of the API.

The agents' hot path (desired-state poll, heartbeat) authenticates with :func:`authenticate_device`: one indexed
query by credential hash that also returns what desired state needs of the device, and no cache, so a revoked,
decommissioned or replaced credential is refused on its very next request on every replica.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, Text, bindparam, select
from sqlalchemy import cast as cast_sql
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.control.auth import DEVICE_PREFIX, OPERATOR_PREFIX, Principal, hash_secret, new_secret
from slmops.control.db import ApiTokenRow, DeviceRow
from slmops.control.repository import ControlRepository
from slmops.control.schemas import ApiTokenCreated, ApiTokenPublic, Role
from slmops.errors import AuthenticationError, ConflictError, NotFoundError, PermissionDeniedError

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = [
    "CredentialCache",
    "DeviceCaller",
    "authenticate",
    "authenticate_device",
    "create_api_token",
    "device_caller",
    "list_api_tokens",
    "revoke_api_token",
]


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


@dataclass(frozen=True)
class DeviceCaller:
    """An approved device authenticated by its credential, with what its desired state depends on: labels and
    capabilities as the JSON text the database holds (compared as text to find a memoised desired state, parsed
    only when it must be computed)."""

    id: str
    device_class: str
    labels_json: str
    capabilities_json: str | None

    @property
    def fingerprint(self) -> tuple[str, str, str | None]:
        return (self.device_class, self.labels_json, self.capabilities_json)

    def labels(self) -> dict[str, Any]:
        labels: dict[str, Any] = json.loads(self.labels_json) or {}
        return labels

    def capabilities(self) -> dict[str, Any] | None:
        capabilities: dict[str, Any] | None = json.loads(self.capabilities_json or "null") or None
        return capabilities


_DEVICES = cast(Table, DeviceRow.__table__)
_BY_CREDENTIAL = select(
    _DEVICES.c.id,
    _DEVICES.c.state,
    _DEVICES.c.device_class,
    cast_sql(_DEVICES.c.labels, Text).label("labels"),  # the stored JSON text, not parsed
    cast_sql(_DEVICES.c.capabilities, Text).label("capabilities"),
).where(_DEVICES.c.credential_hash == bindparam("credential_hash"))


def authenticate_device(plane: ControlPlane, secret: str, device_id: str) -> DeviceCaller:
    """The approved device a device credential belongs to, which must be ``device_id``: 401 for an unknown or
    replaced credential, 403 for a device that is not approved or a credential of another device (whether or not
    ``device_id`` exists). One query on the credential's unique index, no cache."""
    with plane.engine.connect() as connection:
        row = connection.execute(_BY_CREDENTIAL, {"credential_hash": hash_secret(secret)}).one_or_none()
    if row is None:
        raise AuthenticationError("unknown or replaced device credential; claim a new one or re-enroll")
    if row.state != "approved":
        raise PermissionDeniedError(f"device {row.id} is {row.state}; it may not call the API")
    if row.id != device_id:
        raise PermissionDeniedError("a device credential can act only for its own device")
    return DeviceCaller(row.id, row.device_class, row.labels or "{}", row.capabilities)


def device_caller(row: DeviceRow) -> DeviceCaller:
    """The same for a device row read otherwise (by an operator's call)."""
    return DeviceCaller(row.id, row.device_class, json.dumps(row.labels), json.dumps(row.capabilities or None))


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
