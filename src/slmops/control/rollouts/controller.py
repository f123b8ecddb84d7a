"""The rollout controller: the loop in the server that moves releases.

Each tick it takes or renews the ``rollout-controller`` lease (only the replica holding it acts, so several replicas
are safe), and for each running or paused release records the cohort of the current stage, gathers the evidence,
asks :func:`slmops.core.rollout.evaluate_stage` and acts: promote, hold (an event when the reason changes) or halt.
Each tick is idempotent and uses only database state, so a restarted or replaced controller resumes where the last
one stopped. A decision is written by one conditional UPDATE on the release's ``revision`` that also requires the
lease to be still held by this replica (a fence), with its event in the same transaction: a replica that lost the
lease while it evaluated, or raced another, writes nothing, so no promotion or halt is taken twice or lost.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from slmops.control.db import ACTIVE_RELEASE_STATES
from slmops.control.lease import acquire_lease, holds, release_lease
from slmops.control.repository import ControlRepository
from slmops.control.rollouts._rows import record_event, require_release
from slmops.control.rollouts.cohort import Winners, sync_members
from slmops.control.rollouts.evidence import Accumulator, AccumulatorKey, gather_evidence, progress
from slmops.control.rollouts.releases import advance, commit_guarded
from slmops.core.rollout import RolloutPolicy, evaluate_stage

if TYPE_CHECKING:
    import httpx

    from slmops.control.alerting import AlertingJob
    from slmops.control.plane import ControlPlane

__all__ = ["CONTROLLER_LEASE", "RolloutController"]

log = logging.getLogger(__name__)

CONTROLLER_LEASE = "rollout-controller"


class RolloutController:
    """The loop that moves releases. ``tick()`` is one idempotent pass; ``start()`` runs it in a thread."""

    def __init__(self, plane: ControlPlane, holder: str | None = None) -> None:
        self.plane = plane
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holds_lease = False
        self._winners = Winners()
        self._accumulators: dict[AccumulatorKey, Accumulator] = {}
        self.ticks = 0  # ticks run by this replica (with or without the lease), for /metrics
        self.last_tick_at: float | None = None  # epoch seconds of the last tick
        self._alerting: AlertingJob | None = None  # the alert rules of settings.alert_rules_file, once loaded
        self._alerting_loaded = False
        self._webhook_client: httpx.Client | None = None

    def tick(self) -> list[str]:
        """Evaluate every running or paused release once (if this replica holds the lease); their ids."""
        settings = self.plane.settings
        now = self.plane.now_epoch()
        self.ticks += 1
        self.last_tick_at = now
        self.holds_lease = acquire_lease(
            self.plane.engine, CONTROLLER_LEASE, self.holder, settings.rollout_lease_s, now
        )
        if not self.holds_lease:
            return []
        with Session(self.plane.engine) as session:
            ids = [row.id for row in ControlRepository(session).active_releases()]
        for release_id in ids:
            try:
                self.step(release_id)
            except Exception:
                log.exception("rollout controller: release %s could not be evaluated; it stays as it is", release_id)
        for key in [k for k in self._accumulators if k[0] not in ids]:
            del self._accumulators[key]  # finished releases
        self._run_alerting()
        return ids

    # -------------------------------------------------------------- alerts

    def load_alerting(self) -> None:
        """Load the alert rules of ``settings.alert_rules_file`` once; a bad file raises
        :class:`~slmops.errors.ConfigError` (``start()`` calls this, so the server fails at startup)."""
        if self._alerting_loaded or self.plane.settings.alert_rules_file is None:
            return
        import httpx

        from slmops.control.alerting import AlertingJob

        client = httpx.Client()
        try:
            self._alerting = AlertingJob.load(self.plane.settings, os.environ, client)
        except Exception:
            client.close()
            raise
        self._alerting_loaded = True
        self._webhook_client = client

    def _run_alerting(self) -> None:
        """Evaluate the alert rules and deliver what is due; a failure is logged, never breaks the rollouts."""
        if self.plane.settings.alert_rules_file is None:
            return
        try:
            self.load_alerting()
            if self._alerting is not None:
                self._alerting.run(self.plane)
        except Exception:
            log.exception("alerting failed this tick; the rollouts go on, alerts are evaluated again next tick")

    def step(self, release_id: str) -> None:
        """Record the stage's cohort, judge the stage on its evidence, and promote, hold or halt the release."""
        plane = self.plane
        sync_members(plane, release_id, self._winners)
        with Session(plane.engine) as session:
            row = require_release(session, release_id)
            if row.state not in ACTIVE_RELEASE_STATES:
                return
            revision, state_before, stage_before = row.revision, row.state, row.stage_index
            policy = RolloutPolicy.model_validate(row.policy)
            now = plane.now_epoch()
            evidence = gather_evidence(plane, session, row, winners=self._winners, accumulators=self._accumulators)
            evaluation = evaluate_stage(policy, row.stage_index, now - row.stage_started_at, evidence)
            numbers = evaluation.numbers()
            previous_key = (row.evaluation or {}).get("key")
            key = [row.state, row.stage_index, evaluation.decision] + [
                [c.device_class, c.status] for c in evaluation.classes
            ]
            row.evaluation = {"key": key, "classes": progress(evidence, evaluation), "reason": evaluation.reason}
            row.evaluated_at = now
            if evaluation.decision == "halt":
                row.state, row.finished_at = "halted", now
                row.reason = f"halted and rolled back: {evaluation.reason}"
                record_event(session, row, "halted", "controller", row.reason, numbers, now)
            elif evaluation.decision == "promote" and row.state == "running":
                advance(session, row, now, "controller", evaluation.reason, numbers)
            else:
                if row.state == "running":
                    row.reason = evaluation.reason
                if key != previous_key:
                    record_event(session, row, "hold", "controller", evaluation.reason, numbers, now)
            changed = row.state != state_before or row.stage_index != stage_before
            fence = holds(CONTROLLER_LEASE, self.holder, plane.now_epoch())
            if not commit_guarded(session, row, revision, now, fence):
                # An operator or another controller changed it meanwhile, or this replica lost the lease while it
                # evaluated: nothing was written (no decision twice); the holder's next tick sees the new state.
                return
        if changed:
            plane.world_cache.invalidate()
            sync_members(plane, release_id, self._winners)
            log.info("release %s: %s", release_id, row.reason)

    # -------------------------------------------------------------- the loop

    def start(self) -> None:
        self.load_alerting()
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.plane.settings.rollout_tick_s
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("rollout controller tick failed; retrying in %.1f s", interval)
            self._stop.wait(interval)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._webhook_client is not None:
            self._webhook_client.close()
        if self.holds_lease:
            try:
                release_lease(self.plane.engine, CONTROLLER_LEASE, self.holder)
            except Exception:  # the lease then simply expires
                log.warning("could not hand back the rollout controller lease; it expires by itself")
