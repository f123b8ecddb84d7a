"""The edge agent's reconcile plan: what to do next to move this device towards its desired model version.

Pure: no I/O, no clock. The agent's :class:`slmops.agent.reconcile.Reconciler` reads its data directory and persisted
state into a :class:`LocalView`, asks :func:`plan` for the ordered steps, executes the first one, persists the
result, and asks again. Every step is idempotent, so a plan recomputed after a crash at any point continues where
the last one stopped.

The life of a version on a device::

    desired ─▶ verify ─▶ download ─▶ stage ─▶ probe ─▶ activate ─▶ (probation) ─▶ commit
     (signature)  (blobs, sha256)  (slot dir)  (child process)  (atomic switch)        │
                                                 │ fails                 │ crash / repeated health failures
                                                 ▼                       ▼
                                              failed  ◀────────────  rollback to the previous slot

A version that failed its probe, failed repeated health checks, or crashed ``max_crashes`` times during probation
is *failed*: the plan does nothing for it again until the desired version changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from slmops.core.wire import DesiredState

__all__ = [
    "LocalView",
    "Policy",
    "Step",
    "StepKind",
    "Target",
    "is_noop",
    "plan",
    "short_digest",
    "target_of",
]

StepKind = Literal["verify", "download", "stage", "probe", "activate", "commit", "rollback", "noop"]


@dataclass(frozen=True)
class Target:
    """The desired model version: its manifest digest and the blobs (digest, size) its files need."""

    digest: str
    blobs: tuple[tuple[str, int], ...]
    label: str = ""  # "name@version", for reasons

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.blobs)


def target_of(desired: DesiredState | None) -> Target | None:
    """The target of a desired state, or ``None`` when it names no model. The blobs of an adapter version are its
    base's files and its own (the slot holds the pair); those already cached are not downloaded again."""
    if desired is None or desired.model is None:
        return None
    manifest = desired.model.envelope.manifest
    blobs: dict[str, int] = {}
    base = desired.model.base
    for entry in (*(base.manifest.files if base is not None else ()), *manifest.files):
        blobs.setdefault(entry.digest, entry.size)
    return Target(
        digest=desired.model.digest,
        blobs=tuple(sorted(blobs.items())),
        label=f"{manifest.name}@{manifest.version}",
    )


@dataclass(frozen=True)
class LocalView:
    """What the agent knows about itself, read from its data directory (and the clock, outside)."""

    active: str | None = None  # version digest the ``current`` slot points to
    previous: str | None = None  # version digest the ``previous`` slot points to
    committed: bool = True  # the active version passed its probation
    verified: frozenset[str] = frozenset()  # version digests whose manifest signature verified
    cached: frozenset[str] = frozenset()  # blob digests in the (verified) cache
    staged: frozenset[str] = frozenset()  # version digests with a complete slot directory
    probed: frozenset[str] = frozenset()  # version digests whose staged slot passed the health probe
    failed: Mapping[str, str] = field(default_factory=dict)  # version digest -> why it failed
    crash_counts: Mapping[str, int] = field(default_factory=dict)  # version digest -> crashes during probation
    active_crashed: bool = False  # the process died while serving the active version during its probation
    health_failures: int = 0  # consecutive failed periodic health checks of the active version
    probation_over: bool = False  # the active version served its whole probation window


@dataclass(frozen=True)
class Policy:
    max_crashes: int = 2
    max_health_failures: int = 3


@dataclass(frozen=True)
class Step:
    kind: StepKind
    digest: str | None
    reason: str
    blobs: tuple[str, ...] = ()  # download: the missing blob digests
    mark_failed: bool = False  # rollback: also mark the rolled-back version failed


def is_noop(steps: list[Step]) -> bool:
    return all(step.kind == "noop" for step in steps)


def short_digest(digest: str | None) -> str:
    """The first 12 hex digits of a ``sha256:`` digest, for messages; ``-`` for none."""
    return (digest or "-").removeprefix("sha256:")[:12]


def plan(target: Target | None, local: LocalView, policy: Policy | None = None) -> list[Step]:
    """The ordered steps that bring ``local`` to ``target``; ``[noop]`` when there is nothing to do."""
    policy = policy or Policy()
    active = local.active

    if active is not None and local.active_crashed and not local.committed:
        crashes = local.crash_counts.get(active, 0)
        give_up = crashes >= policy.max_crashes
        reason = (
            f"the agent died while serving {short_digest(active)} during its probation "
            f"({crashes} of {policy.max_crashes})"
        )
        if give_up:
            reason += "; the version is marked failed"
        return [Step("rollback", active, reason, mark_failed=give_up)]

    if (
        active is not None
        and local.health_failures >= policy.max_health_failures
        and (local.previous is not None or not local.committed)
    ):
        reason = f"{local.health_failures} consecutive health checks of {short_digest(active)} failed"
        return [Step("rollback", active, reason, mark_failed=True)]

    if target is None:
        return [Step("noop", None, "no model is desired for this device; keeping what is active")]

    digest = target.digest
    name = target.label or short_digest(digest)
    if digest in local.failed:
        return [
            Step(
                "noop",
                digest,
                f"{name} failed on this device ({local.failed[digest]}); waiting for a new desired version",
            )
        ]

    if active == digest:
        if local.committed:
            return [Step("noop", digest, f"{name} is active and committed")]
        if local.probation_over:
            return [Step("commit", digest, f"{name} served its probation without failing")]
        return [Step("noop", digest, f"{name} is active and on probation")]

    steps: list[Step] = []
    if digest not in local.verified:
        steps.append(Step("verify", digest, f"check the signature of {name} before downloading anything"))
    staged = digest in local.staged  # a staged slot holds its own links to the blobs
    missing = () if staged else tuple(blob for blob, _ in target.blobs if blob not in local.cached)
    if missing:
        steps.append(Step("download", digest, f"{len(missing)} blob(s) of {name} are not cached", blobs=missing))
    if not staged:
        steps.append(Step("stage", digest, f"stage {name} into its own slot"))
    if digest not in local.probed:
        steps.append(Step("probe", digest, f"health-probe {name} before switching to it"))
    reason = f"switch from {short_digest(active)} to {name}" if active else f"start serving {name}"
    steps.append(Step("activate", digest, reason))
    return steps
