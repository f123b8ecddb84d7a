"""One simulated edge agent: real HTTP, real wire schemas, simulated download and inference.

A :class:`SimAgent` enrolls with an enrollment token and its own ed25519 key (claiming its credential with a signed
:func:`~slmops.core.wire.claim_message` when the token does not auto-approve), then polls its desired state with
``If-None-Match`` and posts a :class:`~slmops.core.wire.StatusReport` heartbeat after every poll, with jittered
intervals. When the desired version changes it trusts the signed manifest without fetching a single blob: the
download is a sleep of ``total size / profile bandwidth`` — blobs are never requested, so a fleet of thousands puts
the realistic control-plane load (polls and heartbeats) on the server, not the load of serving model files. Then it
"activates" the version through the :class:`~slmops.sim.runtime.SimulatedRuntime`; an activation failure or a
failing probe rolls it back to the previous version (event ``rolled_back``), and the agent does not try that
version again. Offline periods skip polls; a flaky network loses requests, which are retried with exponential
backoff and jitter, as are transport errors, 429 and 5xx answers.

Telemetry: every ``telemetry_window_s`` the agent closes a window of ``requests_per_window`` simulated requests on
its active version (latency and errors from the runtime, so a version bad on one class shows in that class's
numbers) and posts its buffered windows with ids, as the real agent does; offline, windows stay buffered (at most
``MAX_BUFFERED_WINDOWS``, the oldest dropped first) and go out when the device is back. Each window carries the
drift summary of its requests (:meth:`SimulatedRuntime.summaries`, shifted by the fleet's drift options once the
window starts ``after_s`` or more after ``fleet_started``); its token totals are theirs.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops import __version__
from slmops.agent.client import parse_retry_after
from slmops.core.candidates import version_label
from slmops.core.wire import (
    API_PREFIX,
    MAX_EVENTS_PER_REPORT,
    MAX_WINDOWS_PER_BATCH,
    ClaimRequest,
    DesiredState,
    DeviceEvent,
    EnrollRequest,
    EnrollResponse,
    StatusAck,
    StatusReport,
    TelemetryAck,
    TelemetryBatch,
    TelemetryWindow,
    claim_message,
)
from slmops.errors import AuthenticationError, UnavailableError
from slmops.registry.signing import format_public_key
from slmops.sim.profiles import DeviceProfile
from slmops.sim.runtime import SimulatedRuntime
from slmops.telemetry.aggregate import histogram_from_ms
from slmops.telemetry.drift import summarize

if TYPE_CHECKING:
    from slmops.sim.nudge import FleetNudges

__all__ = ["SimAgent", "sleep_unless_stopped"]

AGENT_VERSION = f"slmops-sim/{__version__}"
MAX_ATTEMPTS = 6
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 10.0
MAX_BUFFERED_WINDOWS = 50
TOKENS_PER_REQUEST = 32  # the completion length the per-token latency assumes (latency does not follow length)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when ``stop`` was set meanwhile."""
    if seconds <= 0:
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


class _Lost(Exception):
    """A request the simulated flaky network dropped."""


class SimAgent:
    """One simulated device. ``counters`` counts requests by kind; read it while the agent runs."""

    def __init__(
        self,
        name: str,
        profile: DeviceProfile,
        labels: dict[str, str],
        runtime: SimulatedRuntime,
        seed: int,
        poll_interval_s: float,
        download_time_scale: float = 1.0,
        requests_per_window: int = 20,
        telemetry_window_s: float = 10.0,
    ) -> None:
        self.name = name
        self.gate: asyncio.Semaphore | None = None  # set by FleetRun: at most max_connections requests in flight
        self.nudges: FleetNudges | None = None  # set by FleetRun when the fleet listens for MQTT nudges
        self._nudged = asyncio.Event()
        self.requests_per_window = requests_per_window
        self.telemetry_window_s = telemetry_window_s
        self.windows: list[TelemetryWindow] = []
        self.window_number = 0
        self.window_started = time.monotonic()
        self.fleet_started = self.window_started  # time.monotonic() when the fleet started; set by FleetRun
        self.profile = profile
        self.labels = labels
        self.runtime = runtime
        self.poll_interval_s = poll_interval_s
        self.download_time_scale = download_time_scale
        self.rng = random.Random(f"{seed}:agent:{name}")
        self.key = Ed25519PrivateKey.generate()
        self.device_id: str | None = None
        self.credential: str | None = None
        self.etag: str | None = None
        self.generation: str | None = None
        self.active_digest: str | None = None
        self.previous_digest: str | None = None
        self.active_label: str | None = None  # "name@version (variant)" of the active version
        self.failed_digests: set[str] = set()
        self.ever_ran: set[str] = set()  # every version this device activated
        self.events: list[DeviceEvent] = []
        self.counters: Counter[str] = Counter()
        self.enrolled_at: float | None = None  # time.monotonic()
        self.offline_until = 0.0
        self.phase = "starting"
        self._reported_capabilities = False

    # ------------------------------------------------------------------ HTTP with loss, retries and backoff

    async def _request(
        self, client: httpx.AsyncClient, kind: str, method: str, path: str, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if self.credential is not None:
            headers["Authorization"] = f"Bearer {self.credential}"
        last, retry_after = "no attempt", 0.0
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                self.counters["retries"] += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
                await asyncio.sleep(retry_after + self.rng.uniform(0, delay))  # full jitter after Retry-After
                retry_after = 0.0
            try:
                if self.rng.random() < self.profile.flaky_network_probability:
                    raise _Lost()
                self.counters[kind] += 1
                if self.gate is None:
                    response = await client.request(method, f"{API_PREFIX}{path}", headers=headers, **kwargs)
                else:
                    async with self.gate:  # queue here, not in httpcore's pool (its queue costs O(waiters) per request)
                        response = await client.request(method, f"{API_PREFIX}{path}", headers=headers, **kwargs)
            except _Lost:
                self.counters["lost"] += 1
                last = "lost by the simulated flaky network"
                continue
            except httpx.TransportError as exc:
                self.counters["transport_errors"] += 1
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                self.counters[f"http_{response.status_code}"] += 1
                last = f"HTTP {response.status_code}"
                retry_after = parse_retry_after(response.headers.get("Retry-After")) or 0.0
                continue
            return response
        raise UnavailableError(f"{kind} failed {MAX_ATTEMPTS} times; last: {last}")

    # ------------------------------------------------------------------ enrollment

    async def enroll(self, client: httpx.AsyncClient, token: str, stop: asyncio.Event) -> bool:
        """Enroll (and claim when pending) until approved; False when stopped first."""
        request = EnrollRequest(
            token=token,
            public_key=format_public_key(self.key.public_key()).strip(),
            capabilities=self.profile.capabilities(),
            labels=self.labels,
            hostname=self.name,
        )
        answer = await self._enroll_once(client, "enroll", lambda: request.model_dump(mode="json"), stop)
        if answer is None:
            return False
        self.device_id = answer.device_id
        while answer.credential is None:
            if await sleep_unless_stopped(stop, self._jittered()):
                return False
            claimed = await self._enroll_once(client, "claim", self._signed_claim, stop, "/enroll/claim")
            if claimed is None:
                return False
            answer = claimed
        self.credential = answer.credential
        self.enrolled_at = time.monotonic()
        self.phase = "idle"
        return True

    def _signed_claim(self) -> dict[str, Any]:
        """A claim signed now: the server accepts each signed claim once, so every attempt signs a new one."""
        assert self.device_id is not None
        now = int(time.time())
        signature = _b64(self.key.sign(claim_message(self.device_id, now)))
        return ClaimRequest(device_id=self.device_id, timestamp=now, signature=signature).model_dump(mode="json")

    async def _enroll_once(
        self,
        client: httpx.AsyncClient,
        kind: str,
        body: Callable[[], dict[str, Any]],
        stop: asyncio.Event,
        path: str = "/enroll",
    ) -> EnrollResponse | None:
        while not stop.is_set():
            try:
                response = await self._request(client, kind, "POST", path, json=body())
            except UnavailableError:
                await sleep_unless_stopped(stop, self._jittered())
                continue
            if response.status_code in (200, 202):
                return EnrollResponse.model_validate_json(response.content)
            self.counters[f"{kind}_refused"] += 1
            raise AuthenticationError(f"{kind} refused with HTTP {response.status_code}: {response.text[:300]}")
        return None

    # ------------------------------------------------------------------ the poll loop

    def provision(self, device_id: str, credential: str) -> None:
        """Start as an already enrolled device (benchmarks insert 10,000 device rows at once instead of enrolling)."""
        self.device_id, self.credential = device_id, credential
        self.enrolled_at = time.monotonic()
        self.phase = "idle"

    async def run(self, client: httpx.AsyncClient, token: str, stop: asyncio.Event, start_delay_s: float) -> None:
        if await sleep_unless_stopped(stop, start_delay_s):
            return
        if self.credential is None and not await self.enroll(client, token, stop):
            return
        if self.nudges is not None:
            self.nudges.watch(self)
        if await self._wait_for_poll(stop, self.rng.uniform(0, self.poll_interval_s)):
            return
        while not stop.is_set():
            self.close_window()
            if not self._offline():
                try:
                    await self.poll_once(client)
                    await self.send_telemetry(client)
                except UnavailableError:
                    self.counters["failed_polls"] += 1
            if await self._wait_for_poll(stop, self._jittered()):
                return

    def nudge(self) -> None:
        """Poll now (an MQTT nudge arrived; called in the fleet's event loop)."""
        self._nudged.set()

    async def _wait_for_poll(self, stop: asyncio.Event, seconds: float) -> bool:
        """Sleep until the next poll: ``seconds``, or less when nudged; True when ``stop`` was set meanwhile."""
        if self.nudges is None:
            return await sleep_unless_stopped(stop, seconds)
        stopped = asyncio.ensure_future(stop.wait())
        nudged = asyncio.ensure_future(self._nudged.wait())
        try:
            await asyncio.wait((stopped, nudged), timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            nudged.cancel()
        if self._nudged.is_set():
            self._nudged.clear()
            self.counters["nudged_polls"] += 1
        return stop.is_set()

    def _offline(self) -> bool:
        now = time.monotonic()
        if now < self.offline_until:
            self.counters["offline_polls"] += 1
            return True
        every = self.profile.offline_every_s
        if every > 0 and self.rng.random() < self.poll_interval_s / every:
            self.offline_until = now + self.profile.offline_duration_s
            self.counters["offline_periods"] += 1
            return True
        return False

    def _jittered(self) -> float:
        return self.poll_interval_s * self.rng.uniform(0.8, 1.2)

    async def poll_once(self, client: httpx.AsyncClient) -> None:
        """One desired-state poll, the work it asks for, and one status report."""
        assert self.device_id is not None
        headers = {"If-None-Match": self.etag} if self.etag else {}
        response = await self._request(client, "desired", "GET", f"/devices/{self.device_id}/desired", headers=headers)
        if response.status_code == 304:
            self.counters["desired_304"] += 1
        elif response.status_code == 200:
            self.counters["desired_200"] += 1
            state = DesiredState.model_validate_json(response.content)
            await self._reach(state)
            self.etag = response.headers.get("ETag")
            self.generation = state.generation
        else:
            self.counters[f"desired_http_{response.status_code}"] += 1
        await self.report(client)

    async def _reach(self, state: DesiredState) -> None:
        model = state.model
        if model is None or model.digest == self.active_digest or model.digest in self.failed_digests:
            return
        manifest = model.envelope.manifest
        self.close_window(force=True)  # the window so far belongs to the version that served it
        self.phase = "downloading"
        await asyncio.sleep(manifest.total_size * self.download_time_scale / self.profile.bandwidth_bytes_per_s)
        label = version_label(manifest)
        attempt = sum(1 for e in self.events if e.version_digest == model.digest)
        if self.runtime.activation_fails(self.profile, self.name, model.digest, attempt):
            self._rollback(model.digest, "activation failed")
        elif not self.runtime.probe_passes(self.profile, self.name, model.digest):
            self._rollback(model.digest, "probe failed")
        else:
            self.previous_digest, self.active_digest, self.active_label = self.active_digest, model.digest, label
            self.ever_ran.add(model.digest)
            self._event("activated", model.digest, {"from": self.previous_digest})
        self.phase = "serving" if self.active_digest else "idle"

    def _rollback(self, digest: str, reason: str) -> None:
        self.failed_digests.add(digest)
        self.counters["rollbacks"] += 1
        self._event("rolled_back", digest, {"reason": reason, "to": self.active_digest})

    def _event(self, kind: str, digest: str | None, detail: dict[str, Any]) -> None:
        self.events.append(
            DeviceEvent(id=uuid.uuid4().hex, time=_now(), kind=kind, version_digest=digest, detail=detail)
        )
        del self.events[: -4 * MAX_EVENTS_PER_REPORT]  # bound the buffer if the server stays away

    def close_window(self, force: bool = False) -> None:
        """Close the telemetry window when it is due: simulated requests on the active version, buffered."""
        now = time.monotonic()
        elapsed = now - self.window_started
        if not force and elapsed < self.telemetry_window_s:
            return
        started, self.window_started = self.window_started, now
        digest = self.active_digest
        if digest is None or self.requests_per_window == 0:
            return
        self.window_number += 1
        sample = self.runtime.sample(self.profile, self.name, digest, self.window_number, self.requests_per_window)
        since_start = started - self.fleet_started
        summaries = self.runtime.summaries(self.profile, self.name, digest, self.window_number, sample, since_start)
        self.windows.append(
            TelemetryWindow(
                id=uuid.uuid4().hex,
                version_digest=digest,
                window_start=datetime.fromtimestamp(time.time() - elapsed, UTC).isoformat().replace("+00:00", "Z"),
                window_s=max(0.001, min(86400.0, elapsed)),
                requests=sample.requests,
                errors=sample.errors,
                prompt_tokens=sum(s.prompt_tokens for s in summaries),
                completion_tokens=sum(s.completion_tokens for s in summaries),
                latency_ms=histogram_from_ms(sample.latencies_ms),
                per_token_ms=histogram_from_ms(v / TOKENS_PER_REQUEST for v in sample.latencies_ms),
                drift=summarize(summaries),
            )
        )
        del self.windows[:-MAX_BUFFERED_WINDOWS]

    async def send_telemetry(self, client: httpx.AsyncClient) -> None:
        """Post the buffered windows; those acknowledged leave the buffer (a retry never double-counts)."""
        assert self.device_id is not None
        if not self.windows:
            return
        batch = TelemetryBatch(windows=self.windows[:MAX_WINDOWS_PER_BATCH])
        response = await self._request(
            client, "telemetry", "POST", f"/devices/{self.device_id}/telemetry", json=batch.model_dump(mode="json")
        )
        if response.status_code != 200:
            self.counters[f"telemetry_http_{response.status_code}"] += 1
            return
        accepted = set(TelemetryAck.model_validate_json(response.content).accepted_ids)
        self.windows = [w for w in self.windows if w.id not in accepted]

    async def report(self, client: httpx.AsyncClient) -> None:
        assert self.device_id is not None
        report = StatusReport(
            phase="serving" if self.active_digest else "idle",
            health="ok" if self.active_digest else "unknown",
            active_digest=self.active_digest,
            previous_digest=self.previous_digest,
            desired_generation=self.generation,
            capabilities=None if self._reported_capabilities else self.profile.capabilities(),
            agent_version=AGENT_VERSION,
            events=self.events[:MAX_EVENTS_PER_REPORT],
        )
        response = await self._request(
            client, "status", "POST", f"/devices/{self.device_id}/status", json=report.model_dump(mode="json")
        )
        if response.status_code != 200:
            self.counters[f"status_http_{response.status_code}"] += 1
            return
        self._reported_capabilities = True
        accepted = set(StatusAck.model_validate_json(response.content).accepted_event_ids)
        self.events = [e for e in self.events if e.id not in accepted]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
