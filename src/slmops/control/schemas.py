"""Operator API schemas, one per operation, separate from the database tables (the wire schemas are in core/)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from slmops.core.adaptation import LocalAdaptation
from slmops.core.rollout import RolloutPolicy
from slmops.core.wire import Capabilities

__all__ = [
    "ROLES",
    "ApiTokenCreate",
    "ApiTokenCreated",
    "ApiTokenPublic",
    "ApplyResult",
    "BlueprintApply",
    "BlueprintPublic",
    "ClassProgress",
    "DeviceEventPublic",
    "DeviceLabelsUpdate",
    "DevicePublic",
    "EnrollmentTokenCreate",
    "EnrollmentTokenCreated",
    "EnrollmentTokenPublic",
    "ErrorBody",
    "LabelKey",
    "LabelValue",
    "Labels",
    "PlanEntry",
    "PlanPublic",
    "ReleaseEventPublic",
    "ReleaseMember",
    "ReleasePublic",
    "ReleaseStart",
    "ReleaseState",
    "Role",
    "ServerHealth",
]

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")  # each role may do everything the ones before it may
DeviceState = Literal["pending", "approved", "revoked", "decommissioned"]
LabelKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:/-]{0,63}$")]
# JSON Schema's patternProperties alone lets keys that match no pattern through; the server refuses them
Labels = Annotated[dict[LabelKey, LabelValue], Field(json_schema_extra={"additionalProperties": False})]
TokenName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(_Schema):
    """A request body: JSON types exactly as the OpenAPI document says (no "1" for 1, no 0 for false)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorBody(_Schema):
    code: str  # SLMOpsError.code, e.g. "not_found", "unauthenticated"
    message: str


class ServerHealth(_Schema):
    status: Literal["ok"]
    version: str


class ApiTokenCreate(_Request):
    name: TokenName
    role: Role


class ApiTokenPublic(_Schema):
    name: str
    role: Role
    created_at: str
    created_by: str
    revoked: bool


class ApiTokenCreated(ApiTokenPublic):
    token: str  # shown once; only its hash is stored


class EnrollmentTokenCreate(_Request):
    max_uses: int = Field(default=1, ge=1, le=1_000_000)
    expires_in_s: float | None = Field(default=None, gt=0, le=366 * 24 * 3600)
    auto_approve: bool = False
    labels: Labels = Field(default_factory=dict, max_length=32)


class EnrollmentTokenPublic(_Schema):
    id: str
    created_at: str
    created_by: str
    expires_at: str
    max_uses: int
    uses: int
    auto_approve: bool
    labels: dict[str, str]
    revoked: bool


class EnrollmentTokenCreated(EnrollmentTokenPublic):
    token: str  # shown once; only its hash is stored


class DevicePublic(_Schema):
    id: str
    state: DeviceState
    device_class: str
    hostname: str
    labels: dict[str, str]
    capabilities: Capabilities | None
    enrolled_at: str
    last_seen: str | None
    online: bool  # heard from within the offline TTL plus grace, at the time of the request
    phase: str | None
    health: str | None
    active_digest: str | None
    active_version: str | None  # "name@vN (variant)" when the registry knows the active digest
    previous_digest: str | None
    last_error: str | None
    desired_generation: str | None  # the generation the agent last reported working towards
    agent_version: str | None


class DeviceLabelsUpdate(_Request):
    set: Labels = Field(default_factory=dict, max_length=32)
    remove: list[LabelKey] = Field(default_factory=list, max_length=32)


class DeviceEventPublic(_Schema):
    id: str
    time: str
    kind: str
    version_digest: str | None
    detail: dict[str, Any]
    received_at: str


class BlueprintApply(_Request):
    source: str = Field(min_length=1, max_length=256 * 1024)  # the blueprint's YAML text


class ApplyResult(_Schema):
    name: str
    revision: int
    created: bool  # False when the blueprint is unchanged (apply is idempotent)
    digest: str
    warnings: list[str]


class BlueprintPublic(_Schema):
    name: str
    revision: int
    current: bool
    digest: str
    priority: int
    model: str  # "name@ref"
    created_at: str
    created_by: str
    blueprint: dict[str, Any]
    source: str


Change = Literal["install", "update", "reconfigure", "remove", "unchanged"]


class PlanEntry(_Schema):
    device_id: str
    device_class: str
    labels: dict[str, str]
    matched: list[str]  # "name@revision" of every matching blueprint after the apply, the winner first
    winner: str | None
    before: str | None  # "name@vN (variant)" the device should run now
    after: str | None  # ... and after the apply
    before_digest: str | None
    after_digest: str | None
    change: Change
    reason: str
    local: LocalAdaptation | None = None  # the site adaptation in effect after the apply (what was dropped, and why)


class PlanPublic(_Schema):
    name: str
    revision: int  # the revision an apply would create (or the current one when unchanged)
    spec_changed: bool
    entries: list[PlanEntry]
    warnings: list[str]


# ---------------------------------------------------------------- rollouts

ReleaseState = Literal["running", "paused", "halted", "aborted", "completed"]


class ReleaseStart(_Request):
    blueprint: str = Field(min_length=1, max_length=64)
    to: str = Field(min_length=1, max_length=200, description="the new version: NAME@vN, NAME@ALIAS or a digest")
    policy: RolloutPolicy | None = Field(
        default=None, description="stages, soak, gates; default: the blueprint's spec.rollout, else the defaults"
    )


class ClassProgress(BaseModel):
    device_class: str
    devices: int
    members: int
    online_members: int
    switched: int
    reporting: int
    rolled_back: int
    status: str
    reason: str
    gates: list[dict[str, Any]] = Field(default_factory=list)


class ReleasePublic(BaseModel):
    id: str
    blueprint: str
    state: ReleaseState
    from_version: str | None
    from_digest: str | None
    to_version: str
    to_digest: str
    stage: int  # 1-based
    stages: list[float]
    stage_started_at: str
    soak_s: float
    started_at: str
    finished_at: str | None
    created_by: str
    reason: str
    evaluated_at: str | None
    classes: list[ClassProgress]
    policy: dict[str, Any]


class ReleaseEventPublic(BaseModel):
    id: int
    release_id: str
    time: str
    kind: str
    stage: int  # 1-based
    actor: str
    message: str
    numbers: dict[str, Any]


class ReleaseMember(BaseModel):
    device_id: str
    device_class: str
    stage: int  # 1-based: the stage in which the device joined the cohort
