"""A control-plane restart under load: 5,000 simulated agents, the server SIGKILLed and started again.

    python -m benchmarks.restart [--devices 5000] [--poll-s 120] [--steady-s 150] [--down-s 10] [--after-s 200]
                                 [--no-retry-after] [--write]

One run, in a fresh temporary SLMOPS_HOME (SQLite, the default):

1. A registry with a tiny model and a blueprint for every device; ``devices`` approved devices inserted in bulk (rows
   with credentials: enrolling thousands one by one over HTTP takes minutes).
2. A real ``slmops server`` process, and the simulated fleet (:mod:`slmops.sim`) in its own process: every agent
   polls its desired state and posts a heartbeat every ``poll_s`` (jittered ±20%; no telemetry windows, so the load
   is the hot path), retrying failed requests with full-jitter exponential backoff (up to 6 attempts, as the
   simulator does) and, unless ``--no-retry-after``, waiting out a shedding server's ``Retry-After`` first (the change
   this benchmark proposes for :mod:`slmops.sim.agent`; here a subclass). A device whose poll fails every attempt
   tries again at its next poll.
3. After one poll interval of warm-up and ``steady_s`` of steady state, the server is SIGKILLed, started again after
   ``down_s`` on the same port (same database), and the fleet watched for ``after_s``.

Recorded: answers per second by kind (200, 304, 503, other 5xx, transport errors); the time from the restart until
no more errors are seen; the time until 99% of the devices whose poll failed during the outage have polled
successfully again, and until 99% of all devices polled successfully after the restart (at least about one poll
interval: each device polls once per interval); the largest number of other 5xx answers in any second (should be 0);
and whether any device was offline by the server's rule (no heartbeat for ``device_offline_after_s`` + grace) at any
moment of the run (it should not be: the outage is far shorter than that).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks._report import write_section
from benchmarks.capacity import _free_port, _machine, register_tiny_model

__all__ = ["RestartResult", "markdown", "run_restart"]

REPO = Path(__file__).resolve().parents[1]
LABELS = {"fleet": "restart"}
BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: restart}
spec:
  selector: {labels: {fleet: restart}}
  model: {name: tiny, ref: latest}
  variant:
    policy: {objective: best_quality, max_memory_fraction: 0.5}
"""
OFFLINE_GRACE_S = 30.0


@dataclass
class RestartResult:
    devices: int
    poll_s: float
    steady_s: float
    down_s: float
    after_s: float
    honour_retry_after: bool
    started_at: str
    machine: dict[str, str]
    offline_after_s: float
    max_connections: int = 0  # the simulator's connection pool: at most this many requests in flight
    outage_s: float = 0.0  # from the SIGKILL until the restarted server answered its health check
    restart_start_s: float = 0.0  # from starting the new process until it answered
    per_second: list[dict[str, Any]] = field(default_factory=list)  # t (s from the kill) and answers by kind
    totals_before: dict[str, int] = field(default_factory=dict)  # answers in the steady state before the kill
    totals_after: dict[str, int] = field(default_factory=dict)  # answers from the kill to the end
    errors_until_s: float | None = None  # from the restart until the last error answer (None: none after it)
    failed_devices: int = 0  # devices whose poll failed every attempt during the outage
    failed_back_99_s: float | None = None  # from the restart until 99% of those polled successfully again
    all_back_99_s: float | None = None  # from the restart until 99% of all devices polled successfully
    max_other_5xx_per_s: int = 0
    max_503_per_s: int = 0
    max_offline: int = 0  # most devices offline by the server's rule at any sample after the warm-up
    offline_samples: int = 0
    load_avg: list[str] = field(default_factory=list)
    total_s: float = 0.0
    command: str = ""
    notes: list[str] = field(default_factory=list)


# ============================================================================ provisioning


def provision(home: Path, devices: int) -> list[tuple[str, str]]:
    """Registry, model, blueprint and ``devices`` approved device rows; (device id, credential) per device."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from slmops.control.auth import DEVICE_PREFIX, hash_secret, new_secret
    from slmops.control.blueprints import apply_blueprint
    from slmops.control.db import DeviceRow
    from slmops.control.plane import ControlPlane
    from slmops.control.settings import ServerSettings
    from slmops.core.device_class import device_class
    from slmops.registry.signing import format_public_key
    from slmops.sim.profiles import BUILTIN_PROFILES

    profile = BUILTIN_PROFILES["till-8gb"]
    capabilities = profile.capabilities()
    cls = device_class(capabilities)
    plane = ControlPlane.open(ServerSettings(home=home, database_url=None))
    try:
        plane.registry.keys.ensure_signing_key()
        register_tiny_model(plane.registry, home.parent / "models")
        apply_blueprint(plane, BLUEPRINT, created_by="benchmark")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        fleet, rows = [], []
        for index in range(devices):
            device_id, credential = f"dev-rst{index:07d}", new_secret(DEVICE_PREFIX)
            fleet.append((device_id, credential))
            rows.append(
                {
                    "id": device_id,
                    "public_key": format_public_key(Ed25519PrivateKey.generate().public_key()).strip(),
                    "state": "approved",
                    "credential_hash": hash_secret(credential),
                    "enrollment_token_id": None,
                    "hostname": f"rst-{index}",
                    "labels": dict(LABELS),
                    "capabilities": capabilities.model_dump(mode="json"),
                    "device_class": cls,
                    "enrolled_at": now,
                    "updated_at": now,
                }
            )
        with Session(plane.engine) as session:
            for start in range(0, len(rows), 2000):
                session.execute(insert(DeviceRow), rows[start : start + 2000])
            session.commit()
    finally:
        plane.close()
    return fleet


# ============================================================================ the simulator process


def _timed_agent_class(honour_retry_after: bool) -> type[Any]:
    """A :class:`SimAgent` that records when each poll cycle succeeded or failed, and optionally waits out a
    ``Retry-After`` before its jittered retry (the change proposed for the simulator)."""
    import httpx

    from slmops.agent.client import parse_retry_after
    from slmops.core.wire import API_PREFIX
    from slmops.errors import UnavailableError
    from slmops.sim import agent as sim_agent

    class TimedAgent(sim_agent.SimAgent):
        ok_at: list[float]
        failed_at: list[float]

        async def poll_once(self, client: httpx.AsyncClient) -> None:
            try:
                await super().poll_once(client)
            except UnavailableError:
                self.failed_at.append(time.time())
                raise
            self.ok_at.append(time.time())

        async def _request(
            self, client: httpx.AsyncClient, kind: str, method: str, path: str, **kwargs: Any
        ) -> httpx.Response:
            response = await self._attempts(client, kind, method, path, **kwargs)
            self.counters[f"answer_{response.status_code}"] += 1  # what was finally answered, by status
            return response

        async def _attempts(
            self, client: httpx.AsyncClient, kind: str, method: str, path: str, **kwargs: Any
        ) -> httpx.Response:
            if not honour_retry_after:
                return await super()._request(client, kind, method, path, **kwargs)
            headers = dict(kwargs.pop("headers", {}))
            if self.credential is not None:
                headers["Authorization"] = f"Bearer {self.credential}"
            last, retry_after = "no attempt", 0.0
            for attempt in range(sim_agent.MAX_ATTEMPTS):
                if attempt:
                    self.counters["retries"] += 1
                    delay = min(sim_agent.BACKOFF_MAX_S, sim_agent.BACKOFF_BASE_S * 2 ** (attempt - 1))
                    await asyncio.sleep(retry_after + self.rng.uniform(0, delay))  # full jitter after Retry-After
                    retry_after = 0.0
                try:
                    self.counters[kind] += 1
                    assert self.gate is not None
                    async with self.gate:
                        response = await client.request(method, f"{API_PREFIX}{path}", headers=headers, **kwargs)
                except httpx.TransportError as exc:
                    self.counters["transport_errors"] += 1
                    last = f"{type(exc).__name__}: {exc}"
                    continue
                if response.status_code == 429 or response.status_code >= 500:
                    self.counters[f"http_{response.status_code}"] += 1
                    retry_after = parse_retry_after(response.headers.get("Retry-After")) or 0.0
                    last = f"HTTP {response.status_code}"
                    continue
                return response
            raise UnavailableError(f"{kind} failed {sim_agent.MAX_ATTEMPTS} times; last: {last}")

    return TimedAgent


_SENT = ("desired", "status", "telemetry")


def _snapshot(agents: list[Any]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for agent in agents:
        total.update(agent.counters)
    return dict(total)


async def _simulate(spec: dict[str, Any]) -> dict[str, Any]:
    from slmops.sim import FleetRun, parse_fleet
    from slmops.sim.runtime import SimulatedRuntime

    fleet_spec = parse_fleet(
        f"seed: 5\ndevices:\n  - {{profile: till-8gb, count: {len(spec['fleet'])}, labels: {{fleet: restart}}}}\n"
        "runtime: {requests_per_window: 0}\n"
    )
    run = FleetRun(
        fleet_spec,
        spec["url"],
        "provisioned",
        max_connections=spec["max_connections"],
        poll_interval_s=spec["poll_s"],
        download_time_scale=0.0,
        timeout_s=spec["timeout_s"],
    )
    cls = _timed_agent_class(spec["honour_retry_after"])
    # no simulated packet loss, offline periods or failed activations: every failure in this run is the restart's
    profile = fleet_spec.all_profiles()["till-8gb"].model_copy(
        update={"flaky_network_probability": 0.0, "offline_every_s": 0.0, "failure_rate": 0.0}
    )
    runtime = SimulatedRuntime(seed=5)
    agents = []
    for index, (device_id, credential) in enumerate(spec["fleet"]):
        agent = cls(f"till-{index}", profile, dict(LABELS), runtime, 5, spec["poll_s"], 0.0, 0, spec["poll_s"])
        agent.ok_at, agent.failed_at = [], []
        agent.provision(device_id, credential)
        agents.append(agent)
    run.agents = agents
    stop = asyncio.Event()
    samples: list[tuple[float, dict[str, int]]] = []

    async def sample() -> None:
        next_at = time.time()
        while not stop.is_set():
            samples.append((time.time(), _snapshot(agents)))
            next_at += 1.0
            await asyncio.sleep(max(0.0, next_at - time.time()))

    sampler = asyncio.create_task(sample())
    summary = await run.run(stop, duration_s=spec["duration_s"])
    await sampler
    return {
        "samples": samples,
        "ok_at": [a.ok_at for a in agents],
        "failed_at": [a.failed_at for a in agents],
        "summary": summary.to_json(),
    }


def _sim_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    result = asyncio.run(_simulate(spec))
    Path(spec["output"]).write_text(json.dumps(result))
    return 0


# ============================================================================ the run


def _start_server(argv: list[str], env: dict[str, str], log_path: Path, port: int) -> subprocess.Popen[bytes]:
    import httpx

    log = log_path.open("ab")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    log.close()
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not answer within 120 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)


def _offline_count(db: Path, ttl_s: float) -> int:
    """Approved devices heard from before that the server would show offline now: no heartbeat within TTL + grace
    (its own rule)."""
    cutoff = (datetime.now(UTC) - timedelta(seconds=ttl_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        (count,) = connection.execute(
            "SELECT COUNT(*) FROM devices WHERE state = 'approved' AND last_seen < ?", (cutoff,)
        ).fetchone()
    finally:
        connection.close()
    return int(count)


def _kinds(delta: dict[str, int]) -> dict[str, int]:
    """Answers of one interval by kind, from the simulator's counters (attempts sent, and failures by kind)."""
    sent = sum(delta.get(k, 0) for k in _SENT)
    shed = delta.get("http_503", 0)
    other = sum(v for k, v in delta.items() if k.startswith("http_") and k != "http_503")
    transport = delta.get("transport_errors", 0)
    return {
        "sent": sent,
        "304": delta.get("answer_304", 0),
        "200": delta.get("answer_200", 0),
        "503": shed,
        "5xx_other": other,
        "transport": transport,
    }


def _diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}


def run_restart(
    devices: int = 5000,
    poll_s: float = 120.0,
    *,
    steady_s: float = 150.0,
    down_s: float = 10.0,
    after_s: float = 200.0,
    honour_retry_after: bool = True,
    max_connections: int = 1000,
    workdir: Path | None = None,
    progress: bool = True,
) -> RestartResult:
    started = time.monotonic()

    def say(text: str) -> None:
        if progress:
            print(f"[{time.monotonic() - started:7.1f} s] {text}", file=sys.stderr, flush=True)

    offline_after_s = 3 * poll_s
    ttl_s = offline_after_s + OFFLINE_GRACE_S
    flags = "" if honour_retry_after else " --no-retry-after"
    result = RestartResult(
        devices=devices,
        poll_s=poll_s,
        steady_s=steady_s,
        down_s=down_s,
        after_s=after_s,
        honour_retry_after=honour_retry_after,
        started_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        machine=_machine(),
        offline_after_s=offline_after_s,
        max_connections=max_connections,
        command=f"python -m benchmarks.restart --devices {devices} --poll-s {poll_s:g} --steady-s {steady_s:g} "
        f"--down-s {down_s:g} --after-s {after_s:g} --max-connections {max_connections}{flags} --write",
    )
    with tempfile.TemporaryDirectory(prefix="slmops-restart-") as scratch:
        work = Path(workdir) if workdir is not None else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        home = work / "home"
        fleet = provision(home, devices)
        say(f"provisioned {devices} devices")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k != "SLMOPS_DATABASE_URL"}
        env.update(
            {
                "SLMOPS_HOME": str(home),
                "SLMOPS_DEVICE_POLL_INTERVAL_S": str(poll_s),
                "SLMOPS_DEVICE_OFFLINE_AFTER_S": str(offline_after_s),
                "SLMOPS_DEVICE_OFFLINE_GRACE_S": str(OFFLINE_GRACE_S),
            }
        )
        argv = [str(Path(sys.executable).with_name("slmops")), "server", "--port", str(port), "--log-level", "warning"]
        warm_s = 1.2 * poll_s  # every agent's first poll falls within 0..poll_s, then the jittered interval
        duration_s = warm_s + steady_s + down_s + after_s + 30
        sim_spec = {
            "fleet": fleet,
            "url": url,
            "poll_s": poll_s,
            "max_connections": max_connections,
            "timeout_s": 30.0,
            "honour_retry_after": honour_retry_after,
            "duration_s": duration_s,
            "output": str(work / "sim-result.json"),
        }
        (work / "sim.json").write_text(json.dumps(sim_spec))
        sim_env = dict(os.environ)
        sim_env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [sim_env.get("PYTHONPATH")])])
        server = _start_server(argv, env, work / "server.log", port)
        say(f"server up on {url}; starting the simulated fleet for {duration_s:.0f} s")
        result.load_avg.append("start " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        with (work / "sim.log").open("wb") as sim_log:
            sim = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.restart", "--sim", str(work / "sim.json")],
                stdout=sim_log,
                stderr=subprocess.STDOUT,
                env=sim_env,
                cwd=REPO,
            )
        sim_started = time.time()
        db = home / "registry.db"
        kill_at = sim_started + warm_s + steady_s
        try:
            while time.time() < kill_at:
                time.sleep(5)
                if time.time() - sim_started > warm_s:
                    result.max_offline = max(result.max_offline, _offline_count(db, ttl_s))
                    result.offline_samples += 1
                if sim.poll() is not None:
                    raise RuntimeError(f"the simulator exited early:\n{(work / 'sim.log').read_text()[-3000:]}")
            result.load_avg.append("before kill " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
            killed = time.time()
            server.send_signal(signal.SIGKILL)
            server.wait()
            say("server SIGKILLed")
            time.sleep(max(0.0, killed + down_s - time.time()))
            started_new = time.time()
            server = _start_server(argv, env, work / "server.log", port)
            restarted = time.time()
            result.outage_s = round(restarted - killed, 2)
            result.restart_start_s = round(restarted - started_new, 2)
            say(f"server back after {result.outage_s:.1f} s (the new process took {result.restart_start_s:.1f} s)")
            while sim.poll() is None:
                time.sleep(5)
                result.max_offline = max(result.max_offline, _offline_count(db, ttl_s))
                result.offline_samples += 1
            result.load_avg.append("end " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        finally:
            if sim.poll() is None:
                sim.kill()
                sim.wait()
            server.send_signal(signal.SIGKILL)
            server.wait()
        if sim.returncode != 0:
            raise RuntimeError(f"the simulator failed:\n{(work / 'sim.log').read_text()[-3000:]}")
        data = json.loads((work / "sim-result.json").read_text())
    _analyse(result, data, killed, restarted, sim_started + warm_s)
    result.total_s = round(time.monotonic() - started, 1)
    result.notes = _notes(result)
    return result


def _analyse(result: RestartResult, data: dict[str, Any], killed: float, restarted: float, steady: float) -> None:
    samples: list[tuple[float, dict[str, int]]] = [(t, c) for t, c in data["samples"]]
    before = [s for s in samples if steady <= s[0] <= killed]
    if len(before) >= 2:
        result.totals_before = _kinds(_diff(before[0][1], before[-1][1]))
    at_kill = max((s for s in samples if s[0] <= killed), key=lambda s: s[0], default=samples[0])
    result.totals_after = _kinds(_diff(at_kill[1], samples[-1][1]))
    last_error: float | None = None
    for (_, c0), (t1, c1) in itertools.pairwise(samples):
        kinds = _kinds(_diff(c0, c1))
        if t1 >= killed - 5:
            result.per_second.append({"t": round(t1 - killed, 1), **kinds})
        result.max_other_5xx_per_s = max(result.max_other_5xx_per_s, kinds["5xx_other"])
        result.max_503_per_s = max(result.max_503_per_s, kinds["503"])
        if t1 > restarted and kinds["503"] + kinds["5xx_other"] + kinds["transport"] > 0:
            last_error = t1
    result.errors_until_s = None if last_error is None else round(last_error - restarted, 1)
    ok_at: list[list[float]] = data["ok_at"]
    failed_at: list[list[float]] = data["failed_at"]
    failed = [i for i, times in enumerate(failed_at) if any(killed - 1 <= t for t in times)]
    result.failed_devices = len(failed)

    def back_99(indices: list[int]) -> float | None:
        if not indices:
            return 0.0
        firsts = sorted(min((t for t in ok_at[i] if t >= restarted), default=float("inf")) for i in indices)
        at = firsts[max(0, int(0.99 * len(firsts)) - 1)]
        return None if at == float("inf") else round(at - restarted, 1)

    result.failed_back_99_s = back_99(failed)
    result.all_back_99_s = back_99(list(range(len(ok_at))))


def _notes(result: RestartResult) -> list[str]:
    load = float(result.machine["load_avg_at_start"].split()[0])
    notes = [
        "Counted by the simulator: 'sent' per attempt (a retried request counts each time), 503 / other 5xx / "
        "transport errors per failed attempt, 200 / 304 per answered request (desired-state polls and heartbeats), "
        "each in the second it happened.",
        f"The simulator keeps at most {result.max_connections} requests in flight (its connection pool); the "
        "server sheds beyond 64 device requests in flight, so a pool at or below that never lets it shed.",
        f"Server: `slmops server` (one uvicorn process, SQLite), offline rule {result.offline_after_s:g} s + "
        f"{OFFLINE_GRACE_S:g} s grace (3 poll intervals); load shedding with its defaults (64 device requests in "
        "flight, 256 queued for up to 0.5 s, Retry-After 5-15 s).",
        "A device whose poll fails all 6 attempts (the simulator's retries span about 6 s) waits for its next poll "
        f"({result.poll_s:g} s ± 20%): that, not the server, sets how long the failed devices take to come back.",
    ]
    if load > 0.5:
        notes.append(
            f"The 1-minute load average was {load:.2f} at the start (other work shared the 2 cores); the load "
            "averages through the run are listed above. Rerun on a quiet machine for clean figures."
        )
    return notes


def _secs(value: float | None, none: str = "not within the run") -> str:
    return none if value is None else f"{value:.1f} s"


def markdown(result: RestartResult) -> str:
    peak = sorted(result.per_second, key=lambda r: -(r["503"] + r["transport"] + r["5xx_other"]))[:1]
    rows = [r for r in result.per_second if r["t"] <= result.outage_s + 40]
    lines = [
        f"A control-plane restart under {result.devices:,} simulated agents polling every {result.poll_s:g} s "
        f"(SIGKILL, start again after {result.down_s:g} s; "
        f"{'agents wait out Retry-After' if result.honour_retry_after else 'agents ignore Retry-After'}):",
        "",
        f"- outage (SIGKILL until the new server answered): **{result.outage_s:.1f} s** (the new process took "
        f"{result.restart_start_s:.1f} s to start)",
        "- errors (503, other 5xx, transport) after the restart: "
        + (
            "**none**"
            if result.errors_until_s is None
            else f"the last **{result.errors_until_s:.1f} s** after it, none since"
        ),
        f"- devices whose poll failed every attempt during the outage: {result.failed_devices:,}; 99% of them polled "
        f"successfully again **{_secs(result.failed_back_99_s)}** after the restart",
        f"- 99% of all devices polled successfully **{_secs(result.all_back_99_s)}** after the restart (each polls "
        "once per interval)",
        f"- most other 5xx answers in one second: **{result.max_other_5xx_per_s}**; most 503 (shed) in one second: "
        f"{result.max_503_per_s}",
        f"- most devices offline by the server's rule at any of {result.offline_samples} samples: "
        f"**{result.max_offline}**",
        f"- answers in the steady state before the kill: {result.totals_before}; from the kill to the end: "
        f"{result.totals_after}",
        *([f"- the worst second: {peak[0]}"] if peak else []),
        "",
        "Answers per second around the restart (t = seconds from the SIGKILL; first 40 s after the restart):",
        "",
        "| t s | sent | 200 | 304 | 503 | other 5xx | transport errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['t']:g} | {r['sent']} | {r['200']} | {r['304']} | {r['503']} | {r['5xx_other']} | {r['transport']} |"
            for r in rows
        ],
        "",
        f"Run {result.total_s:.0f} s (started {result.started_at}). Command: `{result.command}`",
        "",
        "Load average (1, 5, 15 min): " + "; ".join(result.load_avg),
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in result.machine.items()),
        "",
        *[f"- {note}" for note in result.notes],
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument(
        "--poll-s", default="120", help="the agents' poll interval; several (e.g. 120,60) run one after the other"
    )
    parser.add_argument("--steady-s", type=float, default=150.0, help="steady state after the warm-up, before the kill")
    parser.add_argument("--down-s", type=float, default=10.0, help="seconds between the SIGKILL and the restart")
    parser.add_argument("--after-s", type=float, default=200.0, help="seconds watched after the restart")
    parser.add_argument("--no-retry-after", action="store_true", help="simulated agents ignore Retry-After")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="the simulator's connection pool (default 1000: a fleet's devices each open their own connection; "
        "a pool smaller than the server's shedding bound never lets the server see a surge)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw result to this JSON file")
    parser.add_argument("--workdir", type=Path, default=None, help="keep SLMOPS_HOME, logs and raw results here")
    parser.add_argument("--write", action="store_true", help="replace the restart section of BENCHMARKS.md")
    parser.add_argument("--sim", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the simulator process
    args = parser.parse_args(argv)
    if args.sim is not None:
        return _sim_main(args.sim)
    polls = [float(p) for p in args.poll_s.split(",") if p.strip()]
    results = []
    for poll_s in polls:
        results.append(
            run_restart(
                args.devices,
                poll_s,
                steady_s=args.steady_s,
                down_s=args.down_s,
                after_s=args.after_s,
                honour_retry_after=not args.no_retry_after,
                max_connections=args.max_connections,
                workdir=args.workdir / f"poll-{poll_s:g}" if args.workdir is not None else None,
            )
        )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if len(results) == 1:
        text = markdown(results[0])
    else:
        command = " ".join(["python -m benchmarks.restart", *(argv if argv is not None else sys.argv[1:])])
        text = "\n".join(
            [f"Several poll intervals, one after the other (command: `{command}`):", ""]
            + [f"#### Poll every {r.poll_s:g} s\n\n" + markdown(r) for r in results]
        )
    if args.write:
        write_section(
            "## A control-plane restart under load: reconnects, shedding, offline marks\n\n" + text, "restart"
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
