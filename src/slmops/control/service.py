"""The control plane's use cases. Each public method is one unit of work: one session, one commit.

Routes and CLI commands call these methods; the decisions themselves (device classes, blueprint matching, desired
state, variant choice) are pure functions in ``core/``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import InvalidSignature
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops import __version__
from slmops.control.auth import (
    DEVICE_PREFIX,
    ENROLL_PREFIX,
    OPERATOR_PREFIX,
    Principal,
    hash_secret,
    new_secret,
)
from slmops.control.db import (
    ApiTokenRow,
    BlueprintRow,
    DeviceEventRow,
    DeviceRow,
    EnrollmentTokenRow,
    ReleaseMemberRow,
    ReleaseRow,
)
from slmops.control.repository import ControlRepository, iso, parse_iso
from slmops.control.schemas import (
    ApiTokenCreated,
    ApiTokenPublic,
    ApplyResult,
    BlueprintPublic,
    DeviceEventPublic,
    DevicePublic,
    EnrollmentTokenCreated,
    EnrollmentTokenPublic,
    PlanEntry,
    PlanPublic,
    Role,
)
from slmops.control.settings import ServerSettings
from slmops.core.blueprint import Blueprint, blueprint_from_value, parse_blueprint
from slmops.core.desired import (
    AppliedBlueprint,
    DeviceFacts,
    ModelCandidates,
    desired_state,
    generation_of,
    ranked_matches,
)
from slmops.core.device_class import device_class
from slmops.core.manifest import SignedManifest, canonical_json
from slmops.core.wire import (
    Capabilities,
    ClaimRequest,
    DesiredModel,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    StatusAck,
    StatusReport,
    claim_message,
)
from slmops.errors import AuthenticationError, ConflictError, NotFoundError, PermissionDeniedError
from slmops.registry import Registry
from slmops.registry.signing import format_public_key, parse_public_key

__all__ = ["ACTIVE_RELEASE_STATES", "ActiveRelease", "ControlPlane", "device_facts"]

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _describe(model: DesiredModel | None) -> str | None:
    if model is None:
        return None
    return f"{model.name}@{model.version}" + (f" ({model.variant})" if model.variant else "")


class _CandidateCache:
    """Registry look-ups for blueprint model references, memoised for the duration of one call."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._found: dict[str, ModelCandidates] = {}

    def get(self, reference: str) -> ModelCandidates:
        if reference not in self._found:
            self._found[reference] = self._lookup(reference)
        return self._found[reference]

    def _lookup(self, reference: str) -> ModelCandidates:
        try:
            base = self.registry.resolve(reference)
        except NotFoundError as exc:
            return ModelCandidates(problem=f"{reference} does not resolve: {exc}")
        collected: dict[str, SignedManifest] = {base.digest: base}
        frontier = [base.digest]
        while frontier:
            for child in self.registry.children(frontier.pop()):
                if child.digest not in collected:
                    collected[child.digest] = child
                    frontier.append(child.digest)
        return ModelCandidates(versions=tuple(collected.values()), base_digest=base.digest)

    def for_blueprints(self, blueprints: Sequence[AppliedBlueprint]) -> dict[str, ModelCandidates]:
        return {b.blueprint.spec.model.reference: self.get(b.blueprint.spec.model.reference) for b in blueprints}


ACTIVE_RELEASE_STATES = ("running", "paused")


@dataclass(frozen=True)
class ActiveRelease:
    """What desired state needs of a running or paused release: the canaries and the version they get."""

    id: str
    blueprint: str
    stage_index: int
    to_name: str
    to_digest: str
    members: frozenset[str]


@dataclass
class _World:
    """Everything desired state depends on besides the device: blueprints, active releases, registry look-ups.

    Loaded at most every ``desired_cache_ttl_s`` (and at once after a change made through this process), so a
    poll costs one device read instead of reading every blueprint and walking the registry. Other replicas (and
    registry changes made by other processes) are seen within the TTL.
    """

    key: int
    loaded_at: float
    signature: tuple[object, ...]
    applied: list[AppliedBlueprint]
    releases: dict[str, ActiveRelease]  # by blueprint name
    candidates: _CandidateCache
    memo: dict[str, tuple[tuple[object, ...], DesiredState]] = field(default_factory=dict)


def _canary_blueprint(applied: AppliedBlueprint, release: ActiveRelease) -> AppliedBlueprint:
    spec = applied.blueprint.spec
    model = spec.model.model_copy(update={"name": release.to_name, "ref": release.to_digest})
    blueprint = applied.blueprint.model_copy(update={"spec": spec.model_copy(update={"model": model})})
    return AppliedBlueprint(blueprint, applied.revision)


class ControlPlane:
    """Devices, tokens and blueprints in the registry's database, next to the registry itself."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        settings: ServerSettings,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self._world: _World | None = None
        self._world_lock = threading.Lock()
        self._world_key = 0
        self._device_auth: dict[str, tuple[str, float]] = {}  # credential hash -> (device id, valid until)

    @classmethod
    def open(cls, settings: ServerSettings | None = None, clock: Callable[[], datetime] = _utcnow) -> ControlPlane:
        """Open the registry (which runs the migrations, control-plane tables included) and share its engine."""
        import slmops.control.db  # noqa: F401  (the tables must be on Base.metadata before anything compares it)

        settings = settings or ServerSettings()
        registry = Registry.open(settings.registry_settings())
        return cls(registry.engine, registry, settings, clock)

    def close(self) -> None:
        self.registry.close()

    def _now(self) -> str:
        return iso(self.clock())

    # ================================================================== authentication

    def authenticate(self, secret: str) -> Principal:
        """The caller of a credential. An approved device's credential is remembered for ``auth_cache_ttl_s``
        (a heartbeat then costs no credential query); revoking, decommissioning or re-claiming a device through
        this process forgets it at once, through another replica within the TTL."""
        token_hash = hash_secret(secret)
        if secret.startswith(DEVICE_PREFIX):
            cached = self._device_auth.get(token_hash)
            if cached is not None and cached[1] > time.monotonic():
                return Principal("device", cached[0])
        with Session(self.engine) as session:
            repo = ControlRepository(session)
            if secret.startswith(DEVICE_PREFIX):
                device = repo.device_by_credential(token_hash)
                if device is None:
                    raise AuthenticationError("unknown or replaced device credential; claim a new one or re-enroll")
                if device.state != "approved":
                    raise PermissionDeniedError(f"device {device.id} is {device.state}; it may not call the API")
                ttl = self.settings.auth_cache_ttl_s
                if ttl > 0:
                    if len(self._device_auth) > 200_000:
                        self._device_auth.clear()
                    self._device_auth[token_hash] = (device.id, time.monotonic() + ttl)
                return Principal("device", device.id)
            token = repo.api_token_by_hash(token_hash)
            if token is None or token.revoked:
                raise AuthenticationError(
                    "unknown or revoked API token; create one with `slmops token create --role ROLE --name NAME`"
                )
            return Principal("operator", token.name, token.role)  # type: ignore[arg-type]

    # ================================================================== API tokens

    def create_api_token(self, name: str, role: Role, created_by: str) -> ApiTokenCreated:
        secret = new_secret(OPERATOR_PREFIX)
        row = ApiTokenRow(
            name=name,
            role=role,
            token_hash=hash_secret(secret),
            created_at=self._now(),
            created_by=created_by,
            revoked=False,
        )
        with Session(self.engine) as session:
            repo = ControlRepository(session)
            if repo.api_token(name) is not None:
                raise ConflictError(f"an API token named '{name}' exists already; pick another name or revoke it")
            try:
                repo.add_api_token(row)
                session.commit()
            except SQLIntegrityError:
                raise ConflictError(f"an API token named '{name}' exists already; pick another name") from None
            return ApiTokenCreated(**_token_public(row).model_dump(), token=secret)

    def api_tokens(self) -> list[ApiTokenPublic]:
        with Session(self.engine) as session:
            return [_token_public(row) for row in ControlRepository(session).api_tokens()]

    def revoke_api_token(self, name: str) -> ApiTokenPublic:
        with Session(self.engine) as session:
            row = ControlRepository(session).api_token(name)
            if row is None:
                raise NotFoundError(f"no API token named '{name}' (list them with `slmops token list`)")
            row.revoked = True
            session.commit()
            return _token_public(row)

    # ================================================================== enrollment

    def create_enrollment_token(
        self,
        *,
        max_uses: int,
        expires_in_s: float | None,
        auto_approve: bool,
        labels: dict[str, str],
        created_by: str,
    ) -> EnrollmentTokenCreated:
        secret = new_secret(ENROLL_PREFIX)
        now = self.clock()
        ttl = expires_in_s if expires_in_s is not None else self.settings.enrollment_token_default_ttl_s
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
        with Session(self.engine) as session:
            ControlRepository(session).add_enrollment_token(row)
            session.commit()
            return EnrollmentTokenCreated(**_enrollment_public(row).model_dump(), token=secret)

    def enrollment_tokens(self) -> list[EnrollmentTokenPublic]:
        with Session(self.engine) as session:
            return [_enrollment_public(row) for row in ControlRepository(session).enrollment_tokens()]

    def trusted_keys(self) -> list[str]:
        return [format_public_key(key).strip() for _, key in sorted(self.registry.keys.trusted().items())]

    def enroll(self, request: EnrollRequest) -> EnrollResponse:
        """Admit a device: pending, or approved with a credential when the token auto-approves.

        Enrolling again with the same key (an agent that lost the answer) returns the same device without using
        the token again; its credential, if any, is then obtained with :meth:`claim`.
        """
        public_key = format_public_key(parse_public_key(request.public_key, "the device public key")).strip()
        token_hash = hash_secret(request.token)
        for _attempt in range(2):
            with Session(self.engine) as session:
                repo = ControlRepository(session)
                existing = repo.device_by_public_key(public_key)
                if existing is not None:
                    return self._re_enroll(repo, existing, token_hash)
                now = self._now()
                if not repo.consume_enrollment_token(token_hash, now):
                    raise self._why_token_refused(repo.enrollment_token_by_hash(token_hash), now)
                token = repo.enrollment_token_by_hash(token_hash)
                assert token is not None  # it was just consumed
                labels = {**request.labels, **token.labels}
                credential = new_secret(DEVICE_PREFIX) if token.auto_approve else None
                device = DeviceRow(
                    id="dev-" + secrets.token_hex(8),
                    public_key=public_key,
                    state="approved" if token.auto_approve else "pending",
                    credential_hash=hash_secret(credential) if credential else None,
                    enrollment_token_id=token.id,
                    hostname=request.hostname.replace("\x00", ""),
                    labels=labels,
                    capabilities=request.capabilities.model_dump(mode="json"),
                    device_class=device_class(request.capabilities),
                    enrolled_at=now,
                    updated_at=now,
                )
                try:
                    repo.add_device(device)
                    session.commit()
                except SQLIntegrityError:
                    session.rollback()
                    continue  # the same key enrolled concurrently; answer as a re-enrollment
                log.info("device %s enrolled (%s, class %s)", device.id, device.state, device.device_class)
                return EnrollResponse(
                    device_id=device.id,
                    state="approved" if credential else "pending",
                    credential=credential,
                    trusted_keys=self.trusted_keys(),
                    poll_interval_s=self.settings.device_poll_interval_s,
                )
        raise ConflictError("this device key is being enrolled concurrently; retry")

    def _re_enroll(self, repo: ControlRepository, device: DeviceRow, token_hash: str) -> EnrollResponse:
        token = repo.enrollment_token_by_hash(token_hash)
        if token is None or token.revoked:
            raise AuthenticationError("unknown or revoked enrollment token; ask an operator for a new one")
        if device.state in ("revoked", "decommissioned"):
            raise PermissionDeniedError(
                f"this key belongs to device {device.id}, which was {device.state}; enroll with a new key"
            )
        return EnrollResponse(
            device_id=device.id,
            state="approved" if device.state == "approved" else "pending",
            credential=None,
            trusted_keys=self.trusted_keys(),
            poll_interval_s=self.settings.device_poll_interval_s,
        )

    @staticmethod
    def _why_token_refused(token: EnrollmentTokenRow | None, now: str) -> Exception:
        if token is None:
            return AuthenticationError(
                "unknown enrollment token; ask an operator for one (`slmops enroll-token create`)"
            )
        if token.revoked:
            return PermissionDeniedError(f"enrollment token {token.id} was revoked; ask an operator for a new one")
        if token.expires_at <= now:
            return PermissionDeniedError(
                f"enrollment token {token.id} expired at {token.expires_at}; ask an operator for a new one"
            )
        return PermissionDeniedError(
            f"enrollment token {token.id} is used up ({token.uses} of {token.max_uses} uses); ask for a new one"
        )

    def claim(self, request: ClaimRequest) -> EnrollResponse:
        """A pending device asks, signing with its key, whether it is approved; if so it gets a fresh credential.

        Each successful claim replaces the device's credential, so only the holder of the device key can obtain
        one, and a device that lost its credential recovers it.
        """
        refused = AuthenticationError("unknown device or bad signature; sign claim_message(device_id, timestamp)")
        skew = abs(self.clock().timestamp() - request.timestamp)
        if skew > self.settings.enroll_claim_max_skew_s:
            raise AuthenticationError(
                f"claim timestamp is {skew:.0f} s away from the server clock (at most "
                f"{self.settings.enroll_claim_max_skew_s:.0f} s allowed); fix the device clock"
            )
        with Session(self.engine) as session:
            repo = ControlRepository(session)
            device = repo.device(request.device_id)
            if device is None:
                raise refused
            try:
                signature = base64.b64decode(request.signature, validate=True)
                parse_public_key(device.public_key).verify(
                    signature, claim_message(request.device_id, request.timestamp)
                )
            except (InvalidSignature, binascii.Error, ValueError):
                raise refused from None
            if device.state in ("revoked", "decommissioned"):
                raise PermissionDeniedError(f"device {device.id} was {device.state}; enroll with a new key")
            credential = None
            if device.state == "approved":
                credential = new_secret(DEVICE_PREFIX)
                device.credential_hash = hash_secret(credential)
                device.updated_at = self._now()
                session.commit()
                self._device_auth.clear()  # the old credential is replaced
            return EnrollResponse(
                device_id=device.id,
                state="approved" if credential else "pending",
                credential=credential,
                trusted_keys=self.trusted_keys(),
                poll_interval_s=self.settings.device_poll_interval_s,
            )

    # ================================================================== devices (operators)

    def devices(self, state: str | None = None) -> list[DevicePublic]:
        with Session(self.engine) as session:
            rows = ControlRepository(session).devices([state] if state else None)
            return [self._device_public(row) for row in rows]

    def device(self, device_id: str) -> DevicePublic:
        with Session(self.engine) as session:
            return self._device_public(self._require_device(ControlRepository(session), device_id))

    def approve(self, device_id: str) -> DevicePublic:
        return self._transition(device_id, "approved", allowed_from=("pending", "approved"))

    def revoke(self, device_id: str) -> DevicePublic:
        return self._transition(device_id, "revoked", allowed_from=("pending", "approved", "revoked"))

    def decommission(self, device_id: str) -> DevicePublic:
        return self._transition(
            device_id, "decommissioned", allowed_from=("pending", "approved", "revoked", "decommissioned")
        )

    def _transition(self, device_id: str, state: str, allowed_from: tuple[str, ...]) -> DevicePublic:
        with Session(self.engine) as session:
            device = self._require_device(ControlRepository(session), device_id)
            if device.state not in allowed_from:
                raise ConflictError(
                    f"device {device_id} is {device.state} and cannot become {state}; a revoked or decommissioned "
                    "device must enroll again with a new key"
                )
            if device.state != state:
                device.state = state
                device.updated_at = self._now()
                if state in ("revoked", "decommissioned"):
                    device.credential_hash = None
                session.commit()
                self._device_auth.clear()
            return self._device_public(device)

    def set_labels(self, device_id: str, set_labels: dict[str, str], remove: list[str]) -> DevicePublic:
        with Session(self.engine) as session:
            device = self._require_device(ControlRepository(session), device_id)
            labels = {k: v for k, v in device.labels.items() if k not in remove}
            labels.update(set_labels)
            device.labels = labels
            device.updated_at = self._now()
            session.commit()
            return self._device_public(device)

    def device_events(self, device_id: str, limit: int = 100) -> list[DeviceEventPublic]:
        with Session(self.engine) as session:
            repo = ControlRepository(session)
            self._require_device(repo, device_id)
            return [
                DeviceEventPublic(
                    id=row.event_id,
                    time=row.time,
                    kind=row.kind,
                    version_digest=row.version_digest,
                    detail=row.detail,
                    received_at=row.received_at,
                )
                for row in repo.events(device_id, limit)
            ]

    @staticmethod
    def _require_device(repo: ControlRepository, device_id: str) -> DeviceRow:
        device = repo.device(device_id)
        if device is None:
            raise NotFoundError(f"no device '{device_id}' (list them with `slmops device list`)")
        return device

    def is_online(self, last_seen: str | None) -> bool:
        if last_seen is None:
            return False
        age = (self.clock() - parse_iso(last_seen)).total_seconds()
        return age <= self.settings.device_offline_after_s + self.settings.device_offline_grace_s

    def _version_label(self, digest: str | None) -> str | None:
        if digest is None:
            return None
        try:
            m = self.registry.resolve(digest).manifest
        except NotFoundError:
            return None
        return f"{m.name}@{m.version}" + (f" ({m.variant})" if m.variant else "")

    def _device_public(self, row: DeviceRow) -> DevicePublic:
        return DevicePublic(
            id=row.id,
            state=row.state,
            device_class=row.device_class,
            hostname=row.hostname,
            labels=dict(row.labels),
            capabilities=Capabilities.model_validate(row.capabilities) if row.capabilities else None,
            enrolled_at=row.enrolled_at,
            last_seen=row.last_seen,
            online=row.state == "approved" and self.is_online(row.last_seen),
            phase=row.phase,
            health=row.health,
            active_digest=row.active_digest,
            active_version=self._version_label(row.active_digest),
            previous_digest=row.previous_digest,
            last_error=row.last_error,
            desired_generation=row.desired_generation,
            agent_version=row.agent_version,
        )

    # ================================================================== devices (agents)

    def invalidate(self) -> None:
        """Forget the cached blueprints, releases and registry look-ups (after a change made here)."""
        with self._world_lock:
            self._world = None

    def world(self) -> _World:
        with self._world_lock:
            now = time.monotonic()
            world = self._world
            if world is not None and now - world.loaded_at < self.settings.desired_cache_ttl_s:
                return world
            with Session(self.engine) as session:
                applied = _applied(ControlRepository(session).current_blueprints())
                releases: dict[str, ActiveRelease] = {}
                for row in session.scalars(select(ReleaseRow).where(ReleaseRow.state.in_(ACTIVE_RELEASE_STATES))):
                    members = frozenset(
                        session.scalars(select(ReleaseMemberRow.device_id).where(ReleaseMemberRow.release_id == row.id))
                    )
                    releases[row.blueprint] = ActiveRelease(
                        row.id, row.blueprint, row.stage_index, row.to_name, row.to_digest, members
                    )
            candidates = _CandidateCache(self.registry)
            references = [b.blueprint.spec.model.reference for b in applied]
            references += [f"{r.to_name}@{r.to_digest}" for r in releases.values()]
            signature = (
                tuple((b.label, b.blueprint.digest) for b in applied),
                tuple(sorted((r.id, r.stage_index, r.to_digest, r.members) for r in releases.values())),
                tuple((ref, tuple(e.digest for e in candidates.get(ref).versions)) for ref in references),
            )
            if world is not None and world.signature == signature:
                world.loaded_at = now  # nothing changed: keep the memoised states
                return world
            self._world_key += 1
            world = _World(self._world_key, now, signature, applied, releases, candidates)
            self._world = world
            return world

    def desired(self, device_id: str) -> DesiredState:
        world = self.world()
        with Session(self.engine) as session:
            device = self._require_device(ControlRepository(session), device_id)
            fingerprint: tuple[object, ...] = (
                device.device_class,
                json.dumps(device.labels, sort_keys=True),
                json.dumps(device.capabilities, sort_keys=True),
            )
            cached = world.memo.get(device_id)
            if cached is not None and cached[0] == fingerprint:
                return cached[1]
            facts = _facts(device)
        state = self._desired_in(world, facts)
        world.memo[device_id] = (fingerprint, state)
        return state

    @staticmethod
    def _desired_in(world: _World, facts: DeviceFacts) -> DesiredState:
        applied = world.applied
        matched = ranked_matches(facts, applied)
        release = world.releases.get(matched[0].blueprint.name) if matched else None
        if release is not None and facts.device_id in release.members:
            canary = _canary_blueprint(matched[0], release)
            applied = [canary if b is matched[0] else b for b in applied]
            matched = [canary, *matched[1:]]
            state = desired_state(facts, applied, world.candidates.for_blueprints(matched[:1]))
            reason = f"{state.reason} [canary of release {release.id}, stage {release.stage_index + 1}]"
            state = state.model_copy(update={"reason": reason})
            return state.model_copy(update={"generation": generation_of(state)})
        return desired_state(facts, applied, world.candidates.for_blueprints(matched[:1]))

    def blob_allowed(self, device_id: str, digest: str) -> bool:
        """Whether a device may download a blob: only the files of the version its desired state names."""
        state = self.desired(device_id)
        if state.model is None:
            return False
        return any(f.digest == digest for f in state.model.envelope.manifest.files)

    def report_status(self, device_id: str, report: StatusReport) -> StatusAck:
        """Record a heartbeat and its events; events already stored are acknowledged again, never duplicated."""
        ids = list(dict.fromkeys(e.id for e in report.events))
        for _attempt in range(3):
            with Session(self.engine) as session:
                repo = ControlRepository(session)
                device = self._require_device(repo, device_id)
                now = self._now()
                device.last_seen = now
                device.updated_at = now
                device.phase = report.phase
                device.health = report.health
                device.active_digest = report.active_digest
                device.previous_digest = report.previous_digest
                device.last_error = report.last_error.replace("\x00", "") if report.last_error else None
                device.desired_generation = report.desired_generation
                device.agent_version = report.agent_version.replace("\x00", "")[:64] or None
                if report.capabilities is not None:
                    device.capabilities = report.capabilities.model_dump(mode="json")
                    device.device_class = device_class(report.capabilities)
                known = repo.known_event_ids(device_id, ids) if ids else set()
                seq = repo.last_event_seq(device_id) if ids else 0
                fresh: list[DeviceEventRow] = []
                seen: set[str] = set(known)
                for event in report.events:
                    if event.id in seen:
                        continue
                    seen.add(event.id)
                    seq += 1
                    fresh.append(
                        DeviceEventRow(
                            device_id=device_id,
                            event_id=event.id,
                            time=event.time.replace("\x00", ""),
                            kind=event.kind.replace("\x00", ""),
                            version_digest=event.version_digest.replace("\x00", "") if event.version_digest else None,
                            detail=json.loads(canonical_json(event.detail).decode("utf-8").replace("\\u0000", "")),
                            received_at=now,
                            seq=seq,
                        )
                    )
                try:
                    repo.add_events(fresh)
                    session.commit()
                except SQLIntegrityError:
                    session.rollback()
                    continue  # the same events arrived concurrently; look again
                return StatusAck(accepted_event_ids=ids, server_time=now)
        raise ConflictError("status reports for this device are arriving concurrently; retry")

    # ================================================================== blueprints

    def apply(self, source: str, created_by: str) -> ApplyResult:
        """Create or update a blueprint; a new revision only when it changed."""
        blueprint = parse_blueprint(source)
        warnings = self._warnings(blueprint)
        with Session(self.engine) as session:
            repo = ControlRepository(session)
            current = repo.current_blueprint(blueprint.name)
            if current is not None and current.digest == blueprint.digest:
                return ApplyResult(
                    name=blueprint.name,
                    revision=current.revision,
                    created=False,
                    digest=blueprint.digest,
                    warnings=warnings,
                )
            revision = repo.latest_blueprint_revision(blueprint.name) + 1
            row = BlueprintRow(
                name=blueprint.name,
                revision=revision,
                spec=canonical_json(blueprint.to_json_value()).decode("utf-8"),
                source=source,
                digest=blueprint.digest,
                created_by=created_by,
                created_at=self._now(),
            )
            try:
                repo.add_blueprint_revision(row)
                session.commit()
            except SQLIntegrityError:
                raise ConflictError(
                    f"blueprint '{blueprint.name}' was applied concurrently by someone else; plan and apply again"
                ) from None
        self.invalidate()
        log.info("blueprint %s@%d applied by %s", blueprint.name, revision, created_by)
        return ApplyResult(
            name=blueprint.name, revision=revision, created=True, digest=blueprint.digest, warnings=warnings
        )

    def _warnings(self, blueprint: Blueprint) -> list[str]:
        found = _CandidateCache(self.registry).get(blueprint.spec.model.reference)
        return [found.problem] if found.problem else []

    def plan(self, source: str) -> PlanPublic:
        """What applying ``source`` would change, per approved device, and which blueprint wins where."""
        blueprint = parse_blueprint(source)
        with Session(self.engine) as session:
            repo = ControlRepository(session)
            rows = repo.current_blueprints()
            current = repo.current_blueprint(blueprint.name)
            changed = current is None or current.digest != blueprint.digest
            revision = repo.latest_blueprint_revision(blueprint.name) + 1 if changed else current.revision  # type: ignore[union-attr]
            devices = [_facts(row) for row in repo.devices(["approved"])]
        before = _applied(rows)
        after = [b for b in before if b.blueprint.name != blueprint.name] + [AppliedBlueprint(blueprint, revision)]
        cache = _CandidateCache(self.registry)
        entries: list[PlanEntry] = []
        for facts in devices:
            matched_before = ranked_matches(facts, before)
            matched_after = ranked_matches(facts, after)
            ours = blueprint.name in {b.blueprint.name for b in matched_after + matched_before}
            old = desired_state(facts, before, cache.for_blueprints(matched_before[:1]))
            new = desired_state(facts, after, cache.for_blueprints(matched_after[:1]))
            change = _change(old, new)
            if not ours and change == "unchanged":
                continue
            entries.append(
                PlanEntry(
                    device_id=facts.device_id,
                    device_class=facts.device_class,
                    labels=dict(facts.labels),
                    matched=[b.label for b in matched_after],
                    winner=new.blueprint,
                    before=_describe(old.model),
                    after=_describe(new.model),
                    before_digest=old.model.digest if old.model else None,
                    after_digest=new.model.digest if new.model else None,
                    change=change,
                    reason=new.reason,
                )
            )
        return PlanPublic(
            name=blueprint.name,
            revision=revision,
            spec_changed=changed,
            entries=entries,
            warnings=self._warnings(blueprint),
        )

    def blueprints(self) -> list[BlueprintPublic]:
        with Session(self.engine) as session:
            return [_blueprint_public(row) for row in ControlRepository(session).current_blueprints()]

    def blueprint(self, name: str, revision: int | None = None) -> BlueprintPublic:
        with Session(self.engine) as session:
            repo = ControlRepository(session)
            row = repo.current_blueprint(name) if revision is None else repo.blueprint_revision(name, revision)
            if row is None:
                known = [r.revision for r in repo.blueprint_revisions(name)]
                if not known:
                    raise NotFoundError(f"no blueprint named '{name}' (list them with `slmops blueprint list`)")
                raise NotFoundError(f"blueprint '{name}' has no revision {revision}; it has {known}")
            return _blueprint_public(row)

    def health(self) -> str:
        return __version__


def _change(old: DesiredState, new: DesiredState) -> str:
    if old.model is None and new.model is None:
        return "unchanged"
    if old.model is None:
        return "install"
    if new.model is None:
        return "remove"
    if old.model.digest != new.model.digest:
        return "update"
    if old.runtime != new.runtime or old.adaptations != new.adaptations:
        return "reconfigure"
    return "unchanged"


def _applied(rows: Sequence[BlueprintRow]) -> list[AppliedBlueprint]:
    return [AppliedBlueprint(blueprint_from_value(json.loads(row.spec), row.name), row.revision) for row in rows]


def device_facts(row: DeviceRow) -> DeviceFacts:
    return _facts(row)


def _facts(row: DeviceRow) -> DeviceFacts:
    caps = Capabilities.model_validate(row.capabilities) if row.capabilities else None
    return DeviceFacts(device_id=row.id, labels=dict(row.labels), capabilities=caps, device_class=row.device_class)


def _token_public(row: ApiTokenRow) -> ApiTokenPublic:
    return ApiTokenPublic(
        name=row.name,
        role=row.role,
        created_at=row.created_at,
        created_by=row.created_by,
        revoked=row.revoked,
    )


def _enrollment_public(row: EnrollmentTokenRow) -> EnrollmentTokenPublic:
    return EnrollmentTokenPublic(
        id=row.id,
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        max_uses=row.max_uses,
        uses=row.uses,
        auto_approve=row.auto_approve,
        labels=dict(row.labels),
        revoked=row.revoked,
    )


def _blueprint_public(row: BlueprintRow) -> BlueprintPublic:
    value = json.loads(row.spec)
    blueprint = blueprint_from_value(value, row.name)
    return BlueprintPublic(
        name=row.name,
        revision=row.revision,
        current=row.current,
        digest=row.digest,
        priority=blueprint.spec.priority,
        model=blueprint.spec.model.reference,
        created_at=row.created_at,
        created_by=row.created_by,
        blueprint=value,
        source=row.source,
    )
