"""Enrollment: operators make enrollment tokens; a device enrolls with one and its public key, then claims its
credential by signing :func:`~slmops.core.wire.claim_message` with that key.

A token that auto-approves hands out the credential at enrollment; otherwise the device is ``pending`` until an
operator approves it, and polls ``/enroll/claim``. Every claim that obtains a credential replaces the one before, so
only the holder of the device key can get one, and a device that lost its credential recovers it. The timestamp of
every claim whose signature verifies is kept in the device row. While the device is pending a claim may repeat the
last timestamp; a claim that obtains a credential must be newer than every claim recorded before, so a claim seen on
the way (also one sent while the device was pending) cannot be sent again to take the device's credential and lock
the device out.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from datetime import timedelta
from typing import TYPE_CHECKING, NamedTuple

from cryptography.exceptions import InvalidSignature
from sqlalchemy.orm import Session

from slmops.control._unit_of_work import commit_retrying
from slmops.control.auth import DEVICE_PREFIX, ENROLL_PREFIX, hash_secret, new_secret
from slmops.control.db import DeviceRow, EnrollmentTokenRow
from slmops.control.repository import ControlRepository, iso
from slmops.control.schemas import EnrollmentTokenCreated, EnrollmentTokenPublic
from slmops.core.device_class import device_class
from slmops.core.wire import ClaimRequest, EnrollRequest, EnrollResponse, claim_message
from slmops.errors import AuthenticationError, ConflictError, PermissionDeniedError
from slmops.registry.signing import format_public_key, parse_public_key

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = [
    "claim_credential",
    "create_enrollment_token",
    "enroll_device",
    "list_enrollment_tokens",
    "trusted_keys",
]

log = logging.getLogger(__name__)


def create_enrollment_token(
    plane: ControlPlane,
    *,
    max_uses: int,
    expires_in_s: float | None,
    auto_approve: bool,
    labels: dict[str, str],
    created_by: str,
) -> EnrollmentTokenCreated:
    secret = new_secret(ENROLL_PREFIX)
    now = plane.clock()
    ttl = expires_in_s if expires_in_s is not None else plane.settings.enrollment_token_default_ttl_s
    row = EnrollmentTokenRow(
        id="enr-" + secrets.token_hex(6),
        token_hash=hash_secret(secret),
        created_at=iso(now),
        created_by=created_by,
        expires_at=iso(now + timedelta(seconds=ttl)),
        max_uses=max_uses,
        uses=0,
        auto_approve=auto_approve,
        labels=dict(labels),
        revoked=False,
    )
    with Session(plane.engine) as session:
        ControlRepository(session).add_enrollment_token(row)
        session.commit()
        return EnrollmentTokenCreated(**_enrollment_public(row).model_dump(), token=secret)


def list_enrollment_tokens(plane: ControlPlane) -> list[EnrollmentTokenPublic]:
    with Session(plane.engine) as session:
        return [_enrollment_public(row) for row in ControlRepository(session).enrollment_tokens()]


def trusted_keys(plane: ControlPlane) -> list[str]:
    """The registry's trusted signing keys, which a device verifies manifests with."""
    return [format_public_key(key).strip() for _, key in sorted(plane.registry.keys.trusted().items())]


class _Admitted(NamedTuple):
    device_id: str
    credential: str | None
    approved: bool
    new_class: str | None  # the class of a device enrolled now; None when it had enrolled before


def enroll_device(plane: ControlPlane, request: EnrollRequest) -> EnrollResponse:
    """Admit a device: pending, or approved with a credential when the token auto-approves.

    Enrolling again with the same key (an agent that lost the answer) returns the same device without using the
    token again; its credential, if any, is then obtained with :func:`claim_credential`.
    """
    public_key = format_public_key(parse_public_key(request.public_key, "the device public key")).strip()
    token_hash = hash_secret(request.token)

    def work(session: Session) -> _Admitted:
        repo = ControlRepository(session)
        existing = repo.device_by_public_key(public_key)
        if existing is not None:
            return _Admitted(existing.id, None, _re_enroll(repo, existing, token_hash), None)
        now = plane.now_iso()
        if not repo.consume_enrollment_token(token_hash, now):
            raise _why_token_refused(repo.enrollment_token_by_hash(token_hash), now)
        token = repo.enrollment_token_by_hash(token_hash)
        assert token is not None  # it was just consumed
        credential = new_secret(DEVICE_PREFIX) if token.auto_approve else None
        device = DeviceRow(
            id="dev-" + secrets.token_hex(8),
            public_key=public_key,
            state="approved" if token.auto_approve else "pending",
            credential_hash=hash_secret(credential) if credential else None,
            enrollment_token_id=token.id,
            hostname=request.hostname.replace("\x00", ""),
            labels={**request.labels, **token.labels},
            capabilities=request.capabilities.model_dump(mode="json"),
            device_class=device_class(request.capabilities),
            enrolled_at=now,
            updated_at=now,
        )
        repo.add_device(device)  # the same key enrolling concurrently fails here: then answered as a re-enrollment
        return _Admitted(device.id, credential, credential is not None, device.device_class)

    admitted = commit_retrying(
        plane.engine, work, attempts=2, conflict="this device key is being enrolled concurrently; retry"
    )
    answer = _answer(plane, admitted.device_id, admitted.credential, approved=admitted.approved)  # reads key files
    if admitted.new_class is not None:
        log.info("device %s enrolled (%s, class %s)", answer.device_id, answer.state, admitted.new_class)
    return answer


def claim_credential(plane: ControlPlane, request: ClaimRequest) -> EnrollResponse:
    """A pending device asks, signing with its key, whether it is approved; if so it gets a fresh credential.

    A claim that obtains a credential must be newer than every verified claim before it (also those made while
    pending): a replay (or an older claim) is refused with :class:`ConflictError` and changes nothing, so the
    credential obtained before keeps working.
    """
    refused = AuthenticationError("unknown device or bad signature; sign claim_message(device_id, timestamp)")
    max_skew_s = plane.settings.enroll_claim_max_skew_s
    skew = abs(plane.now_epoch() - request.timestamp)
    if skew > max_skew_s:
        raise AuthenticationError(
            f"claim timestamp is {skew:.0f} s away from the server clock (at most {max_skew_s:.0f} s allowed); "
            "fix the device clock"
        )
    with Session(plane.engine) as session:
        repo = ControlRepository(session)
        device = repo.device(request.device_id)
        if device is None:
            raise refused
        try:
            signature = base64.b64decode(request.signature, validate=True)
            parse_public_key(device.public_key).verify(signature, claim_message(request.device_id, request.timestamp))
        except (InvalidSignature, binascii.Error, ValueError):
            raise refused from None
        if device.state in ("revoked", "decommissioned"):
            raise PermissionDeniedError(f"device {device.id} was {device.state}; enroll with a new key")
        if device.state == "pending" and repo.record_pending_claim(device.id, request.timestamp):
            session.commit()
            return _answer(plane, device.id, None, approved=False)
        # approved (perhaps just now), or a pending device's claim older than its last one: refused below
        credential = new_secret(DEVICE_PREFIX)
        if not repo.record_claim(device.id, request.timestamp, hash_secret(credential), plane.now_iso()):
            session.refresh(device)
            if device.state not in ("pending", "approved"):
                raise PermissionDeniedError(f"device {device.id} is {device.state}; it cannot claim a credential")
            if device.state == "pending":
                raise ConflictError(
                    f"this claim for device {device.id} (timestamp {request.timestamp}) is older than the last one "
                    f"recorded (timestamp {device.last_claim_timestamp}); sign a new claim with the current time"
                )
            raise ConflictError(
                f"this claim for device {device.id} (timestamp {request.timestamp}) is not newer than the last "
                f"one recorded (timestamp {device.last_claim_timestamp}): a signed claim is accepted once. Sign a "
                "new claim with the current time; the credential issued before keeps working"
            )
        session.commit()
    plane.credential_cache.clear()  # the old credential is replaced
    return _answer(plane, request.device_id, credential, approved=True)


def _re_enroll(repo: ControlRepository, device: DeviceRow, token_hash: str) -> bool:
    """Whether the device enrolling again with its key is approved; refused for a bad token or a retired device."""
    token = repo.enrollment_token_by_hash(token_hash)
    if token is None or token.revoked:
        raise AuthenticationError("unknown or revoked enrollment token; ask an operator for a new one")
    if device.state in ("revoked", "decommissioned"):
        raise PermissionDeniedError(
            f"this key belongs to device {device.id}, which was {device.state}; enroll with a new key"
        )
    return device.state == "approved"


def _why_token_refused(token: EnrollmentTokenRow | None, now: str) -> Exception:
    if token is None:
        return AuthenticationError("unknown enrollment token; ask an operator for one (`slmops enroll-token create`)")
    if token.revoked:
        return PermissionDeniedError(f"enrollment token {token.id} was revoked; ask an operator for a new one")
    if token.expires_at <= now:
        return PermissionDeniedError(
            f"enrollment token {token.id} expired at {token.expires_at}; ask an operator for a new one"
        )
    return PermissionDeniedError(
        f"enrollment token {token.id} is used up ({token.uses} of {token.max_uses} uses); ask for a new one"
    )


def _answer(plane: ControlPlane, device_id: str, credential: str | None, *, approved: bool) -> EnrollResponse:
    return EnrollResponse(
        device_id=device_id,
        state="approved" if approved else "pending",
        credential=credential,
        trusted_keys=trusted_keys(plane),
        poll_interval_s=plane.settings.device_poll_interval_s,
    )


def _enrollment_public(row: EnrollmentTokenRow) -> EnrollmentTokenPublic:
    return EnrollmentTokenPublic.model_validate(row, from_attributes=True)
