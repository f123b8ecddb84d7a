"""Staged rollouts on 10,000 simulated devices, and the control plane's capacity, written to BENCHMARKS.md.

    python -m benchmarks.rollout [--devices 10000] [--poll-s 120] [--soak-s 60] [--no-capacity] [--write]

One run, in a fresh temporary SLMOPS_HOME:

1. A registry with a tiny model (a base and two variants) as v1, a good v2 and a bad v3, and a blueprint for every
   device. ``devices`` simulated agents (:mod:`slmops.sim`) in four classes are provisioned in bulk (device rows with
   credentials inserted at once; enrolling 10,000 one by one over HTTP takes minutes) and run in this process against
   a real ``slmops server`` process, polling every ``poll_s`` seconds (jittered) and sending one telemetry window per
   poll. The simulated runtime makes v3 fail 15% of requests and run 1.8x slower on one class (kiosks) only.
2. A healthy release v1 -> v2 through 1% -> 10% -> 50% -> 100% (soak ``soak_s``): the time to 100% and per stage.
3. A bad release v2 -> v3: the share of devices that ever ran v3, the time from the first v3 window reaching the
   server to the halt, and the time from the halt until every device runs v2 again.
4. Unless ``--no-capacity``: :func:`benchmarks.capacity.run_capacity` (heartbeats plus desired-state polls per second
   with p99 under 100 ms, beside a bare FastAPI endpoint, in the same run).

With ``--write`` the results replace the ``rollout`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks._report import write_section
from benchmarks.capacity import _free_port, _machine, _server, _write_gguf, register_tiny_model

__all__ = ["RolloutResult", "markdown", "run_rollout"]

_GIB = 1 << 30
BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: fleet}
spec:
  selector: {labels: {fleet: bench}}
  model: {name: tiny, ref: v1}
  variant:
    policy: {objective: best_quality, max_memory_fraction: 0.5}
"""


def _fleet_yaml(devices: int, bad_digest: str) -> str:
    pis, kiosks, tills = devices * 3 // 10, devices * 2 // 10, devices * 3 // 10
    return f"""\
seed: 17
profiles:
  kiosk-4gb: {{arch: aarch64, memory_bytes: {4 * _GIB}, speed_factor: 2.0, flaky_network_probability: 0.01}}
  pi-flaky: {{arch: aarch64, memory_bytes: {2 * _GIB}, speed_factor: 3.0, flaky_network_probability: 0.02,
             offline_every_s: 3600, offline_duration_s: 300}}
devices:
  - {{profile: pi-flaky, count: {pis}, labels: {{fleet: bench}}}}
  - {{profile: kiosk-4gb, count: {kiosks}, labels: {{fleet: bench}}}}
  - {{profile: till-8gb, count: {tills}, labels: {{fleet: bench}}}}
  - {{profile: workstation-16gb, count: {devices - pis - kiosks - tills}, labels: {{fleet: bench}}}}
runtime:
  requests_per_window: 30
  overrides:
    - {{profile: kiosk-4gb, version: "{bad_digest}", error_rate: 0.15, latency_factor: 1.8}}
"""


def _policy(soak_s: float) -> dict[str, Any]:
    return {
        "stages": [0.01, 0.1, 0.5, 1.0],
        "soak_s": soak_s,
        "min_reporting_devices": 3,
        "gates": [
            {"name": "crashes", "metric": "crashes", "min_samples": 5, "critical": True},
            {"name": "rollbacks", "metric": "rollbacks", "min_samples": 1, "max_rate": 0.1, "critical": True},
            {"name": "error-rate", "metric": "errors", "min_samples": 200, "max_increase": 0.02, "critical": True},
            {"name": "p95-latency", "metric": "latency", "min_samples": 100, "max_ratio": 1.25},
            {"name": "tokens-per-s", "metric": "per_token", "min_samples": 100, "max_ratio": 1.25},
        ],
    }


@dataclass
class RolloutResult:
    devices: int
    classes: dict[str, int]
    poll_s: float
    soak_s: float
    started_at: str
    machine: dict[str, str]
    converge_v1_s: float = 0.0
    healthy_s: float = 0.0
    healthy_state: str = ""
    stage_s: list[float] = field(default_factory=list)  # time spent in each stage of the healthy release
    healthy_all_on_v2_s: float = 0.0
    bad_state: str = ""
    bad_stage: int = 0
    bad_reason: str = ""
    ever_ran_bad: int = 0
    cohort: int = 0
    first_bad_report_to_halt_s: float = 0.0
    halt_to_all_back_s: float = 0.0
    stragglers: int = 0  # the most devices still missing when a "every device" wait was declared done
    requests: dict[str, int] = field(default_factory=dict)
    requests_per_s: float = 0.0
    total_s: float = 0.0
    command: str = ""
    capacity: dict[str, Any] | None = None
    capacity_markdown: str = ""


def _provision(home: Path) -> tuple[dict[str, str], str]:
    """Registry, blueprint and an admin token; returns (digests and versions by name, admin token)."""
    from slmops.control.blueprints import apply_blueprint
    from slmops.control.credentials import create_api_token
    from slmops.control.plane import ControlPlane
    from slmops.control.settings import ServerSettings

    plane = ControlPlane.open(ServerSettings(home=home, database_url=None))
    try:
        registry = plane.registry
        registry.keys.ensure_signing_key()
        models = home.parent / "models"
        register_tiny_model(registry, models)
        good = registry.import_model(_write_gguf(models / "good.gguf", seed=7), "tiny").envelope
        bad = registry.import_model(_write_gguf(models / "bad.gguf", seed=8), "tiny").envelope
        apply_blueprint(plane, BLUEPRINT, created_by="benchmark")
        token = create_api_token(plane, "bench", "admin", "benchmark").token
    finally:
        plane.close()
    names = {"good": good.digest, "bad": bad.digest}
    return {**names, "good_version": good.manifest.version, "bad_version": bad.manifest.version}, token


def _insert_devices(home: Path, agents: list[Any]) -> dict[str, int]:
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from slmops.control.auth import DEVICE_PREFIX, hash_secret, new_secret
    from slmops.control.db import DeviceRow
    from slmops.core.device_class import device_class
    from slmops.registry.db import make_engine
    from slmops.registry.signing import format_public_key

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows, classes = [], Counter[str]()
    for index, agent in enumerate(agents):
        capabilities = agent.profile.capabilities()
        cls = device_class(capabilities)
        classes[cls] += 1
        credential = new_secret(DEVICE_PREFIX)
        device_id = f"dev-bench{index:07d}"
        agent.provision(device_id, credential)
        rows.append(
            {
                "id": device_id,
                "public_key": format_public_key(agent.key.public_key()).strip(),
                "state": "approved",
                "credential_hash": hash_secret(credential),
                "enrollment_token_id": None,
                "hostname": agent.name,
                "labels": dict(agent.labels),
                "capabilities": capabilities.model_dump(mode="json"),
                "device_class": cls,
                "enrolled_at": now,
                "updated_at": now,
            }
        )
    engine = make_engine(f"sqlite:///{home / 'registry.db'}")
    with Session(engine) as session:
        for start in range(0, len(rows), 2000):
            session.execute(insert(DeviceRow), rows[start : start + 2000])
        session.commit()
    engine.dispose()
    return dict(sorted(classes.items()))


def run_rollout(
    devices: int = 10_000,
    poll_s: float = 120.0,
    soak_s: float = 60.0,
    *,
    workdir: Path | None = None,
    progress: bool = True,
) -> RolloutResult:
    import httpx
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from slmops.control.db import DeviceRow, ReleaseEventRow, TelemetryWindowRow
    from slmops.registry.db import make_engine
    from slmops.sim import BackgroundFleet, FleetRun, parse_fleet

    started = time.monotonic()

    def say(text: str) -> None:
        if progress:
            print(f"[{time.monotonic() - started:7.1f} s] {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="slmops-rollout-") as scratch:
        work = Path(workdir) if workdir is not None else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        home = work / "home"
        digests, token = _provision(home)
        spec = parse_fleet(_fleet_yaml(devices, digests["bad"]))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        fleet = FleetRun(spec, url, "provisioned", max_connections=8, poll_interval_s=poll_s, telemetry_window_s=poll_s)
        fleet.agents = fleet.build()
        classes = _insert_devices(home, fleet.agents)
        say(f"provisioned {devices} devices: {classes}")
        result = RolloutResult(
            devices=devices,
            classes=classes,
            poll_s=poll_s,
            soak_s=soak_s,
            started_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            machine=_machine(),
            command=f"python -m benchmarks.rollout --devices {devices} --poll-s {poll_s:g} --soak-s {soak_s:g}",
        )
        env = {k: v for k, v in os.environ.items() if k != "SLMOPS_DATABASE_URL"}
        env.update(
            {
                "SLMOPS_HOME": str(home),
                "SLMOPS_ROLLOUT_TICK_S": "5",
                "SLMOPS_DESIRED_CACHE_TTL_S": "2",
                "SLMOPS_DEVICE_POLL_INTERVAL_S": str(poll_s),
                "SLMOPS_DEVICE_OFFLINE_AFTER_S": str(3 * poll_s),
            }
        )
        engine = make_engine(f"sqlite:///{home / 'registry.db'}")
        argv = [str(Path(sys.executable).with_name("slmops")), "server", "--port", str(port), "--log-level", "warning"]
        with (
            _server(argv, port, env, work / "server.log"),
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as operator,
        ):
            background = BackgroundFleet(fleet)
            background.start()

            def versions() -> Counter[str | None]:
                with Session(engine) as session:
                    rows = session.execute(
                        select(DeviceRow.active_digest, func.count()).group_by(DeviceRow.active_digest)
                    )
                    return Counter({digest: count for digest, count in rows})

            def wait(what: str, check: Any, timeout_s: float) -> float:
                t0 = time.monotonic()
                last = 0.0
                while not check():
                    if time.monotonic() - t0 > timeout_s:
                        raise RuntimeError(f"timed out waiting for {what}: {versions()}")
                    if time.monotonic() - last > 30:
                        say(f"waiting for {what}: {dict(versions().most_common(4))}")
                        last = time.monotonic()
                    time.sleep(2)
                return time.monotonic() - t0

            stragglers_allowed = max(3, devices // 500)

            def unsettled(digest: str | None) -> int:
                """Devices not running ``digest`` (any version when None), not counting those whose activation of it
                failed on the device (simulated failure rates): they stay on what they ran, as real agents do."""
                return sum(
                    1
                    for a in fleet.agents
                    if not (
                        (a.active_digest is not None if digest is None else a.active_digest == digest)
                        or (digest in a.failed_digests if digest else bool(a.failed_digests))
                    )
                )

            def settled(digest: str | None) -> bool:
                """At most 0.2% stragglers: devices that happen to be offline (300 s periods) or whose polls keep
                failing; their number is reported."""
                left = unsettled(digest)
                result.stragglers = max(result.stragglers, left) if left <= stragglers_allowed else result.stragglers
                return left <= stragglers_allowed

            def release(release_id: str) -> dict[str, Any]:
                answer = operator.get(f"/api/v1/rollouts/{release_id}")
                answer.raise_for_status()
                value: dict[str, Any] = answer.json()
                return value

            try:
                result.converge_v1_s = wait("every device on v1", lambda: settled(None), 4 * poll_s + 900)
                say(f"every device runs v1 after {result.converge_v1_s:.0f} s")

                # The healthy release.
                t0 = time.monotonic()
                body = {"blueprint": "fleet", "to": f"tiny@{digests['good_version']}", "policy": _policy(soak_s)}
                answer = operator.post("/api/v1/rollouts", json=body)
                answer.raise_for_status()
                healthy = answer.json()["id"]
                wait(
                    "the healthy release",
                    lambda: release(healthy)["state"] not in ("running", "paused"),
                    20 * poll_s + 3600,
                )
                result.healthy_s = time.monotonic() - t0
                result.healthy_state = release(healthy)["state"]
                say(f"healthy release: {result.healthy_state} after {result.healthy_s:.0f} s")
                decisions = ("started", "promoted", "completed")
                with Session(engine) as session:
                    times = list(
                        session.scalars(
                            select(ReleaseEventRow.time)
                            .where(ReleaseEventRow.release_id == healthy, ReleaseEventRow.kind.in_(decisions))
                            .order_by(ReleaseEventRow.id)
                        )
                    )
                result.stage_s = [round(b - a, 1) for a, b in itertools.pairwise(times)]
                result.healthy_all_on_v2_s = result.healthy_s + wait(
                    "every device on v2", lambda: settled(digests["good"]), 4 * poll_s + 900
                )

                # The bad release.
                body = {"blueprint": "fleet", "to": f"tiny@{digests['bad_version']}", "policy": _policy(soak_s)}
                answer = operator.post("/api/v1/rollouts", json=body)
                answer.raise_for_status()
                broken = answer.json()["id"]
                wait(
                    "the bad release to stop",
                    lambda: release(broken)["state"] not in ("running", "paused"),
                    4 * poll_s + 1800,
                )
                final = release(broken)
                result.bad_state, result.bad_stage, result.bad_reason = final["state"], final["stage"], final["reason"]
                say(f"bad release: {final['state']} at stage {final['stage']}: {final['reason'][:300]}")
                with Session(engine) as session:
                    first = session.scalar(
                        select(func.min(TelemetryWindowRow.received_at)).where(
                            TelemetryWindowRow.version_digest == digests["bad"]
                        )
                    )
                    halted_at = session.scalar(
                        select(ReleaseEventRow.time).where(
                            ReleaseEventRow.release_id == broken, ReleaseEventRow.kind == "halted"
                        )
                    )
                if first is not None and halted_at is not None:
                    first_at = datetime.strptime(first, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
                    result.first_bad_report_to_halt_s = round(halted_at - first_at, 1)
                members = operator.get(f"/api/v1/rollouts/{broken}/members").json()
                result.cohort = len(members)
                wait("every device back on v2", lambda: settled(digests["good"]), 4 * poll_s + 900)
                if halted_at is not None:
                    result.halt_to_all_back_s = round(time.time() - halted_at, 1)
                result.ever_ran_bad = sum(1 for a in fleet.agents if digests["bad"] in a.ever_ran)
            finally:
                summary = background.stop()
                engine.dispose()
            result.requests = summary.requests
            result.requests_per_s = round(summary.requests_per_s, 1)
    result.total_s = round(time.monotonic() - started, 1)
    return result


def markdown(result: RolloutResult) -> str:
    m = result.machine
    stages = ", ".join(f"{s:.0f} s" for s in result.stage_s)
    lines = [
        f"## Staged rollouts: {result.devices:,} simulated devices against one control-plane process",
        "",
        f"Measured {result.started_at[:10]} on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, in "
        f"{result.total_s / 60:.1f} min, with:",
        "",
        "```sh",
        result.command,
        "```",
        "",
        f"- {result.devices:,} simulated agents (one asyncio process, real HTTP protocol, {result.poll_s:g} s polls "
        f"with ±20% jitter, one telemetry window of 30 simulated requests per poll) in four classes: "
        + ", ".join(f"{c} {n:,}" for c, n in result.classes.items())
        + ". Devices were provisioned in bulk (rows with credentials), not enrolled one by one. The simulator and "
        "the server shared the same cores.",
        f"- Gates per class: crashes (critical), rollbacks (≤10%, critical), error rate (Fisher, +2 points, "
        f"critical), p95 latency and tokens/s (Mann-Whitney, ratio 1.25). Soak {result.soak_s:g} s per stage.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| every device on v1 after start | {result.converge_v1_s:.0f} s |",
        f"| healthy release v1 → v2: release to 100% ({result.healthy_state}) | {result.healthy_s:.0f} s |",
        f"| time in each stage (1%, 10%, 50%, 100%) | {stages} |",
        f"| ... until every device ran v2 (offline devices included: up to 300 s away) | "
        f"{result.healthy_all_on_v2_s:.0f} s |",
        f"| bad release v2 → v3 (bad on kiosks): outcome | {result.bad_state} in stage {result.bad_stage} |",
        f"| devices that ever ran v3 | {result.ever_ran_bad} of {result.devices:,} "
        f"({result.ever_ran_bad / max(1, result.devices):.2%}); stage-1 cohort {result.cohort} |",
        f"| first v3 window at the server → halt | {result.first_bad_report_to_halt_s:.0f} s |",
        f"| halt → every device back on v2 | {result.halt_to_all_back_s:.0f} s |",
        f"| requests served (desired/status/telemetry) | {result.requests_per_s:.0f}/s on average |",
        f"| stragglers allowed in the 'every device' waits (offline or failing polls) | at most "
        f"{result.stragglers} of {result.devices:,} |",
        "",
        f"Halt reason: {result.bad_reason[:600]}",
        "",
        "Times are dominated by the poll interval: a canary switches at its next poll, reports at the poll after, "
        "and a halted release reaches every device within one poll.",
    ]
    if result.capacity_markdown:
        lines += ["", result.capacity_markdown]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--poll-s", type=float, default=120.0, help="mean seconds between a device's polls")
    parser.add_argument("--soak-s", type=float, default=60.0, help="soak time per stage (shortened)")
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity measurement")
    parser.add_argument("--capacity-only", action="store_true", help="only the capacity measurement (own section)")
    parser.add_argument("--capacity-step-s", type=float, default=10.0)
    parser.add_argument("--write", action="store_true", help="replace the rollout section of BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw result here")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.capacity_only:
        from benchmarks.capacity import markdown as capacity_markdown
        from benchmarks.capacity import run_capacity

        measured = run_capacity(args.devices, args.capacity_step_s, progress=True)
        text = capacity_markdown(measured)
        print(text)
        if args.write:
            write_section(
                f"{text}\n\nRun by `python -m benchmarks.rollout --capacity-only --devices {args.devices} --write`.",
                "capacity",
            )
        return 0
    capacity = None
    if not args.no_capacity:  # first, while the machine is quiet
        from benchmarks.capacity import run_capacity

        capacity = run_capacity(args.devices, args.capacity_step_s, progress=True)
    result = run_rollout(args.devices, args.poll_s, args.soak_s, workdir=args.workdir)
    if capacity is not None:
        from benchmarks.capacity import markdown as capacity_markdown

        result.capacity = capacity.to_json()
        result.capacity_markdown = capacity_markdown(capacity)
        result.command += f" (capacity: {capacity.command})"
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2, default=str))
    section = markdown(result)
    print(section)
    if args.write:
        write_section(section, "rollout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
