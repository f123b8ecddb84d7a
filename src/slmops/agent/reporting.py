"""What the agent tells the control plane: status reports with the buffered events, and telemetry windows.

A status report goes out when something in it changed, when events wait, or when a heartbeat is due; the events it
carries leave the outbox only once the server's acknowledgement names them. Telemetry is counted per version in
windows of ``telemetry_window_s``: the local API's request stats plus the agent's own counters (crashes, restarts,
rollbacks), buffered on disk and sent in batches whose acknowledged ids alone are dropped. Each window also carries
the drift summary of the requests it counts (token-count histograms, finish reasons, empty outputs, the prompt NLL
of the sampled requests; see :mod:`slmops.telemetry.drift`), built from the runtime's per-request numbers. Numbers
only, never text.

When the desired state's ``privacy.dp`` is set, each closed window gets differential-privacy noise
(:func:`slmops.feedback.dp.privatize_window`) and spends ``epsilon_per_window`` from the device's daily budget
(:class:`slmops.agent.privacy.PrivacyBudget`). Once the day's budget is spent, windows carry no aggregates, only
liveness (:func:`liveness_window`: the window's id, version and times, the agent's own crash/restart/rollback
counts and its memory peak), and one ``privacy_budget_exhausted`` event per day says so. Without ``privacy.dp``
the windows are exact.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops import __version__
from slmops.agent._context import AgentContext
from slmops.agent.outbox import TelemetryOutbox
from slmops.agent.privacy import PrivacyBudget
from slmops.core.feedback import DifferentialPrivacy
from slmops.core.wire import MAX_WINDOWS_PER_BATCH, StatusReport, TelemetryBatch, TelemetryWindow
from slmops.errors import SLMOpsError, UnavailableError
from slmops.telemetry.aggregate import WindowCounters, windows_from_stats

if TYPE_CHECKING:
    from slmops.runtime.stats import RequestStats

__all__ = ["Reporter", "liveness_window"]

log = logging.getLogger(__name__)


def _rss_bytes() -> int | None:
    """The process's resident memory now (Linux), which holds the loaded model; None where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def liveness_window(window: TelemetryWindow) -> TelemetryWindow:
    """What a window says once the privacy budget is spent: that the device and version were alive for the window,
    with the agent's own process events (crashes, restarts, rollbacks) and memory peak; no request aggregates."""
    return TelemetryWindow(
        id=window.id,
        version_digest=window.version_digest,
        window_start=window.window_start,
        window_s=window.window_s,
        crashes=window.crashes,
        restarts=window.restarts,
        rollbacks=window.rollbacks,
        memory_rss_bytes=window.memory_rss_bytes,
    )


class Reporter:
    """Status reports and telemetry of one agent. ``open()`` starts the first telemetry window."""

    def __init__(self, ctx: AgentContext, telemetry: TelemetryOutbox) -> None:
        self._ctx = ctx
        self.telemetry = telemetry
        self._window_started = ctx.clock()
        self._counters: dict[str | None, WindowCounters] = {}  # crashes, restarts, rollbacks in the open window
        self._last_report: tuple[Any, ...] | None = None
        self._last_report_at = 0.0
        self.privacy = PrivacyBudget.in_dir(ctx.data.root)

    def open(self) -> None:
        self.telemetry.open()
        self.privacy.open()
        self._window_started = self._ctx.clock()

    # ----------------------------------------------------------------------------------------------- status

    def status_report(self) -> StatusReport:
        ctx, state = self._ctx, self._ctx.state
        return StatusReport(
            phase=state.phase,
            health=state.health,
            active_digest=ctx.slots.current(),
            previous_digest=ctx.slots.previous(),
            desired_generation=state.desired.generation if state.desired else None,
            last_error=state.last_error,
            capabilities=ctx.capabilities or ctx.measure_capabilities(),
            agent_version=__version__,
            events=ctx.outbox.pending(),
        )

    def report(self, force: bool = False) -> bool:
        """Send status and buffered events when something changed or a heartbeat is due; returns whether sent."""
        ctx = self._ctx
        identity = ctx.identities.identity()
        if identity is None or not ctx.identities.credential():
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
        due = ctx.clock() - self._last_report_at >= ctx.config.heartbeat_interval_s
        if not (force or report.events or due or fingerprint != self._last_report):
            return False
        try:
            ack = ctx.require_client().post_status(identity.device_id, report)
        except UnavailableError as exc:
            ctx.note_unreachable(exc)
            return False
        except SLMOpsError as exc:
            ctx.note_error(f"the status report was refused: {exc}")
            return False
        ctx.outbox.acknowledge(ack.accepted_event_ids)
        self._last_report, self._last_report_at = fingerprint, ctx.clock()
        if ctx.outbox.pending(limit=1):
            return self.report(force=True)  # more events than one report holds
        return True

    # ----------------------------------------------------------------------------------------------- telemetry

    def count(self, digest: str | None, *, crashes: int = 0, restarts: int = 0, rollbacks: int = 0) -> None:
        """Add to the agent's own counters of ``digest`` in the open window."""
        old = self._counters.get(digest, WindowCounters())
        self._counters[digest] = WindowCounters(
            crashes=old.crashes + crashes, restarts=old.restarts + restarts, rollbacks=old.rollbacks + rollbacks
        )

    def _digest_of(self, serving: str | None) -> dict[str, str]:
        """Local API model ids (``name@version``, as :class:`LlamaRuntime` names them) to version digests."""
        slots = self._ctx.slots
        mapping: dict[str, str] = {}
        for digest in {slots.current(), slots.previous(), serving}:
            if digest is None:
                continue
            with contextlib.suppress(SLMOpsError, OSError):
                manifest = slots.manifest(digest).manifest
                mapping[f"{manifest.name}@{manifest.version}"] = digest
        return mapping

    def close_window(self, serving: str | None, *, force: bool = False) -> list[TelemetryWindow]:
        """When the window is over (or ``force``), turn the local API's counters and the agent's own into one window
        per version (``serving``: the version served now) and buffer them on disk. Numbers only: the runtime's stats
        hold no text."""
        ctx = self._ctx
        now = ctx.clock()
        elapsed = now - self._window_started
        if not force and elapsed < ctx.config.telemetry_window_s:
            return []
        stats: RequestStats | None = getattr(ctx.runtime, "stats", None)
        models = stats.take().models if stats is not None else {}
        if not models and not self._counters and serving is None:
            self._window_started = now
            return []
        identity = ctx.identities.identity()
        windows = windows_from_stats(
            device_key=identity.device_id if identity else ctx.run_id,
            window_start=datetime.fromtimestamp(self._window_started, UTC),
            window_s=min(86400.0, max(elapsed, 0.001)),
            models=models,
            digest_of=self._digest_of(serving),
            counters=self._counters,
            serving=serving,
            memory_rss_bytes=_rss_bytes(),
        )
        desired = ctx.state.desired
        if desired is not None and desired.privacy.dp is not None:
            windows = self._privatize(windows, desired.privacy.dp, now)
        dropped = self.telemetry.add(windows)
        if dropped:
            ctx.event("telemetry_dropped", None, count=dropped, reason="the on-disk telemetry buffer was full")
        self._counters = {}
        self._window_started = now
        return windows

    def _privatize(self, windows: list[TelemetryWindow], dp: DifferentialPrivacy, now: float) -> list[TelemetryWindow]:
        """Noisy windows when today's budget covers one more close (spent once: the windows count disjoint
        requests), else liveness only. The budget is persisted before anything noisy exists."""
        from slmops.feedback.dp import privatize_window

        if not windows:
            return windows
        if self.privacy.try_spend(dp.epsilon_per_window, epsilon_per_day=dp.epsilon_per_day, now=now):
            return [privatize_window(w, dp.epsilon_per_window) for w in windows]
        if self.privacy.note_exhausted(now):
            today = self.privacy.today(now)
            self._ctx.event(
                "privacy_budget_exhausted",
                None,
                day=today.day,
                epsilon_spent=today.spent,
                epsilon_per_day=dp.epsilon_per_day,
                reason="telemetry windows carry no aggregates until the next UTC day",
            )
        return [liveness_window(w) for w in windows]

    def flush_telemetry(self, serving: str | None) -> int:
        """Close the window if it is over, then send buffered windows in batches; drop only acknowledged ids.
        Returns how many were acknowledged. Offline, everything stays buffered (bounded) for the next try."""
        ctx = self._ctx
        self.close_window(serving)
        identity = ctx.identities.identity()
        if identity is None or not ctx.identities.credential():
            return 0
        client = ctx.require_client()
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
