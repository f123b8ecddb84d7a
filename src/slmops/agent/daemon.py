"""The edge agent: enroll, fetch the desired state, plan (``core.reconcile``), execute, serve, report.

Every step persists ``state.json`` before it runs (phase, step) and after (its result), and every step is
idempotent, so an agent killed at any moment continues correctly after a restart:

- *verify*: the desired manifest's signature against the server-provided trusted keys; nothing is downloaded first.
- *download*: resumable partials, sha256-verified into the blob cache (:mod:`slmops.agent.download`).
- *stage*: a slot directory renamed into place when complete (:mod:`slmops.agent.slots`).
- *probe*: load and generate in a child process; a failed probe marks the version failed.
- *activate*: ``switching_from/to`` is persisted, then ``previous`` and ``current`` are swapped atomically, then the
  version starts its probation; ``serving.marker`` is written before the model is loaded. A marker found at start-up
  means the process died while serving: during probation that is a crash of the version (counted, persisted).
- *commit*: probation passed; the marker is cleared and old slots are removed.
- *rollback*: ``current`` goes back to ``previous``, with an ``rolled_back`` event that says why.

The agent serves its active model whether or not the control plane answers; events wait in the outbox.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from slmops import __version__
from slmops.agent._files import atomic_write
from slmops.agent.capabilities import measure_capabilities
from slmops.agent.client import ControlPlaneClient
from slmops.agent.download import BlobWant, DownloadConfig, Downloader
from slmops.agent.identity import Identity, IdentityStore
from slmops.agent.outbox import Outbox, OutboxConfig, TelemetryOutbox, TelemetryOutboxConfig, new_event
from slmops.agent.runtime import LlamaRuntime, ModelRuntime
from slmops.agent.slots import Slots
from slmops.agent.state import AgentLock, AgentState, DataDir, StateStore
from slmops.core.reconcile import LocalView, Policy, Step, plan, target_of
from slmops.core.wire import (
    MAX_WINDOWS_PER_BATCH,
    AgentPhase,
    Capabilities,
    ClaimRequest,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    RuntimeConfig,
    StatusReport,
    TelemetryBatch,
    TelemetryWindow,
)
from slmops.errors import AuthenticationError, ConfigError, SLMOpsError, UnavailableError
from slmops.registry.blobstore import DirectoryBlobStore
from slmops.registry.signing import verify_envelope
from slmops.telemetry import WindowCounters, windows_from_stats

if TYPE_CHECKING:
    from slmops.runtime.stats import RequestStats

__all__ = ["PAUSE_ENV", "Agent", "AgentConfig"]

log = logging.getLogger(__name__)

PAUSE_ENV = "SLMOPS_AGENT_TEST_PAUSE_AT"
"""Test hook: the name of a point at which the agent prints ``SLMOPS_AGENT_PAUSED <point>`` and sleeps (to be
SIGKILLed there). Points: download_chunk, before_switch, after_previous_link, after_switch, before_serve and
after_serve (only for a version on probation), before_commit, before_rollback, after_rollback."""

_PHASE: dict[str, AgentPhase] = {
    "verify": "verifying",
    "download": "downloading",
    "stage": "staging",
    "probe": "probing",
    "activate": "activating",
    "commit": "serving",
    "rollback": "rolling_back",
}


def _pause(point: str) -> None:
    if os.environ.get(PAUSE_ENV) == point:
        sys.stdout.write(f"SLMOPS_AGENT_PAUSED {point}\n")
        sys.stdout.flush()
        while True:
            time.sleep(3600)


def _short(digest: str | None) -> str:
    return (digest or "-").removeprefix("sha256:")[:12]


@dataclass(frozen=True)
class AgentConfig:
    data_dir: Path
    server_url: str | None = None
    enroll_token: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    poll_interval_s: float | None = None  # None: what the control plane said at enrollment
    poll_jitter: float = 0.2  # each wait is the interval times a random factor in [1 - jitter, 1 + jitter]
    probation_s: float = 120.0
    health_interval_s: float = 60.0
    heartbeat_interval_s: float = 60.0
    request_timeout_s: float = 30.0
    memory_bytes: int | None = None
    cpu_cores: int | None = None
    capabilities_file: Path | None = None
    api_port: int | None = None  # serve the local API here instead of the blueprint's port (several agents per host)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    policy: Policy = field(default_factory=Policy)
    telemetry_window_s: float = 60.0  # one telemetry window per version this long (closed at the next poll after)
    telemetry: TelemetryOutboxConfig = field(default_factory=TelemetryOutboxConfig)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        transport: httpx.BaseTransport | None = None,
        runtime: ModelRuntime | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.data = DataDir(config.data_dir)
        self._transport = transport
        self.runtime: ModelRuntime = runtime or LlamaRuntime()
        self._clock = clock
        self._lock = AgentLock(self.data.lock_file)
        self._store = StateStore(self.data.state_file)
        self.state = AgentState()
        self.outbox = Outbox(self.data.outbox_file, config.outbox)
        self.telemetry = TelemetryOutbox(self.data.root / "telemetry.db", config.telemetry)
        self._window_started = clock()
        self._counters: dict[str | None, WindowCounters] = {}  # crashes, restarts, rollbacks in the open window
        self._fresh: str | None = None  # a version just activated or restored: serving it is no restart
        self.identities = IdentityStore(self.data)
        self.cache = DirectoryBlobStore(self.data.blob_dir)
        self.slots = Slots(self.data.slot_dir, self.cache)
        self.client: ControlPlaneClient | None = None
        self._serving: str | None = None
        self._active_crashed = False
        self._offline_since: float | None = None
        self._last_report: tuple[Any, ...] | None = None
        self._last_report_at = 0.0
        self._last_health_at = 0.0
        self._run_id = secrets.token_hex(8)
        self._capabilities: Capabilities | None = None
        self._opened = False

    # ----------------------------------------------------------------------------------------------- lifecycle

    def open(self) -> Agent:
        self.data.initialize()
        self._lock.acquire()
        try:
            self.cache.initialize()
            self.outbox.open()
            self.telemetry.open()
            self._window_started = self._clock()
            self.state = self._store.load()
            identity = self.identities.identity()
            server = self.config.server_url or (identity.server_url if identity else None)
            if server is None:
                raise ConfigError(f"no control plane for the agent in {self.data.root}; pass --server URL")
            self.client = ControlPlaneClient(
                server,
                self.identities.credential(),
                transport=self._transport,
                timeout_s=self.config.request_timeout_s,
            )
            self._recover()
        except BaseException:
            self._release()
            raise
        self._opened = True
        return self

    def _release(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.outbox.close()
        self.telemetry.close()
        self._lock.release()

    def close(self) -> None:
        """A clean stop: the serving marker goes, so the next start does not count a crash."""
        if not self._opened:
            return
        self._opened = False
        with contextlib.suppress(SLMOpsError, OSError):
            self.close_window(force=True)  # keep what the local API counted; it is sent after the next start
        self.runtime.close()
        with contextlib.suppress(FileNotFoundError):
            self.data.marker_file.unlink()
        self._release()

    def __enter__(self) -> Agent:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _save(self) -> None:
        self._store.save(self.state)

    def _event(self, kind: str, digest: str | None = None, **detail: Any) -> None:
        self.outbox.add(new_event(kind, digest, detail))

    # ----------------------------------------------------------------------------------------------- recovery

    def _recover(self) -> None:
        """Make ``state.json`` agree with the slots on disk, and count a crash if the last run died serving."""
        state = self.state
        disk = self.slots.current()
        now = self._clock()
        if disk != state.active:
            if disk is not None and disk == state.switching_to:
                # the switch happened, the state write after it did not: the version starts its probation now
                state.committed = False
                state.probation_until = now + self.config.probation_s
                state.health_failures = 0
            else:
                state.committed = True  # a finished rollback (or a hand-made change): trust the disk
                state.probation_until = None
            state.active = disk
        state.switching_from = state.switching_to = None
        marker = self._read_marker()
        if marker is not None:
            digest, run = marker.get("digest"), marker.get("run")
            if run is None or run != state.last_crash_run:
                state.last_crash_run = run if isinstance(run, str) else None
                in_probation = digest is not None and digest == state.active and not state.committed
                if in_probation and isinstance(digest, str):
                    state.crash_counts[digest] = state.crash_counts.get(digest, 0) + 1
                    self._active_crashed = True
                self._count(digest if isinstance(digest, str) else None, crashes=1)
                self._event(
                    "crash",
                    digest if isinstance(digest, str) else None,
                    during_probation=in_probation,
                    crashes=state.crash_counts.get(str(digest), 0),
                    reason="the agent process ended while serving this version without a clean stop",
                )
        state.step = None
        state.phase = "starting"
        self._save()
        with contextlib.suppress(FileNotFoundError):
            self.data.marker_file.unlink()
        self.slots.gc(self._keep())
        self.cache.sweep_temporary(older_than_s=0)

    def _read_marker(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.data.marker_file.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {"digest": None, "run": None}
        return value if isinstance(value, dict) else None

    def _keep(self) -> set[str]:
        keep = {d for d in (self.slots.current(), self.slots.previous()) if d is not None}
        if self.state.desired is not None and self.state.desired.model is not None:
            keep.add(self.state.desired.model.digest)
        return keep

    # ----------------------------------------------------------------------------------------------- enrollment

    def capabilities(self) -> Capabilities:
        active = self.slots.current()
        probe = self.state.probes.get(active) if active else None
        self._capabilities = measure_capabilities(
            self.data.root,
            memory_bytes=self.config.memory_bytes,
            cpu_cores=self.config.cpu_cores,
            capabilities_file=self.config.capabilities_file,
            probe_decode_tokens_per_s=probe.decode_tokens_per_s if probe and probe.ok else None,
        )
        return self._capabilities

    def _require_client(self) -> ControlPlaneClient:
        if self.client is None:
            raise RuntimeError("Agent.open() was not called")
        return self.client

    def enrolled(self) -> bool:
        identity = self.identities.identity()
        return identity is not None and identity.state == "approved" and self.identities.credential() is not None

    def _remember(self, response: EnrollResponse, server_url: str, previous: Identity | None) -> None:
        trusted = response.trusted_keys or (previous.trusted_keys if previous else [])
        if response.credential:
            self.identities.save_credential(response.credential)
            self._require_client().credential = response.credential
        self.identities.save_identity(
            Identity(
                server_url=server_url,
                device_id=response.device_id,
                state=response.state,
                trusted_keys=trusted,
                poll_interval_s=response.poll_interval_s,
            )
        )

    def enroll(self) -> bool:
        """Enroll (once) and claim the credential when approved; returns whether the device is approved now."""
        client = self._require_client()
        identity = self.identities.identity()
        if identity is not None and identity.state == "approved" and self.identities.credential():
            return True
        key = self.identities.key()
        if identity is None:
            if not self.config.enroll_token:
                raise ConfigError(
                    f"the agent in {self.data.root} is not enrolled; pass --enroll-token TOKEN "
                    "(an operator makes one with `slmops enroll-token create`)"
                )
            request = EnrollRequest(
                token=self.config.enroll_token,
                public_key=key.public_text,
                capabilities=self.capabilities(),
                labels=self.config.labels,
                hostname=socket.gethostname()[:255],
            )
            response = client.enroll(request)
            self._remember(response, client.base_url, None)
            self._event("enrolled", None, state=response.state)
            return response.state == "approved"  # pending: claim at the next poll
        timestamp = int(self._clock())
        response = client.claim(
            ClaimRequest(
                device_id=identity.device_id,
                timestamp=timestamp,
                signature=key.sign_claim(identity.device_id, timestamp),
            )
        )
        self._remember(response, identity.server_url, identity)
        if response.state == "approved":
            self._event("approved", None)
        return response.state == "approved"

    # ----------------------------------------------------------------------------------------------- the loop

    def poll_interval_s(self) -> float:
        if self.config.poll_interval_s is not None:
            return self.config.poll_interval_s
        identity = self.identities.identity()
        return identity.poll_interval_s if identity else 30.0

    def run(self, *, once: bool = False, stop: threading.Event | None = None) -> None:
        """Enroll if needed, then reconcile until ``stop`` is set (or one pass with ``once``)."""
        stop = stop or threading.Event()
        rng = random.Random()
        self.ensure_serving()  # serve what is active before touching the network: offline starts serve at once
        while not stop.is_set():
            try:
                approved = self.enroll()
            except UnavailableError as exc:
                log.warning("%s", exc)
                approved = False
            if approved:
                self.reconcile_once()
            elif once:
                log.warning("this device waits for an operator's approval; run the agent again later")
            if once:
                return
            jitter = self.config.poll_jitter
            stop.wait(self.poll_interval_s() * rng.uniform(1 - jitter, 1 + jitter))

    def reconcile_once(self) -> list[Step]:
        """Fetch the desired state, converge towards it, serve, check health, report. Never raises for the network."""
        self._fetch_desired()
        done = self.converge()
        self.ensure_serving()
        self._check_health()
        self.converge()  # a failed health check may call for a rollback
        self.ensure_serving()
        self.report()
        self.flush_telemetry()
        return done

    def _fetch_desired(self) -> None:
        identity = self.identities.identity()
        if identity is None:
            return
        try:
            fetched = self._require_client().desired(identity.device_id, self.state.etag)
        except UnavailableError as exc:
            if self._offline_since is None:
                self._offline_since = self._clock()
                self._event("control_plane_unreachable", None, reason=str(exc)[:300])
            return
        except AuthenticationError as exc:
            self._note_error(str(exc))
            return
        if self._offline_since is not None:
            self._event("control_plane_reachable", None, offline_s=round(self._clock() - self._offline_since, 3))
            self._offline_since = None
        if fetched.changed and fetched.state is not None:
            self._set_desired(fetched.state, fetched.etag)

    def _set_desired(self, desired: DesiredState, etag: str | None) -> None:
        old = self.state.desired
        old_digest = old.model.digest if old is not None and old.model is not None else None
        new_digest = desired.model.digest if desired.model is not None else None
        if new_digest != old_digest:
            # a new desired version: earlier failures of other versions may be retried if they are desired again
            self.state.failed = {d: r for d, r in self.state.failed.items() if d == new_digest}
            self._event("desired_changed", new_digest, generation=desired.generation)
        self.state.desired = desired
        self.state.etag = etag or desired.generation
        self._save()

    def view(self) -> LocalView:
        state = self.state
        now = self._clock()
        return LocalView(
            active=self.slots.current(),
            previous=self.slots.previous(),
            committed=state.committed,
            verified=frozenset(state.verified),
            cached=frozenset(self.cache.digests()),
            staged=self.slots.staged(),
            probed=frozenset(d for d, r in state.probes.items() if r.ok),
            failed=dict(state.failed),
            crash_counts=dict(state.crash_counts),
            active_crashed=self._active_crashed,
            health_failures=state.health_failures,
            probation_over=state.probation_until is None or now >= state.probation_until,
        )

    def converge(self, max_steps: int = 16) -> list[Step]:
        """Plan and execute one step at a time until the plan is a no-op or a step fails."""
        done: list[Step] = []
        for _ in range(max_steps):
            steps = plan(target_of(self.state.desired), self.view(), self.config.policy)
            step = steps[0]
            if step.kind == "noop":
                phase: AgentPhase = "serving" if self.slots.current() else "idle"
                if self.state.phase != phase or self.state.step is not None:
                    self.state.phase, self.state.step = phase, None
                    self._save()
                break
            self.state.phase = _PHASE[step.kind]
            self.state.step = f"{step.kind} {step.digest}"
            self._save()
            try:
                self._execute(step)
            except SLMOpsError as exc:
                self._note_error(f"{step.kind} {_short(step.digest)} failed: {exc}", step)
                break
            self.state.step = None
            self.state.last_error = None
            self._save()
            done.append(step)
        return done

    def _note_error(self, message: str, step: Step | None = None) -> None:
        if message != self.state.last_error:  # one event per distinct error, not one per poll
            self._event(
                f"{step.kind}_failed" if step else "error", step.digest if step else None, reason=message[:1000]
            )
        self.state.last_error = message[:2000]
        self.state.phase = "error"
        self.state.step = None
        self._save()

    # ----------------------------------------------------------------------------------------------- steps

    def _desired_envelope(self, digest: str | None) -> Any:
        desired = self.state.desired
        if desired is None or desired.model is None or desired.model.digest != digest:
            raise ConfigError(f"version {digest} is no longer desired")
        return desired.model.envelope

    def _runtime_config(self) -> RuntimeConfig:
        runtime = self.state.desired.runtime if self.state.desired is not None else RuntimeConfig()
        if self.config.api_port is not None:
            runtime = runtime.model_copy(update={"port": self.config.api_port})
        return runtime

    def _execute(self, step: Step) -> None:
        handler = getattr(self, f"_step_{step.kind}")
        handler(step)

    def _step_verify(self, step: Step) -> None:
        envelope = self._desired_envelope(step.digest)
        identity = self.identities.identity()
        trusted = identity.trusted() if identity else {}
        if envelope.digest != step.digest:
            raise SLMOpsError(f"the desired state names {step.digest} but carries the manifest {envelope.digest}")
        key_id = verify_envelope(envelope, trusted)
        if envelope.manifest.format != "gguf":
            self.state.failed[str(step.digest)] = f"format {envelope.manifest.format} cannot run on this agent"
            return
        self.state.verified = sorted({*self.state.verified, str(step.digest)})
        self._event("verified", step.digest, key_id=key_id)

    def _step_download(self, step: Step) -> None:
        envelope = self._desired_envelope(step.digest)
        sizes = {f.digest: f.size for f in envelope.manifest.files}
        wants = [BlobWant(blob, sizes[blob]) for blob in step.blobs]
        first_chunk = threading.Event()

        def on_chunk(_digest: str, _offset: int) -> None:
            if not first_chunk.is_set():
                first_chunk.set()
                _pause("download_chunk")

        downloader = Downloader(
            self._require_client(), self.cache, self.data.download_dir, self.config.download, on_chunk=on_chunk
        )
        self._event("download_started", step.digest, blobs=len(wants), bytes=sum(w.size for w in wants))
        started = time.monotonic()
        report = downloader.fetch(wants)
        self._event(
            "downloaded",
            step.digest,
            blobs=len(report.fetched),
            bytes_received=report.bytes_received,
            attempts=report.attempts,
            resumed_from=report.resumed_from,
            seconds=round(time.monotonic() - started, 3),
        )

    def _step_stage(self, step: Step) -> None:
        self.slots.stage(self._desired_envelope(step.digest))
        self._event("staged", step.digest)

    def _step_probe(self, step: Step) -> None:
        digest = str(step.digest)
        envelope = self.slots.manifest(digest)
        record = self.runtime.probe(self.slots.model_file(digest), envelope, self._runtime_config())
        self.state.probes[digest] = record
        if record.ok:
            self._event("probe_passed", digest, decode_tokens_per_s=record.decode_tokens_per_s)
        else:
            self.state.failed[digest] = f"health probe failed: {record.reason}"
            self._event("probe_failed", digest, reason=record.reason)

    def _step_activate(self, step: Step) -> None:
        digest = str(step.digest)
        old = self.slots.current()
        self.state.switching_from, self.state.switching_to = old, digest
        self._save()
        _pause("before_switch")
        if old is not None:
            self.slots.set_previous(old)
            _pause("after_previous_link")
        self.slots.switch(digest)
        _pause("after_switch")
        self.state.active = digest
        self.state.committed = False
        self.state.probation_until = self._clock() + self.config.probation_s
        self.state.health_failures = 0
        self.state.switching_from = self.state.switching_to = None
        self._active_crashed = False
        self._save()
        self._capabilities = None  # the probe speed of the new active version
        self._event("activated", digest, previous=old, probation_s=self.config.probation_s)
        self._fresh = digest
        self.ensure_serving()

    def _step_commit(self, step: Step) -> None:
        _pause("before_commit")
        self.state.committed = True
        self.state.probation_until = None
        self._save()
        with contextlib.suppress(FileNotFoundError):
            self.data.marker_file.unlink()
        removed = self.slots.gc(self._keep())
        self._event("committed", step.digest, removed_slots=len(removed))

    def _step_rollback(self, step: Step) -> None:
        digest = str(step.digest)
        if step.mark_failed:
            self.state.failed[digest] = step.reason
            self._save()
        _pause("before_rollback")
        restored = self.slots.rollback()
        _pause("after_rollback")
        self.state.active = restored
        self.state.committed = True
        self.state.probation_until = None
        self.state.health_failures = 0
        self._active_crashed = False
        self._capabilities = None
        self._save()
        self._event("rolled_back", digest, to=restored, reason=step.reason, marked_failed=step.mark_failed)
        self._count(digest, rollbacks=1)
        self._fresh = restored
        self.ensure_serving()

    # ----------------------------------------------------------------------------------------------- serving

    def ensure_serving(self) -> None:
        """Serve the ``current`` slot (load it if it is not what is served); stop serving when there is none."""
        current = self.slots.current()
        if current == self._serving:
            return
        if current is None:
            self.runtime.stop_serving()
            self._serving = None
            return
        if self._active_crashed:
            return  # the plan rolls back first; never reload a version that just took the process down
        atomic_write(self.data.marker_file, json.dumps({"digest": current, "run": self._run_id}).encode(), 0o600)
        on_probation = not self.state.committed
        if on_probation:
            _pause("before_serve")
        try:
            self.runtime.serve(self.slots.model_file(current), self.slots.manifest(current), self._runtime_config())
        except SLMOpsError as exc:
            self.state.health_failures = self.config.policy.max_health_failures
            self.state.health = "failing"
            self._note_error(f"serving {_short(current)} failed: {exc}")
            return
        self._serving = current
        if current != self._fresh:
            self._count(current, restarts=1)  # served again without a switch: an agent or runtime restart
        self._fresh = None
        self.state.health = "ok"
        self._save()
        self._event("serving", current, url=self.runtime.url)
        if on_probation:
            _pause("after_serve")

    def _check_health(self) -> None:
        if self._serving is None:
            return
        now = self._clock()
        if now - self._last_health_at < self.config.health_interval_s:
            return
        self._last_health_at = now
        record = self.runtime.check()
        if record.ok:
            if self.state.health_failures or self.state.health != "ok":
                self.state.health_failures, self.state.health = 0, "ok"
                self._save()
            return
        self.state.health_failures += 1
        failing = self.state.health_failures >= self.config.policy.max_health_failures
        self.state.health = "failing" if failing else "degraded"
        self._save()
        self._event("health_check_failed", self._serving, reason=record.reason, consecutive=self.state.health_failures)

    # ----------------------------------------------------------------------------------------------- reporting

    def status_report(self) -> StatusReport:
        state = self.state
        return StatusReport(
            phase=state.phase,
            health=state.health,
            active_digest=self.slots.current(),
            previous_digest=self.slots.previous(),
            desired_generation=state.desired.generation if state.desired else None,
            last_error=state.last_error,
            capabilities=self._capabilities or self.capabilities(),
            agent_version=__version__,
            events=self.outbox.pending(),
        )

    def report(self, force: bool = False) -> bool:
        """Send status and buffered events when something changed or a heartbeat is due; returns whether sent."""
        identity = self.identities.identity()
        if identity is None or not self.identities.credential():
            return False
        report = self.status_report()
        fingerprint = (
            report.phase,
            report.health,
            report.active_digest,
            report.previous_digest,
            report.desired_generation,
            report.last_error,
        )
        due = self._clock() - self._last_report_at >= self.config.heartbeat_interval_s
        if not (force or report.events or due or fingerprint != self._last_report):
            return False
        try:
            ack = self._require_client().post_status(identity.device_id, report)
        except UnavailableError as exc:
            if self._offline_since is None:
                self._offline_since = self._clock()
                self._event("control_plane_unreachable", None, reason=str(exc)[:300])
            return False
        except SLMOpsError as exc:
            self._note_error(f"the status report was refused: {exc}")
            return False
        self.outbox.acknowledge(ack.accepted_event_ids)
        self._last_report, self._last_report_at = fingerprint, self._clock()
        if self.outbox.pending(limit=1):
            return self.report(force=True)  # more events than one report holds
        return True

    # ----------------------------------------------------------------------------------------------- telemetry

    def _count(self, digest: str | None, *, crashes: int = 0, restarts: int = 0, rollbacks: int = 0) -> None:
        old = self._counters.get(digest, WindowCounters())
        self._counters[digest] = WindowCounters(
            crashes=old.crashes + crashes, restarts=old.restarts + restarts, rollbacks=old.rollbacks + rollbacks
        )

    def _digest_of(self) -> dict[str, str]:
        """Local API model ids (``name@version``, as :class:`LlamaRuntime` names them) to version digests."""
        mapping: dict[str, str] = {}
        for digest in {self.slots.current(), self.slots.previous(), self._serving}:
            if digest is None:
                continue
            with contextlib.suppress(SLMOpsError, OSError):
                manifest = self.slots.manifest(digest).manifest
                mapping[f"{manifest.name}@{manifest.version}"] = digest
        return mapping

    def close_window(self, *, force: bool = False) -> list[TelemetryWindow]:
        """When the window is over (or ``force``), turn the local API's counters and the agent's own into one window
        per version and buffer them on disk. Numbers only: the runtime's stats hold no text."""
        now = self._clock()
        elapsed = now - self._window_started
        if not force and elapsed < self.config.telemetry_window_s:
            return []
        stats: RequestStats | None = getattr(self.runtime, "stats", None)
        models = stats.take().models if stats is not None else {}
        if not models and not self._counters and self._serving is None:
            self._window_started = now
            return []
        identity = self.identities.identity()
        windows = windows_from_stats(
            device_key=identity.device_id if identity else self._run_id,
            window_start=datetime.fromtimestamp(self._window_started, UTC),
            window_s=min(86400.0, max(elapsed, 0.001)),
            models=models,
            digest_of=self._digest_of(),
            counters=self._counters,
            serving=self._serving,
            memory_rss_bytes=_rss_bytes(),
        )
        dropped = self.telemetry.add(windows)
        if dropped:
            self._event("telemetry_dropped", None, count=dropped, reason="the on-disk telemetry buffer was full")
        self._counters = {}
        self._window_started = now
        return windows

    def flush_telemetry(self) -> int:
        """Close the window if it is over, then send buffered windows in batches; drop only acknowledged ids.
        Returns how many were acknowledged. Offline, everything stays buffered (bounded) for the next try."""
        self.close_window()
        identity = self.identities.identity()
        if identity is None or not self.identities.credential():
            return 0
        client = self._require_client()
        sent = 0
        while windows := self.telemetry.pending(MAX_WINDOWS_PER_BATCH):
            try:
                ack = client.post_telemetry(identity.device_id, TelemetryBatch(windows=windows))
            except UnavailableError:
                return sent
            except SLMOpsError as exc:
                log.warning("telemetry was refused: %s", exc)
                return sent
            removed = self.telemetry.acknowledge(ack.accepted_ids)
            sent += removed
            if removed == 0:
                return sent  # the server accepted none of them: try again at the next poll
        return sent


def _rss_bytes() -> int | None:
    """The process's resident memory now (Linux), which holds the loaded model; None where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def local_status(data_dir: Path) -> dict[str, Any]:
    """What ``slmops agent status`` shows, read without taking the agent's lock."""
    data = DataDir(data_dir)
    if not data.root.is_dir():
        raise ConfigError(f"no agent data directory at {data_dir}; pass --data-dir or start the agent first")
    identity = IdentityStore(data).identity()
    state = StateStore(data.state_file).load()
    slots = Slots(data.slot_dir, DirectoryBlobStore(data.blob_dir))
    events, size = (0, 0)
    if data.outbox_file.exists():
        outbox = Outbox(data.outbox_file).open()
        try:
            events, size = outbox.size()
        finally:
            outbox.close()

    def label(digest: str | None) -> str | None:
        if digest is None:
            return None
        with contextlib.suppress(SLMOpsError):
            manifest = slots.manifest(digest).manifest
            return f"{manifest.name}@{manifest.version}"
        return None

    active, previous = slots.current(), slots.previous()
    return {
        "data_dir": str(data.root),
        "device_id": identity.device_id if identity else None,
        "server": identity.server_url if identity else None,
        "enrollment": identity.state if identity else "not enrolled",
        "active": active,
        "active_version": label(active),
        "previous": previous,
        "previous_version": label(previous),
        "committed": state.committed,
        "phase": state.phase,
        "health": state.health,
        "last_error": state.last_error,
        "desired_generation": state.desired.generation if state.desired else None,
        "failed": state.failed,
        "crash_counts": state.crash_counts,
        "outbox_events": events,
        "outbox_bytes": size,
    }
