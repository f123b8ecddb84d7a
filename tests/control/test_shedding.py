"""Load shedding on a real uvicorn server on loopback: over the bound a device request gets ``503`` with
``Retry-After`` at once (or after a short bounded wait), under it the normal answer; operator endpoints pass."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from slmops.control.app import create_app
from slmops.control.blueprints import apply_blueprint
from slmops.control.devices import get_device, report_status
from slmops.control.enrollment import create_enrollment_token, enroll_device
from slmops.control.plane import ControlPlane
from slmops.control.rollouts import RolloutController, release, release_events, start_release
from slmops.control.schemas import ReleaseStart
from slmops.control.settings import ServerSettings
from slmops.control.shedding import DEVICE_PATH, LoadShedder, SheddingStats, install_shedding
from slmops.core.rollout import GateSpec, RolloutPolicy
from slmops.core.wire import StatusReport
from tests.agent.simulator import SimServer
from tests.control.conftest import Clock, Device, register_variants
from tests.control.test_rollouts import Fleet

ROLLOUT_BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: shops}
spec:
  model: {name: tiny, ref: v1}
"""
ROLLOUT_POLICY = RolloutPolicy(
    stages=(0.1, 0.5, 1.0),
    soak_s=60,
    min_reporting_devices=2,
    gates=(
        GateSpec(name="crashes", metric="crashes", min_samples=2, critical=True),
        GateSpec(name="errors", metric="errors", min_samples=100, max_increase=0.02, critical=True),
    ),
)


class Gate:
    """Device requests block until released, so the test decides how many are in flight."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = 0
        self.lock = threading.Lock()

    def wait_entered(self, count: int, timeout_s: float = 5) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                if self.entered >= count:
                    return
            assert time.monotonic() < deadline, f"only {self.entered} of {count} requests reached the endpoint"
            time.sleep(0.01)


def blocking_app(gate: Gate) -> FastAPI:
    app = FastAPI()

    @app.get("/api/v1/devices/{device_id}/desired")
    async def desired(device_id: str) -> dict[str, str]:
        with gate.lock:
            gate.entered += 1
        while not gate.open.is_set():
            await asyncio.sleep(0.01)
        return {"device_id": device_id}

    @app.get("/api/v1/devices")
    def devices() -> list[str]:  # the operators' list: never shed
        return ["a", "b"]

    return app


@pytest.fixture
def gate() -> Gate:
    return Gate()


def serve(gate: Gate, **options: object) -> Iterator[tuple[str, SheddingStats]]:
    stats = SheddingStats()
    app = blocking_app(gate)
    app.add_middleware(LoadShedder, stats=stats, rng=random.Random(3), **options)  # type: ignore[arg-type]
    server = SimServer(app).start()
    try:
        yield server.url, stats
    finally:
        gate.open.set()
        server.stop()


@pytest.fixture
def shedding_server(gate: Gate) -> Iterator[tuple[str, SheddingStats]]:
    yield from serve(gate, max_in_flight=2, max_queued=1, queue_wait_s=0.3, retry_after_s=4, retry_after_jitter_s=3)


def get(url: str, path: str) -> httpx.Response:
    return httpx.get(f"{url}{path}", timeout=5)


def test_under_the_bound_requests_are_served(gate: Gate, shedding_server: tuple[str, SheddingStats]) -> None:
    url, stats = shedding_server
    gate.open.set()
    answers = [get(url, f"/api/v1/devices/d{i}/desired") for i in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert stats.admitted == 5 and stats.shed == 0 and stats.in_flight == 0


def test_over_the_bound_device_requests_get_503_with_retry_after_and_none_hangs(
    gate: Gate, shedding_server: tuple[str, SheddingStats]
) -> None:
    url, stats = shedding_server
    with ThreadPoolExecutor(8) as pool:
        held = [pool.submit(get, url, f"/api/v1/devices/h{i}/desired") for i in range(2)]
        gate.wait_entered(2)
        queued = pool.submit(get, url, "/api/v1/devices/q/desired")  # waits up to 0.3 s, then shed
        deadline = time.monotonic() + 5
        while stats.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        started = time.monotonic()
        refused = get(url, "/api/v1/devices/x/desired")  # the queue is full: shed at once
        refused_s = time.monotonic() - started
        late = queued.result(timeout=5)
        operator = get(url, "/api/v1/devices")  # not a device endpoint: served while the device bound is full
        gate.open.set()
        assert [f.result(timeout=5).status_code for f in held] == [200, 200]

    for answer in (refused, late):
        assert answer.status_code == 503
        assert 4 <= int(answer.headers["Retry-After"]) <= 7
        body = answer.json()
        assert body["code"] == "overloaded" and "retry after" in body["message"]
    assert refused_s < 0.25  # answered before the queue wait, not after it
    assert operator.status_code == 200 and operator.json() == ["a", "b"]
    assert gate.entered == 2  # the shed requests never reached the endpoint
    assert stats.shed == 2 and stats.admitted == 2 and stats.in_flight == 0 and stats.waiting == 0


def test_a_queued_request_takes_the_slot_that_frees_within_the_wait(gate: Gate) -> None:
    for url, stats in serve(gate, max_in_flight=1, max_queued=4, queue_wait_s=3.0):
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(get, url, "/api/v1/devices/a/desired")
            gate.wait_entered(1)
            second: Future[httpx.Response] = pool.submit(get, url, "/api/v1/devices/b/desired")
            deadline = time.monotonic() + 5
            while stats.waiting < 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            gate.open.set()
            assert first.result(timeout=5).status_code == 200
            assert second.result(timeout=5).status_code == 200
        assert stats.queued == 1 and stats.shed == 0 and stats.in_flight == 0


def test_without_a_queue_the_request_over_the_bound_is_shed_at_once(gate: Gate) -> None:
    for url, stats in serve(gate, max_in_flight=1, queue_wait_s=0, retry_after_s=2, retry_after_jitter_s=0):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(get, url, "/api/v1/devices/a/desired")
            gate.wait_entered(1)
            refused = get(url, "/api/v1/devices/b/desired")
            gate.open.set()
            assert first.result(timeout=5).status_code == 200
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "2"
        assert stats.shed == 1


def test_which_paths_are_device_requests() -> None:
    for path in (
        "/api/v1/enroll",
        "/api/v1/enroll/claim",
        "/api/v1/devices/dev-1/desired",
        "/api/v1/devices/dev-1/status",
        "/api/v1/devices/dev-1/telemetry",
        "/api/v1/devices/dev-1/feedback",
    ):
        assert DEVICE_PATH.match(path), path
    for path in (
        "/api/v1/health",
        "/api/v1/devices",
        "/api/v1/devices/dev-1",
        "/api/v1/devices/dev-1/events",
        "/api/v1/devices/dev-1/approve",
        "/api/v1/blobs/sha256:00",
        "/metrics",
        "/ui/",
    ):
        assert not DEVICE_PATH.match(path), path


def test_install_reads_the_settings_with_defaults_and_the_control_plane_uses_it(file_plane: ControlPlane) -> None:
    app = FastAPI()
    settings = file_plane.settings.model_copy(update={"shed_max_in_flight": 7, "shed_retry_after_s": 1})
    stats = install_shedding(app, settings)
    assert app.state.shedding is stats
    options = app.user_middleware[0].kwargs
    assert options["max_in_flight"] == 7 and options["retry_after_s"] == 1
    assert options["queue_wait_s"] == 0.5 and options["max_queued"] == 256  # the defaults of the rest

    control = create_app(plane=file_plane)
    assert any(m.cls is LoadShedder for m in control.user_middleware)
    assert isinstance(control.state.shedding, SheddingStats)


# ------------------------------------------------------------------------------------------------------------------
# A restart under load also leaves devices silent for a while: one is offline only after its TTL plus grace, and a
# stage whose canaries are silent holds (waits for them, then leaves them not judged) instead of passing.


def test_a_silent_device_is_offline_only_after_its_ttl_plus_grace(
    plane: ControlPlane, clock: Clock, new_device: Callable[..., Device]
) -> None:
    token = create_enrollment_token(
        plane, max_uses=1, expires_in_s=None, auto_approve=True, labels={}, created_by="test"
    ).token
    device_id = enroll_device(plane, new_device().enroll_request(token)).device_id
    report_status(plane, device_id, StatusReport(phase="idle", health="unknown"))
    ttl = plane.settings.device_offline_after_s + plane.settings.device_offline_grace_s  # 60 + 30 in these tests
    clock.advance(plane.settings.device_offline_after_s + 1)  # past the TTL, within the grace
    assert get_device(plane, device_id).online
    clock.advance(ttl - plane.settings.device_offline_after_s - 1)  # exactly TTL + grace
    assert get_device(plane, device_id).online
    clock.advance(1)
    assert not get_device(plane, device_id).online
    report_status(plane, device_id, StatusReport(phase="idle", health="unknown"))  # back: online at once
    assert get_device(plane, device_id).online


def test_a_stage_whose_canaries_fall_silent_holds_and_never_passes_until_they_report(
    plane: ControlPlane, clock: Clock, new_device: Callable[..., Device], tmp_path: Path
) -> None:
    plane.settings = ServerSettings(
        home=tmp_path / "home",
        device_offline_after_s=60,
        device_offline_grace_s=30,
        desired_cache_ttl_s=0,
        rollout_lease_s=3600,
    )
    register_variants(plane.registry, tmp_path, "tiny")
    (tmp_path / "new").mkdir()
    register_variants(plane.registry, tmp_path / "new", "tiny")
    apply_blueprint(plane, ROLLOUT_BLUEPRINT, "test")
    fleet = Fleet(plane, clock, new_device)
    fleet.sync()
    controller = RolloutController(plane, holder="hd")
    started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=ROLLOUT_POLICY), "ops")
    controller.tick()
    canaries = set(fleet.members(started.id))
    assert canaries
    fleet.sync()  # the canaries switch to the new version and report it ... then fall silent (a restart, a cut)
    silent_since = clock()

    def online_canaries() -> int:
        return sum(c.online_members for c in release(plane, started.id).classes)

    seen_online, seen_offline = False, False
    for _ in range(8):  # 8 x 30 s = 4 minutes, beyond the 60 s soak and the 90 s TTL + grace
        fleet.sync(offline=canaries)
        fleet.telemetry(offline=canaries)
        clock.advance(30)
        controller.tick()
        now = release(plane, started.id)
        assert now.state == "running" and now.stage == 1, now.reason  # held: neither promoted nor halted
        silent_s = (clock() - silent_since).total_seconds()
        if silent_s <= 90:
            assert online_canaries() == len(canaries)  # within TTL + grace: still online, so waited for
            assert "waiting" in now.reason or "soaking" in now.reason, now.reason
            seen_online = True
        else:
            assert online_canaries() == 0
            assert "no class could be judged" in now.reason, now.reason  # offline: not judged, not healthy
            seen_offline = True
    assert seen_online and seen_offline
    assert not [e for e in release_events(plane, started.id) if e.kind == "promoted"]

    for _ in range(3):  # back: they report on the new version, and the stage passes on their data
        fleet.sync()
        fleet.telemetry()
        clock.advance(30)
        controller.tick()
    assert release(plane, started.id).stage == 2, release(plane, started.id).reason
