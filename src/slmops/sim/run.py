"""Run a simulated fleet: thousands of :class:`SimAgent` in one asyncio process against a real control plane.

All agents share one ``httpx.AsyncClient`` whose connection pool (``max_connections``) bounds the concurrent
requests, as a load balancer in front of a real fleet would. :class:`FleetRun` runs in the caller's event loop;
:class:`BackgroundFleet` runs one in a thread, for tests and benchmarks that drive the server meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from slmops.sim.agent import SimAgent, sleep_unless_stopped
from slmops.sim.fleet import FleetSpec
from slmops.sim.runtime import SimulatedRuntime

if TYPE_CHECKING:
    from slmops.agent.nudge import NudgeConfig

__all__ = ["BackgroundFleet", "FleetRun", "FleetSummary"]


@dataclass(frozen=True)
class FleetSummary:
    devices: int
    enrolled: int
    elapsed_s: float
    enroll_s: float | None  # from start until the last device enrolled; None while some are not
    by_profile: dict[str, int]
    by_version: dict[str, dict[str, int]]  # profile -> "name@version (variant)" or "none" -> devices
    requests: dict[str, int]
    requests_per_s: float
    errors: dict[str, str] = field(default_factory=dict)  # device -> why its task ended, for the few that failed

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "enrolled": self.enrolled,
            "elapsed_s": round(self.elapsed_s, 3),
            "enroll_s": None if self.enroll_s is None else round(self.enroll_s, 3),
            "by_profile": self.by_profile,
            "by_version": self.by_version,
            "requests": self.requests,
            "requests_per_s": round(self.requests_per_s, 1),
            "errors": self.errors,
        }


_SENT = ("enroll", "claim", "desired", "status", "telemetry")


class FleetRun:
    """A fleet of simulated agents built from a :class:`FleetSpec`."""

    def __init__(
        self,
        spec: FleetSpec,
        server_url: str,
        enroll_token: str,
        *,
        max_connections: int = 64,
        timeout_s: float = 30.0,
        poll_interval_s: float | None = None,
        enroll_spread_s: float = 0.0,
        download_time_scale: float = 1.0,
        telemetry_window_s: float | None = None,
        nudges: NudgeConfig | None = None,
    ) -> None:
        self.spec = spec
        self.nudges = nudges  # listen for MQTT nudges (sim/nudge.py): one broker connection for the whole fleet
        self.telemetry_window_s = telemetry_window_s
        self.server_url = server_url.rstrip("/")
        self.enroll_token = enroll_token
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s if poll_interval_s is not None else spec.poll_interval_s
        self.enroll_spread_s = enroll_spread_s
        self.download_time_scale = download_time_scale
        self.agents: list[SimAgent] = []
        self.errors: dict[str, str] = {}
        self.started: float | None = None

    def build(self) -> list[SimAgent]:
        """Make the agents (one ed25519 key each); names are ``<profile>-<n>``, stable for a given spec."""
        profiles = self.spec.all_profiles()
        runtime = SimulatedRuntime(
            seed=self.spec.seed,
            overrides=self.spec.runtime.overrides,
            base_latency_ms=self.spec.runtime.base_latency_ms,
            base_error_rate=self.spec.runtime.base_error_rate,
            traffic=self.spec.runtime.traffic,
            drift=self.spec.runtime.drift,
        )
        numbers: Counter[str] = Counter()
        agents = []
        for group in self.spec.devices:
            for _ in range(group.count):
                numbers[group.profile] += 1
                agents.append(
                    SimAgent(
                        name=f"{group.profile}-{numbers[group.profile]}",
                        profile=profiles[group.profile],
                        labels=dict(group.labels),
                        runtime=runtime,
                        seed=self.spec.seed,
                        poll_interval_s=self.poll_interval_s,
                        download_time_scale=self.download_time_scale,
                        requests_per_window=self.spec.runtime.requests_per_window,
                        telemetry_window_s=self.telemetry_window_s or self.spec.runtime.telemetry_window_s,
                    )
                )
        return agents

    async def run(self, stop: asyncio.Event, duration_s: float | None = None) -> FleetSummary:
        """Run until ``stop`` is set or ``duration_s`` passed, then return the summary."""
        if not self.agents:
            self.agents = self.build()
        self.started = time.monotonic()
        for agent in self.agents:
            agent.fleet_started = self.started  # drift shifts count from here
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
        timeout = httpx.Timeout(self.timeout_s, pool=None)  # waiting for a pooled connection is not a failure
        gate = asyncio.Semaphore(self.max_connections)
        nudges = None
        if self.nudges is not None:
            from slmops.sim.nudge import FleetNudges

            nudges = FleetNudges(self.nudges, asyncio.get_running_loop()).open()
        for agent in self.agents:
            agent.gate = gate
            agent.nudges = nudges
        try:
            return await self._run(stop, duration_s, limits, timeout)
        finally:
            if nudges is not None:
                nudges.close()
            for agent in self.agents:
                agent.nudges = None

    async def _run(
        self, stop: asyncio.Event, duration_s: float | None, limits: httpx.Limits, timeout: httpx.Timeout
    ) -> FleetSummary:
        async with httpx.AsyncClient(base_url=self.server_url, limits=limits, timeout=timeout) as client:
            count = len(self.agents)
            tasks = [
                asyncio.create_task(
                    agent.run(client, self.enroll_token, stop, self.enroll_spread_s * i / max(1, count)),
                    name=agent.name,
                )
                for i, agent in enumerate(self.agents)
            ]
            if duration_s is not None:
                await sleep_unless_stopped(stop, duration_s)
                stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for agent, result in zip(self.agents, results, strict=True):
            if isinstance(result, BaseException):
                self.errors[agent.name] = f"{type(result).__name__}: {result}"
        return self.summary()

    def summary(self) -> FleetSummary:
        """The fleet as the simulated agents see it now (safe to call from another thread: reads only)."""
        agents = list(self.agents)
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        by_profile: Counter[str] = Counter(a.profile.name for a in agents)
        by_version: dict[str, Counter[str]] = {}
        requests: Counter[str] = Counter()
        enrolled_at = []
        for agent in agents:
            by_version.setdefault(agent.profile.name, Counter())[agent.active_label or "none"] += 1
            requests.update(dict(agent.counters))
            if agent.enrolled_at is not None:
                enrolled_at.append(agent.enrolled_at)
        sent = sum(requests[k] for k in _SENT)
        complete = len(enrolled_at) == len(agents) and agents and self.started is not None
        return FleetSummary(
            devices=len(agents),
            enrolled=len(enrolled_at),
            elapsed_s=elapsed,
            enroll_s=max(enrolled_at) - self.started if complete and self.started is not None else None,
            by_profile=dict(sorted(by_profile.items())),
            by_version={p: dict(sorted(c.items())) for p, c in sorted(by_version.items())},
            requests=dict(sorted(requests.items())),
            requests_per_s=sent / elapsed if elapsed > 0 else 0.0,
            errors=dict(list(self.errors.items())[:20]),
        )


class BackgroundFleet:
    """A :class:`FleetRun` in its own thread and event loop; ``stop()`` ends it and returns the summary."""

    def __init__(self, fleet: FleetRun) -> None:
        self.fleet = fleet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._result: FleetSummary | None = None
        self._failure: BaseException | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        if not self.fleet.agents:  # keys made here, so summary() sees every device from the start
            self.fleet.agents = self.fleet.build()
        self._thread = threading.Thread(target=self._main, name="slmops-sim", daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            self._result = await self.fleet.run(self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by stop()
            self._failure = exc
            self._ready.set()

    def summary(self) -> FleetSummary:
        return self.fleet.summary()

    def stop(self, timeout_s: float = 60.0) -> FleetSummary:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._failure is not None:
            raise self._failure
        return self._result if self._result is not None else self.fleet.summary()
