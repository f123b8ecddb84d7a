"""Several stateless `slmops server` replicas behind haproxy on one PostgreSQL database.

Three real `slmops server` processes share one PostgreSQL schema (and one SLMOPS_HOME for blobs and keys); haproxy
balances them round robin and health-checks ``/api/v1/health``. A simulated fleet polls and reports through the load
balancer while a staged release runs. Once the release has been promoted once, the replica holding the
rollout-controller lease (its holder names its pid) is SIGKILLed: the lease must pass to another replica within the
lease TTL (plus one tick), the release must still complete, and its events must show each promotion exactly once, in
order: no decision taken twice (by the dead holder and its successor) and none lost.

Uvicorn with several workers per replica: `slmops server --workers 2` answers from both workers and exactly one of
them holds the lease; SIGKILLing that worker moves the lease to the other.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.cli import run
from slmops.config import Settings
from slmops.control.lease import Lease, current_lease
from slmops.control.rollouts import CONTROLLER_LEASE
from slmops.registry import Registry
from slmops.registry.db import make_engine
from slmops.sim import BackgroundFleet, FleetRun, parse_fleet
from tests.lb_servers import HAPROXY, Replica, running_haproxy
from tests.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")

TICK_S = 0.5
LEASE_S = 3.0
DEVICES = 30
POLICY: dict[str, Any] = {
    "stages": [0.2, 0.5, 1.0],
    "soak_s": 4,
    "min_reporting_devices": 2,
    "gates": [{"name": "crashes", "metric": "crashes", "min_samples": 2, "critical": True}],
}
BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: lb}
spec:
  selector: {labels: {site: lb}}
  model: {name: tiny, ref: v1}
"""
FLEET = f"""\
seed: 3
profiles:
  box: {{memory_bytes: {8 << 30}}}
devices:
  - {{profile: box, count: {DEVICES}, labels: {{site: lb}}}}
runtime:
  requests_per_window: 20
  telemetry_window_s: 1
"""


@pytest.fixture
def server_env(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment every replica (and this test's CLI calls) reads: one PostgreSQL schema, fast ticks."""
    for name, value in {
        "SLMOPS_HOME": str(tmp_path / "cp"),
        "SLMOPS_DATABASE_URL": postgres_url,
        "SLMOPS_ROLLOUT_TICK_S": str(TICK_S),
        "SLMOPS_ROLLOUT_LEASE_S": str(LEASE_S),
        "SLMOPS_DESIRED_CACHE_TTL_S": "0.5",
        "SLMOPS_METRICS_CACHE_S": "0",
        "SLMOPS_METRICS_TOKEN": "scrape-token",
        "SLMOPS_UI": "false",
    }.items():
        monkeypatch.setenv(name, value)
    registry = Registry.open(Settings())  # migrates the schema once, before the replicas start
    registry.keys.init()
    registry.import_model(write_tiny_gguf(tmp_path / "m" / "v1.gguf", seed=1), "tiny")
    registry.import_model(write_tiny_gguf(tmp_path / "m" / "v2.gguf", seed=2), "tiny")
    registry.close()
    return dict(os.environ)


@pytest.fixture
def replicas(server_env: dict[str, str], tmp_path: Path) -> Iterator[list[Replica]]:
    started = [Replica(f"r{i}", tmp_path, server_env) for i in range(3)]
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.kill()


def _lease(url: str) -> Lease:
    engine = make_engine(url)
    try:
        lease = current_lease(engine, CONTROLLER_LEASE)
    finally:
        engine.dispose()
    assert lease is not None, "no replica ever took the rollout-controller lease"
    return lease


def _holder_pid(lease: Lease) -> int:
    return int(lease.holder.split(":")[-2])  # "<hostname>:<pid>:<random>"


def _wait(what: str, check: Callable[[], bool], timeout_s: float, diagnose: Callable[[], str]) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{diagnose()}")
        time.sleep(0.2)
    return time.monotonic() - started


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    capsys.readouterr()
    code = run(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_the_controller_lease_moves_when_its_replica_is_killed_and_no_decision_is_taken_twice(
    replicas: list[Replica],
    server_env: dict[str, str],
    postgres_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running_haproxy(replicas, tmp_path) as lb:
        admin = _json(capsys, ["token", "create", "--role", "admin", "--name", "root", "--json"])["token"]
        monkeypatch.setenv("SLMOPS_SERVER_URL", lb)
        monkeypatch.setenv("SLMOPS_TOKEN", admin)
        enroll = _json(capsys, ["enroll-token", "create", "--uses", str(DEVICES), "--auto-approve", "--json"])
        (tmp_path / "bp.yaml").write_text(BLUEPRINT)
        assert run(["apply", "-f", str(tmp_path / "bp.yaml")]) == 0
        fleet = BackgroundFleet(
            FleetRun(parse_fleet(FLEET), lb, enroll["token"], max_connections=16, poll_interval_s=1.0)
        )
        operator = httpx.Client(base_url=f"{lb}/api/v1", headers={"Authorization": f"Bearer {admin}"}, timeout=30)

        def get(path: str) -> Any:
            answer = operator.get(path)
            answer.raise_for_status()
            return answer.json()

        def diagnose() -> str:
            logs = "\n".join(f"--- {r.name}\n{r.log()[-1500:]}" for r in replicas)
            return f"{json.dumps(get('/rollouts'), indent=1)[:3000]}\nsim: {fleet.summary().to_json()}\n{logs}"

        fleet.start()
        try:
            _wait("every device enrolled", lambda: len(get("/devices")) == DEVICES, 120, diagnose)
            answer = operator.post("/rollouts", json={"blueprint": "lb", "to": "tiny@v2", "policy": POLICY})
            assert answer.status_code == 201, answer.text
            release_id = answer.json()["id"]
            _wait("the first promotion", lambda: get(f"/rollouts/{release_id}")["stage"] >= 2, 120, diagnose)

            # SIGKILL the replica whose controller holds the lease, mid-release.
            before = _lease(postgres_url)
            victim = next(r for r in replicas if _holder_pid(before) in r.pids())
            victim.kill()
            killed_at = time.time()
            moved_after = _wait(
                "another replica to take the lease",
                lambda: _lease(postgres_url).holder != before.holder,
                3 * LEASE_S,
                diagnose,
            )
            after = _lease(postgres_url)
            assert any(_holder_pid(after) in r.pids() for r in replicas if r is not victim)
            # It moves when the dead holder's lease expires, within a tick of that (and never before it).
            assert before.expires_at <= after.acquired_at <= before.expires_at + TICK_S + 1.0
            assert after.acquired_at - killed_at <= LEASE_S + TICK_S + 1.0
            assert moved_after <= LEASE_S + TICK_S + 1.5

            _wait(
                "the release to finish",
                lambda: get(f"/rollouts/{release_id}")["state"] != "running",
                180,
                diagnose,
            )
            done = get(f"/rollouts/{release_id}")
            assert done["state"] == "completed", done["reason"]
            health = httpx.get(f"{lb}/api/v1/health", timeout=5)  # the balancer still answers, from the survivors
            assert health.status_code == 200
        finally:
            summary = fleet.stop()
            operator.close()

    events = _events_from_a_survivor(replicas, victim, release_id, admin)
    decisions = [(e["kind"], e["stage"]) for e in events if e["kind"] != "hold"]
    assert decisions == [("started", 1), ("promoted", 2), ("promoted", 3), ("completed", 3)], decisions
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert not summary.errors, summary.errors  # no simulated agent gave up while a replica died under it
    print(
        f"\nreplicas: lease moved {after.acquired_at - killed_at:.1f} s after the SIGKILL "
        f"(TTL {LEASE_S} s, tick {TICK_S} s); {summary.requests_per_s:.0f} requests/s through haproxy"
    )


def _events_from_a_survivor(
    replicas: list[Replica], victim: Replica, release_id: str, token: str
) -> list[dict[str, Any]]:
    """The release's events, read from a surviving replica directly (haproxy is gone by now)."""
    survivor = next(r for r in replicas if r is not victim)
    answer = httpx.get(
        f"{survivor.url}/api/v1/rollouts/{release_id}/events",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    answer.raise_for_status()
    events: list[dict[str, Any]] = answer.json()
    return events


_HOLDS = re.compile(r"^slmops_controller_holds_lease(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


def test_a_replica_with_two_uvicorn_workers_answers_from_both_and_one_holds_the_lease(
    server_env: dict[str, str], postgres_url: str, tmp_path: Path
) -> None:
    replica = Replica("w", tmp_path, server_env, workers=2)
    try:
        replica.wait_ready()
        _wait("two workers started", lambda: replica.log().count("Application startup complete") >= 2, 60, replica.log)
        workers = replica.pids() - {replica.process.pid}  # uvicorn's children (the workers, and maybe a helper)
        _wait("a lease holder", lambda: _holder_pid(_lease(postgres_url)) in workers, 30, replica.log)
        holder = _holder_pid(_lease(postgres_url))

        seen: set[float] = set()
        deadline = time.monotonic() + 30
        while seen != {0.0, 1.0} and time.monotonic() < deadline:
            # A new connection each time: the kernel hands it to either worker's accept().
            text = httpx.get(
                f"{replica.url}/metrics", headers={"Authorization": "Bearer scrape-token"}, timeout=10
            ).text
            match = _HOLDS.search(text)
            assert match is not None, text[:2000]
            seen.add(float(match.group(1)))
        assert seen == {0.0, 1.0}, "both workers answer, exactly one of them holds the lease"

        os.kill(holder, signal.SIGKILL)  # the worker, not the replica: another worker of it takes the lease over
        _wait(
            "the other worker to take the lease",
            lambda: _holder_pid(_lease(postgres_url)) in replica.pids() - {holder, replica.process.pid},
            3 * LEASE_S,
            replica.log,
        )
        assert httpx.get(f"{replica.url}/api/v1/health", timeout=10).status_code == 200
    finally:
        replica.kill()
