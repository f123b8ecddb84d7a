"""The A/B slot switch and what the agent serves: activation, probation, commit, rollback, crash recovery, health.

- *activate*: ``switching_from/to`` is persisted, then ``previous`` and ``current`` are swapped atomically, then the
  version starts its probation; ``serving.marker`` is written before the model is loaded. A marker found at start-up
  means the process died while serving: during probation that is a crash of the version (counted, persisted).
- *commit*: probation passed; the marker is cleared and old slots are removed.
- *rollback*: ``current`` goes back to ``previous``, with a ``rolled_back`` event that says why.

The decisions (when to commit, when to roll back) are :func:`slmops.core.reconcile.plan`'s; this module carries
them out on disk and in the runtime.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from slmops.agent._context import AgentContext
from slmops.agent._files import atomic_write
from slmops.agent._pause import pause
from slmops.agent.reporting import Reporter
from slmops.core.reconcile import Step, short_digest
from slmops.errors import SLMOpsError

__all__ = ["SlotSwitch"]


class SlotSwitch:
    """Switches the ``current`` slot and keeps the runtime serving it; counts crashes, restarts and rollbacks."""

    def __init__(self, ctx: AgentContext, reporter: Reporter) -> None:
        self._ctx = ctx
        self._reporter = reporter
        self.serving: str | None = None  # the version the runtime serves now
        self.active_crashed = False  # the last run died serving the active version during its probation
        self._fresh: str | None = None  # a version just activated or restored: serving it is no restart
        self._last_health_at = 0.0

    # ----------------------------------------------------------------------------------------------- recovery

    def recover(self) -> None:
        """Make ``state.json`` agree with the slots on disk, and count a crash if the last run died serving."""
        ctx = self._ctx
        state = ctx.state
        disk = ctx.slots.current()
        now = ctx.clock()
        if disk != state.active:
            if disk is not None and disk == state.switching_to:
                # the switch happened, the state write after it did not: the version starts its probation now
                state.committed = False
                state.probation_until = now + ctx.config.probation_s
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
                    self.active_crashed = True
                self._reporter.count(digest if isinstance(digest, str) else None, crashes=1)
                ctx.event(
                    "crash",
                    digest if isinstance(digest, str) else None,
                    during_probation=in_probation,
                    crashes=state.crash_counts.get(str(digest), 0),
                    reason="the agent process ended while serving this version without a clean stop",
                )
        state.step = None
        state.phase = "starting"
        ctx.save()
        self.clear_marker()
        ctx.slots.gc(self._keep())

    def _read_marker(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self._ctx.data.marker_file.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {"digest": None, "run": None}
        return value if isinstance(value, dict) else None

    def clear_marker(self) -> None:
        """Remove ``serving.marker``: nothing that runs now counts as a crash at the next start."""
        with contextlib.suppress(FileNotFoundError):
            self._ctx.data.marker_file.unlink()

    def _keep(self) -> set[str]:
        ctx = self._ctx
        keep = {d for d in (ctx.slots.current(), ctx.slots.previous()) if d is not None}
        if ctx.state.desired is not None and ctx.state.desired.model is not None:
            keep.add(ctx.state.desired.model.digest)
        return keep

    # ----------------------------------------------------------------------------------------------- the switch

    def activate(self, digest: str) -> None:
        """Make the staged, probed ``digest`` current (the old one previous), start its probation, serve it."""
        ctx, state = self._ctx, self._ctx.state
        old = ctx.slots.current()
        state.switching_from, state.switching_to = old, digest
        ctx.save()
        pause("before_switch")
        if old is not None:
            ctx.slots.set_previous(old)
            pause("after_previous_link")
        ctx.slots.switch(digest)
        pause("after_switch")
        state.active = digest
        state.committed = False
        state.probation_until = ctx.clock() + ctx.config.probation_s
        state.health_failures = 0
        state.switching_from = state.switching_to = None
        self.active_crashed = False
        ctx.save()
        ctx.capabilities = None  # the probe speed of the new active version
        ctx.event("activated", digest, previous=old, probation_s=ctx.config.probation_s)
        self._fresh = digest
        self.ensure_serving()

    def commit(self, digest: str | None) -> None:
        """End the probation of the active version: it stays, and slots nothing needs any more go."""
        ctx = self._ctx
        pause("before_commit")
        ctx.state.committed = True
        ctx.state.probation_until = None
        ctx.save()
        self.clear_marker()
        removed = ctx.slots.gc(self._keep())
        ctx.event("committed", digest, removed_slots=len(removed))

    def rollback(self, step: Step) -> None:
        """Go back to the previous slot (marking the version failed when ``step`` says so), and serve it."""
        ctx, state = self._ctx, self._ctx.state
        digest = str(step.digest)
        if step.mark_failed:
            state.failed[digest] = step.reason
            ctx.save()
        pause("before_rollback")
        restored = ctx.slots.rollback()
        pause("after_rollback")
        state.active = restored
        state.committed = True
        state.probation_until = None
        state.health_failures = 0
        self.active_crashed = False
        ctx.capabilities = None
        ctx.save()
        ctx.event("rolled_back", digest, to=restored, reason=step.reason, marked_failed=step.mark_failed)
        self._reporter.count(digest, rollbacks=1)
        self._fresh = restored
        self.ensure_serving()

    # ----------------------------------------------------------------------------------------------- serving

    def ensure_serving(self) -> None:
        """Serve the ``current`` slot (load it if it is not what is served); stop serving when there is none."""
        ctx = self._ctx
        current = ctx.slots.current()
        if current == self.serving:
            return
        if current is None:
            ctx.runtime.stop_serving()
            self.serving = None
            return
        if self.active_crashed:
            return  # the plan rolls back first; never reload a version that just took the process down
        atomic_write(ctx.data.marker_file, json.dumps({"digest": current, "run": ctx.run_id}).encode(), 0o600)
        on_probation = not ctx.state.committed
        if on_probation:
            pause("before_serve")
        try:
            ctx.runtime.serve(
                ctx.slots.model_file(current),
                ctx.slots.manifest(current),
                ctx.runtime_config(),
                adapter_file=ctx.slots.adapter_file(current),
            )
        except SLMOpsError as exc:
            ctx.state.health_failures = ctx.config.policy.max_health_failures
            ctx.state.health = "failing"
            ctx.note_error(f"serving {short_digest(current)} failed: {exc}")
            return
        self.serving = current
        if current != self._fresh:
            self._reporter.count(current, restarts=1)  # served again without a switch: an agent or runtime restart
        self._fresh = None
        ctx.state.health = "ok"
        ctx.save()
        ctx.event("serving", current, url=ctx.runtime.url)
        if on_probation:
            pause("after_serve")

    def check_health(self) -> None:
        """Check the served model every ``health_interval_s``; count consecutive failures into the state."""
        ctx, state = self._ctx, self._ctx.state
        if self.serving is None:
            return
        now = ctx.clock()
        if now - self._last_health_at < ctx.config.health_interval_s:
            return
        self._last_health_at = now
        record = ctx.runtime.check()
        if record.ok:
            if state.health_failures or state.health != "ok":
                state.health_failures, state.health = 0, "ok"
                ctx.save()
            return
        state.health_failures += 1
        failing = state.health_failures >= ctx.config.policy.max_health_failures
        state.health = "failing" if failing else "degraded"
        ctx.save()
        ctx.event("health_check_failed", self.serving, reason=record.reason, consecutive=state.health_failures)
