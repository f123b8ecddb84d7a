"""MQTT nudges: time from `apply` of a changed blueprint to 99% of the simulated fleet on the new version, with and
without nudges, in one run; written to BENCHMARKS.md.

    python -m benchmarks.nudges [--devices 1000] [--poll-s 60] [--write]

One run, in a fresh temporary SLMOPS_HOME, against a real ``slmops server`` process and a real Mosquitto broker
(Debian's ``mosquitto``, set up as :mod:`slmops.control.nudge` documents: passwords, per-device topic ACL):

1. A registry with a tiny model (v1 and two more versions) and a blueprint for every device; ``devices`` simulated
   agents (:mod:`slmops.sim`), provisioned in bulk, polling every ``poll_s`` seconds (±20% jitter), all subscribed
   to their nudge topics through the simulator's one broker connection. They converge on v1 first.
2. *Without nudges*: the blueprint is applied with v2 (``POST /blueprints``); the time until 99% of the devices run
   v2 (seen by the simulated devices themselves).
3. *With nudges*: a :class:`~slmops.control.nudge.Nudger` runs (in this process, on the server's database, as a
   second replica would: it sees the server's change within ``desired_cache_ttl_s``); the blueprint is applied with
   v3; the same time until 99% run v3.

The load average before and after is recorded: the machine is shared, so compare the two legs of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from benchmarks._report import write_section
from benchmarks.capacity import _free_port, _machine, _server
from benchmarks.rollout import BLUEPRINT, _insert_devices, _provision

__all__ = ["NudgeResult", "markdown", "run_nudges"]


@dataclass
class NudgeResult:
    devices: int
    poll_s: float
    started_at: str
    machine: dict[str, str]
    converge_v1_s: float = 0.0
    without_p50_s: float = 0.0
    without_p99_s: float = 0.0
    with_p50_s: float = 0.0
    with_p99_s: float = 0.0
    nudges_published: int = 0
    nudges_received: int = 0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    requests: dict[str, int] = field(default_factory=dict)
    total_s: float = 0.0
    command: str = ""


def _fleet_yaml(devices: int) -> str:
    return f"""\
seed: 23
profiles:
  box-8gb: {{arch: x86_64, memory_bytes: {8 << 30}}}
devices:
  - {{profile: box-8gb, count: {devices}, labels: {{fleet: bench}}}}
runtime: {{requests_per_window: 0}}
"""


def run_nudges(devices: int = 1000, poll_s: float = 60.0, *, progress: bool = True) -> NudgeResult:
    import httpx
    from tests.mqtt_servers import CONTROL_USER, SIM_USER, Broker, require_mosquitto

    from slmops.agent.nudge import NudgeConfig
    from slmops.control.nudge import MqttPublisher, Nudger
    from slmops.control.plane import ControlPlane
    from slmops.control.settings import ServerSettings
    from slmops.sim import BackgroundFleet, FleetRun, parse_fleet

    require_mosquitto()
    started = time.monotonic()

    def say(text: str) -> None:
        if progress:
            print(f"[{time.monotonic() - started:7.1f} s] {text}", file=sys.stderr, flush=True)

    result = NudgeResult(
        devices=devices,
        poll_s=poll_s,
        started_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        machine=_machine(),
        load_before=os.getloadavg(),
        command=f"python -m benchmarks.nudges --devices {devices} --poll-s {poll_s:g} --write",
    )
    with tempfile.TemporaryDirectory(prefix="slmops-nudges-") as scratch:
        work = Path(scratch)
        home = work / "home"
        digests, token = _provision(home)
        broker = Broker(work / "mosquitto")
        broker.configure()
        broker.start()
        spec = parse_fleet(_fleet_yaml(devices))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        nudges = NudgeConfig(broker.url, SIM_USER, broker.passwords[SIM_USER])
        fleet = FleetRun(spec, url, "provisioned", max_connections=8, poll_interval_s=poll_s, nudges=nudges)
        fleet.agents = fleet.build()
        _insert_devices(home, fleet.agents)
        env = {k: v for k, v in os.environ.items() if k != "SLMOPS_DATABASE_URL"}
        env.update(
            {
                "SLMOPS_HOME": str(home),
                "SLMOPS_DESIRED_CACHE_TTL_S": "2",
                "SLMOPS_DEVICE_POLL_INTERVAL_S": str(poll_s),
                "SLMOPS_ROLLOUT_CONTROLLER": "false",
            }
        )
        argv = [str(Path(sys.executable).with_name("slmops")), "server", "--port", str(port), "--log-level", "warning"]
        settings = ServerSettings(home=home, database_url=None, desired_cache_ttl_s=0.5, nudge_tick_s=0.5)
        plane = ControlPlane.open(settings)
        nudger = Nudger(plane, MqttPublisher(broker.url, CONTROL_USER, broker.passwords[CONTROL_USER]).open())
        try:
            with (
                _server(argv, port, env, work / "server.log"),
                httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as operator,
            ):
                background = BackgroundFleet(fleet)
                background.start()

                def apply(version: str) -> float:
                    source = BLUEPRINT.replace("ref: v1", f"ref: {version}")
                    answer = operator.post("/api/v1/blueprints", json={"source": source})
                    answer.raise_for_status()
                    return time.monotonic()

                def time_to(digest: str | None, since: float, timeout_s: float) -> tuple[float, float]:
                    """Seconds from ``since`` until 50% and 99% of the devices run ``digest`` (any when None)."""
                    half = ninety_nine = None
                    deadline = since + timeout_s
                    while ninety_nine is None:
                        done = sum(
                            1
                            for a in fleet.agents
                            if (a.active_digest is not None if digest is None else a.active_digest == digest)
                        )
                        now = time.monotonic()
                        if half is None and done >= devices * 0.5:
                            half = now - since
                        if done >= devices * 0.99:
                            ninety_nine = now - since
                        if now > deadline:
                            raise RuntimeError(f"timed out: {done} of {devices} devices on {digest}")
                        time.sleep(0.05)
                    assert half is not None
                    return half, ninety_nine

                try:
                    result.converge_v1_s = time_to(None, time.monotonic(), 4 * poll_s + 120)[1]
                    say(f"99% on v1 after {result.converge_v1_s:.1f} s")
                    time.sleep(poll_s * 0.3)  # the last stragglers

                    t0 = apply(digests["good_version"])
                    result.without_p50_s, result.without_p99_s = time_to(digests["good"], t0, 4 * poll_s + 120)
                    say(f"without nudges: 50%/99% after {result.without_p50_s:.1f}/{result.without_p99_s:.1f} s")

                    nudger.start()
                    time.sleep(3)  # its first look at every device (all up to date: nothing published)
                    t0 = apply(digests["bad_version"])
                    result.with_p50_s, result.with_p99_s = time_to(digests["bad"], t0, 4 * poll_s + 120)
                    say(f"with nudges: 50%/99% after {result.with_p50_s:.1f}/{result.with_p99_s:.1f} s")
                    result.nudges_published = nudger.published
                finally:
                    summary = background.stop()
                result.requests = summary.requests
                result.nudges_received = summary.requests.get("nudged_polls", 0)
        finally:
            nudger.stop()
            plane.close()
            broker.stop()
    result.load_after = os.getloadavg()
    result.total_s = round(time.monotonic() - started, 1)
    return result


def markdown(result: NudgeResult) -> str:
    m = result.machine
    load = ", ".join(f"{x:.2f}" for x in result.load_before) + " → " + ", ".join(f"{x:.2f}" for x in result.load_after)
    speedup = result.without_p99_s / result.with_p99_s if result.with_p99_s > 0 else float("nan")
    return "\n".join(
        [
            f"## MQTT nudges: {result.devices:,} simulated devices at a {result.poll_s:g} s poll",
            "",
            f"Measured {result.started_at[:10]} on {m.get('cpu', '?')}, {m.get('cores', '?')} cores (load average "
            f"1/5/15 min {load}; the machine was shared), in {result.total_s / 60:.1f} min, with:",
            "",
            "```sh",
            result.command,
            "```",
            "",
            f"- {result.devices:,} simulated agents (one asyncio process, real HTTP, {result.poll_s:g} s polls with "
            "±20% jitter) against one `slmops server` process on SQLite, and Debian's Mosquitto on loopback with "
            "password authentication and the per-device topic ACL of `slmops.control.nudge`. The simulator holds one "
            "broker connection for all its devices (a real device holds its own).",
            "- Each leg applies a changed blueprint (`POST /blueprints`, a new model version) and measures until the "
            "devices themselves run it. The nudger ran beside the server as a second replica would "
            "(it sees the change within its 0.5 s world-cache TTL, ticks every 0.5 s, publishes ≤ 500 nudges/s).",
            "",
            "| apply → devices on the new version | 50% | 99% |",
            "|---|---:|---:|",
            f"| polling only | {result.without_p50_s:.1f} s | {result.without_p99_s:.1f} s |",
            f"| with MQTT nudges | {result.with_p50_s:.1f} s | {result.with_p99_s:.1f} s |",
            "",
            f"99% of the fleet {speedup:.0f}x sooner with nudges; {result.nudges_published:,} nudges published, "
            f"{result.nudges_received:,} polls they triggered. With nudges the time is the publish rate and the "
            "server's answer rate, not the poll interval.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--poll-s", type=float, default=60.0, help="mean seconds between a device's polls")
    parser.add_argument("--write", action="store_true", help="replace the nudges section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    result = run_nudges(args.devices, args.poll_s)
    section = markdown(result)
    print(section)
    if args.write:
        write_section(section, "nudges")
    return 0


if __name__ == "__main__":
    sys.exit(main())
