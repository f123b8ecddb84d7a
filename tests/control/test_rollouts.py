"""The rollout controller on every database backend, driven tick by tick with a controllable clock.

Devices here are rows with status reports and telemetry windows written through the same service calls the HTTP
routes use; the fleet simulator and real agents exercise the same controller over HTTP in tests/sim and tests/agent.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.control.blueprints import apply_blueprint, get_blueprint
from slmops.control.db import ReleaseMemberRow
from slmops.control.desired_state import desired_state_for
from slmops.control.devices import get_device, report_status
from slmops.control.enrollment import create_enrollment_token, enroll_device
from slmops.control.lease import acquire_lease, release_lease
from slmops.control.plane import ControlPlane
from slmops.control.rollouts import (
    CONTROLLER_LEASE,
    RolloutController,
    abort_release,
    pause_release,
    promote_release,
    release,
    release_events,
    resume_release,
    start_release,
)
from slmops.control.rollouts import controller as controller_module
from slmops.control.schemas import ReleaseStart
from slmops.control.settings import ServerSettings
from slmops.control.telemetry import store_telemetry
from slmops.core.rollout import GateSpec, RolloutPolicy
from slmops.core.wire import DeviceEvent, StatusReport, TelemetryBatch, TelemetryWindow
from slmops.errors import ConflictError, NotFoundError
from slmops.telemetry.aggregate import histogram_from_ms
from tests.control.conftest import Clock, Device, Variants, register_variants

GiB = 1 << 30
BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: shops}
spec:
  model: {name: tiny, ref: v1}
"""
POLICY = RolloutPolicy(
    stages=(0.1, 0.5, 1.0),
    soak_s=60,
    min_reporting_devices=2,
    gates=(
        GateSpec(name="crashes", metric="crashes", min_samples=2, critical=True),
        GateSpec(name="rollbacks", metric="rollbacks", min_samples=1, max_rate=0.1, critical=True),
        GateSpec(name="errors", metric="errors", min_samples=100, max_increase=0.02, critical=True),
        GateSpec(name="latency", metric="latency", min_samples=50, max_ratio=1.3),
    ),
)


class Fleet:
    """Devices of two classes (8 GiB and 16 GiB) that report status and telemetry through the service."""

    def __init__(self, plane: ControlPlane, clock: Clock, new_device: Callable[..., Device], n: int = 20) -> None:
        self.plane, self.clock = plane, clock
        token = create_enrollment_token(
            plane, max_uses=1000, expires_in_s=None, auto_approve=True, labels={}, created_by="test"
        ).token
        self.classes: dict[str, str] = {}
        self.active: dict[str, str | None] = {}
        self.events: dict[str, list[DeviceEvent]] = {}
        for i in range(n):
            answer = enroll_device(plane, new_device(8 if i % 2 else 16).enroll_request(token))
            self.classes[answer.device_id] = get_device(plane, answer.device_id).device_class
            self.active[answer.device_id] = None
            self.events[answer.device_id] = []
        self.ever_ran: dict[str, set[str]] = {d: set() for d in self.classes}
        self.window = 0

    def sync(
        self,
        offline: frozenset[str] | set[str] = frozenset(),
        fail_on: Callable[[str, str], bool] | None = None,
        failure: str = "rolled_back",
    ) -> None:
        """Every online device reaches its desired version and reports; ``fail_on(device, digest)`` rolls back."""
        for device_id in self.classes:
            if device_id in offline:
                continue
            desired = desired_state_for(self.plane, device_id).model
            if desired is not None and desired.digest != self.active[device_id]:
                if fail_on is not None and fail_on(device_id, desired.digest):
                    self.events[device_id].append(_event(failure, desired.digest))
                else:
                    self.active[device_id] = desired.digest
                    self.ever_ran[device_id].add(desired.digest)
            report = StatusReport(
                phase="serving", health="ok", active_digest=self.active[device_id], events=self.events[device_id]
            )
            report_status(self.plane, device_id, report)
            self.events[device_id] = []

    def telemetry(
        self,
        offline: frozenset[str] | set[str] = frozenset(),
        behaviour: Callable[[str, str], tuple[float, float]] | None = None,
        requests: int = 40,
    ) -> None:
        """One window per online device: ``behaviour(class, digest) -> (mean latency ms, error rate)``."""
        self.window += 1
        for device_id, device_class in self.classes.items():
            digest = self.active[device_id]
            if device_id in offline or digest is None:
                continue
            latency, error_rate = (behaviour or (lambda c, d: (200.0, 0.001)))(device_class, digest)
            rng = random.Random(f"{device_id}:{self.window}")
            samples = [rng.lognormvariate(0, 0.3) * latency for _ in range(requests)]
            window = TelemetryWindow(
                id=uuid.uuid4().hex,
                version_digest=digest,
                window_start=self.clock().isoformat().replace("+00:00", "Z"),
                window_s=30,
                requests=requests,
                errors=sum(1 for _ in range(requests) if rng.random() < error_rate),
                latency_ms=histogram_from_ms(samples),
            )
            store_telemetry(self.plane, device_id, TelemetryBatch(windows=[window]))

    def members(self, release_id: str) -> dict[str, int]:
        with Session(self.plane.engine) as session:
            rows = session.scalars(select(ReleaseMemberRow).where(ReleaseMemberRow.release_id == release_id))
            return {r.device_id: r.stage_index for r in rows}


def _event(kind: str, digest: str) -> DeviceEvent:
    return DeviceEvent(id=uuid.uuid4().hex, time="2025-06-01T12:00:00Z", kind=kind, version_digest=digest, detail={})


@pytest.fixture
def setup(
    plane: ControlPlane, clock: Clock, new_device: Callable[..., Device], tmp_path: Path
) -> tuple[ControlPlane, Fleet, Variants, Variants]:
    plane.settings = ServerSettings(
        home=tmp_path / "home",
        device_offline_after_s=60,
        device_offline_grace_s=30,
        desired_cache_ttl_s=0,
        rollout_lease_s=30,
    )
    old = register_variants(plane.registry, tmp_path, "tiny")
    (tmp_path / "new").mkdir()
    new = register_variants(plane.registry, tmp_path / "new", "tiny")
    apply_blueprint(plane, BLUEPRINT, "test")
    fleet = Fleet(plane, clock, new_device)
    fleet.sync()
    return plane, fleet, old, new


def _family(v: Variants) -> set[str]:
    return {v.base.digest, v.q8.digest, v.q4.digest}


def _run(fleet: Fleet, controller: RolloutController, steps: int, **telemetry: object) -> None:
    for _ in range(steps):
        fleet.sync(**{k: v for k, v in telemetry.items() if k in ("offline", "fail_on")})  # type: ignore[arg-type]
        fleet.telemetry(**{k: v for k, v in telemetry.items() if k in ("offline", "behaviour")})  # type: ignore[arg-type]
        fleet.clock.advance(30)
        controller.tick()


def test_a_healthy_release_goes_through_every_stage_and_the_blueprint_then_names_it(setup) -> None:  # type: ignore[no-untyped-def]
    plane, fleet, old, new = setup
    assert all(d in _family(old) for d in fleet.active.values())
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=POLICY), "ops")
    assert started.state == "running" and started.stage == 1
    members = fleet.members(started.id)
    per_class = {c: sum(1 for d in members if fleet.classes[d] == c) for c in set(fleet.classes.values())}
    assert per_class and all(n >= 1 for n in per_class.values())  # every class has canaries at 10%
    controller = RolloutController(plane, holder="a")
    seen: list[dict[str, int]] = []
    for _ in range(40):
        _run(fleet, controller, 1)
        seen.append(fleet.members(started.id))
        if release(plane, started.id).state != "running":
            break
    final = release(plane, started.id)
    assert final.state == "completed", final.reason
    for before, after in itertools.pairwise(seen):  # membership only grows, nobody leaves
        assert set(before) <= set(after) and all(after[d] == s for d, s in before.items())
    fleet.sync()
    assert all(d in _family(new) for d in fleet.active.values())
    kinds = [e.kind for e in release_events(plane, started.id)]
    assert kinds[0] == "started" and kinds.count("promoted") == 2 and kinds[-1] == "completed"
    promoted = next(e for e in release_events(plane, started.id) if e.kind == "promoted")
    gates = {g["gate"]: g for c in promoted.numbers["classes"] for g in c["gates"]}
    assert gates["latency"]["verdict"] == "pass" and "p_value" in gates["latency"]["numbers"]
    blueprint = get_blueprint(plane, "shops")
    assert blueprint.revision == 2 and blueprint.model == "tiny@v4"
    assert desired_state_for(plane, next(iter(fleet.classes))).reason.count("canary") == 0


def test_a_release_bad_on_one_class_halts_in_stage_one_and_every_device_returns(setup) -> None:  # type: ignore[no-untyped-def]
    plane, fleet, old, new = setup
    bad_class = sorted(set(fleet.classes.values()))[0]
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=POLICY), "ops")
    stage_one = set(fleet.members(started.id))

    def behaviour(device_class: str, digest: str) -> tuple[float, float]:
        return (200.0, 0.3) if device_class == bad_class and digest in _family(new) else (200.0, 0.001)

    controller = RolloutController(plane, holder="a")
    _run(fleet, controller, 6, behaviour=behaviour)
    final = release(plane, started.id)
    assert final.state == "halted" and final.stage == 1
    assert f"class {bad_class}" in final.reason and "errors" in final.reason
    halted = [e for e in release_events(plane, started.id) if e.kind == "halted"]
    assert len(halted) == 1
    failing = [c for c in halted[0].numbers["classes"] if c["status"] == "fail"]
    assert [c["device_class"] for c in failing] == [bad_class]
    error_gate = next(g for g in failing[0]["gates"] if g["gate"] == "errors")
    assert error_gate["numbers"]["p_value"] < 0.05 and error_gate["numbers"]["canary_rate"] > 0.1
    ever = {d for d, digests in fleet.ever_ran.items() if digests & _family(new)}
    assert ever and ever <= stage_one
    fleet.sync()
    assert all(d in _family(old) for d in fleet.active.values())


def test_no_data_holds_and_offline_canaries_neither_block_nor_count(setup) -> None:  # type: ignore[no-untyped-def]
    plane, fleet, _old, _new = setup
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=POLICY), "ops")
    controller = RolloutController(plane, holder="a")
    fleet.clock.advance(600)
    controller.tick()  # soaked, but nobody reported on the new version: no data never passes
    assert release(plane, started.id).stage == 1
    assert "waiting" in release(plane, started.id).reason or "no class" in release(plane, started.id).reason
    # Every canary of one class goes offline before it ever switches.
    members = fleet.members(started.id)
    offline_class = sorted(set(fleet.classes.values()))[0]
    offline = {d for d in members if fleet.classes[d] == offline_class}
    _run(fleet, controller, 8, offline=offline)
    fleet.clock.advance(300)  # they stay away past the offline threshold
    _run(fleet, controller, 3, offline=offline)
    now = release(plane, started.id)
    assert now.stage >= 2, now.reason  # the offline class did not block the stage forever
    promoted = next(e for e in release_events(plane, started.id) if e.kind == "promoted")
    statuses = {c["device_class"]: c["status"] for c in promoted.numbers["classes"]}
    assert statuses[offline_class] == "not judged"  # ... nor was it counted as healthy
    assert all(s == "pass" for c, s in statuses.items() if c != offline_class)


@pytest.mark.parametrize("failure", ["rolled_back", "probe_failed"])
def test_failed_activations_on_canaries_halt_at_once(setup, failure: str) -> None:  # type: ignore[no-untyped-def]
    plane, fleet, _old, new = setup
    policy = POLICY.model_copy(update={"stages": (0.5, 1.0)})  # one rollback of one canary is not yet evidence
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=policy), "ops")
    controller = RolloutController(plane, holder="a")
    for _ in range(2):
        fleet.sync(fail_on=lambda device, digest: digest in _family(new), failure=failure)
        fleet.clock.advance(30)
        controller.tick()
    final = release(plane, started.id)
    assert final.state == "halted" and "rollbacks" in final.reason


def test_operators_pause_resume_promote_and_abort(setup) -> None:  # type: ignore[no-untyped-def]
    plane, fleet, old, new = setup
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=POLICY), "ops")
    with pytest.raises(ConflictError, match="finish it first"):
        start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4"), "ops")
    with pytest.raises(NotFoundError, match="apply it first"):
        start_release(plane, ReleaseStart(blueprint="nope", to="tiny@v4"), "ops")
    controller = RolloutController(plane, holder="a")
    assert pause_release(plane, started.id, "ops").state == "paused"
    with pytest.raises(ConflictError, match="only a running"):
        pause_release(plane, started.id, "ops")
    _run(fleet, controller, 6)
    assert release(plane, started.id).stage == 1  # paused: never promoted
    before = len(release_events(plane, started.id))
    controller.tick()
    controller.tick()
    assert len(release_events(plane, started.id)) == before  # ticks are idempotent: no new decision, no event
    assert resume_release(plane, started.id, "ops").state == "running"
    assert promote_release(plane, started.id, "ops").stage == 2
    assert len(fleet.members(started.id)) >= len(fleet.classes) // 2
    fleet.sync()
    assert any(d in _family(new) for d in fleet.active.values())
    aborted = abort_release(plane, started.id, "ops")
    assert aborted.state == "aborted"
    fleet.sync()
    assert all(d in _family(old) for d in fleet.active.values())
    kinds = [e.kind for e in release_events(plane, started.id)]
    assert kinds == ["started", "paused", "hold", "resumed", "promoted", "aborted"] or kinds[-1] == "aborted"
    assert {"paused", "resumed", "promoted", "aborted"} <= set(kinds)


def test_one_controller_holds_the_lease_and_another_resumes_after_it_stops(setup) -> None:  # type: ignore[no-untyped-def]
    plane, fleet, _old, _new = setup
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=POLICY), "ops")
    first, second = RolloutController(plane, holder="a"), RolloutController(plane, holder="b")
    assert first.tick() == [started.id]
    assert second.tick() == []  # "a" holds the lease
    for _ in range(10):
        _run(fleet, first, 1)
        if release(plane, started.id).stage >= 2:
            break
    assert release(plane, started.id).stage >= 2, release(plane, started.id).reason
    # "a" dies without handing the lease back: "b" takes over once it expires, and carries on from the database.
    fleet.clock.advance(31)
    assert second.tick() == [started.id]
    assert first.tick() == []
    for _ in range(30):
        _run(fleet, second, 1)
        if release(plane, started.id).state != "running":
            break
    assert release(plane, started.id).state == "completed"


def test_a_controller_that_lost_the_lease_while_it_evaluated_writes_nothing(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fence: "a" decides to promote, but before it writes, its lease passed to "b" (it was late: a pause, a
    slow database). "a" must write neither the promotion nor its event; "b" then promotes exactly once."""
    plane, fleet, _old, _new = setup
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=POLICY), "ops")
    late, successor = RolloutController(plane, holder="a"), RolloutController(plane, holder="b")
    original = controller_module.evaluate_stage
    taken_over: list[int] = []

    def evaluate_then_lose_the_lease(*args: Any, **kwargs: Any) -> Any:
        evaluation = original(*args, **kwargs)
        if evaluation.decision == "promote" and not taken_over:
            taken_over.append(release(plane, started.id).stage)  # "a"'s lease expires; "b" takes it
            assert acquire_lease(plane.engine, CONTROLLER_LEASE, "b", 30, plane.now_epoch() + 31)
        return evaluation

    monkeypatch.setattr(controller_module, "evaluate_stage", evaluate_then_lose_the_lease)
    for _ in range(10):
        _run(fleet, late, 1)
        if taken_over:
            break
    assert taken_over, release(plane, started.id).reason
    stage = taken_over[0]
    assert release(plane, started.id).stage == stage  # "a" decided to promote but wrote nothing
    assert [e.kind for e in release_events(plane, started.id)].count("promoted") == 0
    assert late.tick() == []  # and it knows it no longer holds the lease
    fleet.clock.advance(31)
    successor.tick()
    assert release(plane, started.id).stage == stage + 1
    promoted = [e for e in release_events(plane, started.id) if e.kind == "promoted"]
    assert [(e.stage, e.actor) for e in promoted] == [(stage + 1, "controller")]


def test_two_controllers_deciding_on_the_same_revision_write_one_decision(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optimistic locking: "a" and "b" both read the release at the same revision and both decide to promote (the
    lease changed hands between their reads); only the first write lands, with one event."""
    plane, fleet, _old, _new = setup
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=POLICY), "ops")
    first, second = RolloutController(plane, holder="a"), RolloutController(plane, holder="b")
    original = controller_module.evaluate_stage
    interleaved: list[int] = []

    def evaluate_while_the_other_decides(*args: Any, **kwargs: Any) -> Any:
        evaluation = original(*args, **kwargs)
        if evaluation.decision == "promote" and not interleaved:
            interleaved.append(release(plane, started.id).stage)
            release_lease(plane.engine, CONTROLLER_LEASE, "a")
            second.tick()  # "b" reads the same revision, promotes and commits first
        return evaluation

    monkeypatch.setattr(controller_module, "evaluate_stage", evaluate_while_the_other_decides)
    for _ in range(10):
        _run(fleet, first, 1)
        if interleaved:
            break
    assert interleaved, release(plane, started.id).reason
    assert release(plane, started.id).stage == interleaved[0] + 1  # promoted once, not twice
    promoted = [e for e in release_events(plane, started.id) if e.kind == "promoted"]
    assert [e.stage for e in promoted] == [interleaved[0] + 1]


def test_an_event_cursor_beyond_the_databases_integers_finds_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    """The API admits a 64-bit cursor (SQLite's ids); PostgreSQL's 32-bit id column answers an empty page too."""
    plane, _fleet, _old, _new = setup
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=POLICY), "ops")

    assert [e.kind for e in release_events(plane, started.id)] == ["started"]
    assert release_events(plane, started.id, after=2**31) == []
    assert release_events(plane, started.id, after=2**63 - 1) == []
