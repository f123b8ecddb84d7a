"""Desired state: what a device should run now, and which blobs it may therefore download.

It depends on the device (labels, capabilities, class) and on the *world*: the current blueprints, the active
releases with their canaries, and the registry versions the blueprints can resolve to. The world is loaded at most
every ``desired_cache_ttl_s`` (and at once after a change made through this process), so a poll costs one device
read instead of reading every blueprint and walking the registry; other replicas, and registry changes made by
other processes, are seen within the TTL. A recorded canary of a running or paused release gets the release's new
version; every other device gets its winning blueprint as applied. The site adaptations (:mod:`slmops.control.sites`)
are part of the world too; each device's is resolved against its winning blueprint's limits.

An adapter version's desired model carries its base (``DesiredModel.base``): such a device may download the blobs
of both.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from slmops.control._candidates import CandidateCache
from slmops.control.blueprints import applied_blueprints
from slmops.control.credentials import DeviceCaller, device_caller
from slmops.control.devices import require_device
from slmops.control.repository import ControlRepository
from slmops.control.sites import load_site_adaptations
from slmops.core.adaptation import SiteAdaptation
from slmops.core.desired import AppliedBlueprint, DeviceFacts, desired_state, generation_of, ranked_matches
from slmops.core.wire import Capabilities, DesiredState

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = ["ActiveRelease", "World", "WorldCache", "blob_allowed", "desired_state_for", "desired_state_of"]


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
class World:
    """Everything desired state depends on besides the device, with the desired states computed from it so far."""

    key: int  # a new number whenever anything in it changed
    loaded_at: float  # time.monotonic()
    signature: tuple[object, ...]
    applied: list[AppliedBlueprint]
    releases: dict[str, ActiveRelease]  # by blueprint name
    candidates: CandidateCache
    sites: dict[str, SiteAdaptation] = field(default_factory=dict)  # what each site set, by site name
    memo: dict[str, tuple[tuple[object, ...], DesiredState]] = field(default_factory=dict)


class WorldCache:
    """The last :class:`World` loaded, shared by the requests of one process."""

    def __init__(self) -> None:
        self._world: World | None = None
        self._lock = threading.Lock()
        self._key = 0

    def invalidate(self) -> None:
        """Forget the cached blueprints, releases and registry look-ups (after a change made here)."""
        with self._lock:
            self._world = None

    def fresh(self, plane: ControlPlane) -> World | None:
        """The cached world while it is fresh, without waiting for the lock or loading anything: None when it must
        be loaded (then call :meth:`current`, off the event loop)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            world = self._world
            if world is not None and time.monotonic() - world.loaded_at < plane.settings.desired_cache_ttl_s:
                return world
            return None
        finally:
            self._lock.release()

    def current(self, plane: ControlPlane) -> World:
        """The world, loaded again when older than ``desired_cache_ttl_s``; the same :class:`World` (and its memo)
        when nothing in it changed."""
        with self._lock:
            now = time.monotonic()
            world = self._world
            if world is not None and now - world.loaded_at < plane.settings.desired_cache_ttl_s:
                return world
            with Session(plane.engine) as session:
                repo = ControlRepository(session)
                applied = applied_blueprints(repo.current_blueprints())
                releases = {
                    row.blueprint: ActiveRelease(
                        row.id,
                        row.blueprint,
                        row.stage_index,
                        row.to_name,
                        row.to_digest,
                        repo.release_member_ids(row.id),
                    )
                    for row in repo.active_releases()
                }
                sites = load_site_adaptations(session)
            candidates = CandidateCache(plane.registry)
            references = [b.blueprint.spec.model.reference for b in applied]
            references += [f"{r.to_name}@{r.to_digest}" for r in releases.values()]
            signature = (
                tuple((b.label, b.blueprint.digest) for b in applied),
                tuple(sorted((r.id, r.stage_index, r.to_digest, r.members) for r in releases.values())),
                tuple((ref, tuple(e.digest for e in candidates.get(ref).versions)) for ref in references),
                tuple((ref, tuple(e.digest for e in candidates.get(ref).adapters)) for ref in references),
                tuple((name, a.model_dump_json()) for name, a in sorted(sites.items())),
            )
            if world is not None and world.signature == signature:
                world.loaded_at = now  # nothing changed: keep the memoised states
                return world
            self._key += 1
            world = World(self._key, now, signature, applied, releases, candidates, sites)
            self._world = world
            return world


def desired_state_for(plane: ControlPlane, device_id: str) -> DesiredState:
    """The state ``device_id`` should reach, memoised per world while the device's class, labels and capabilities
    stay the same."""
    with Session(plane.engine) as session:
        device = require_device(ControlRepository(session), device_id)
        caller = device_caller(device)
    return desired_state_of(plane, caller)


def desired_state_of(plane: ControlPlane, device: DeviceCaller, world: World | None = None) -> DesiredState:
    """The state of a device already read (by :func:`~slmops.control.credentials.authenticate_device` on the
    poll's hot path) in ``world`` (the current one when not given): no query of its own while the world is cached
    and the device unchanged."""
    world = world or plane.world_cache.current(plane)
    fingerprint = device.fingerprint
    cached = world.memo.get(device.id)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    raw = device.capabilities()
    caps = Capabilities.model_validate(raw) if raw else None
    facts = DeviceFacts(
        device_id=device.id, labels=device.labels(), capabilities=caps, device_class=device.device_class
    )
    state = _desired_in(world, facts)
    world.memo[device.id] = (fingerprint, state)
    return state


def blob_allowed(plane: ControlPlane, device_id: str, digest: str) -> bool:
    """Whether a device may download a blob: only the files of the version its desired state names (and of that
    version's base when it is an adapter)."""
    state = desired_state_for(plane, device_id)
    if state.model is None:
        return False
    envelopes = [state.model.envelope] + ([state.model.base] if state.model.base is not None else [])
    return any(f.digest == digest for e in envelopes for f in e.manifest.files)


def _desired_in(world: World, facts: DeviceFacts) -> DesiredState:
    applied = world.applied
    matched = ranked_matches(facts, applied)
    release = world.releases.get(matched[0].blueprint.name) if matched else None
    if release is not None and facts.device_id in release.members:
        canary = _canary_blueprint(matched[0], release)
        applied = [canary if b is matched[0] else b for b in applied]
        matched = [canary, *matched[1:]]
        state = desired_state(facts, applied, world.candidates.for_blueprints(matched[:1]), world.sites)
        reason = f"{state.reason} [canary of release {release.id}, stage {release.stage_index + 1}]"
        state = state.model_copy(update={"reason": reason})
        return state.model_copy(update={"generation": generation_of(state)})
    return desired_state(facts, applied, world.candidates.for_blueprints(matched[:1]), world.sites)


def _canary_blueprint(applied: AppliedBlueprint, release: ActiveRelease) -> AppliedBlueprint:
    spec = applied.blueprint.spec
    model = spec.model.model_copy(update={"name": release.to_name, "ref": release.to_digest})
    blueprint = applied.blueprint.model_copy(update={"spec": spec.model_copy(update={"model": model})})
    return AppliedBlueprint(blueprint, applied.revision)
