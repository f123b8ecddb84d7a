"""Alerts on the control plane: facts from the database, the pure :func:`slmops.telemetry.alerts.evaluate`, the
alerts' states and an outbox of webhook deliveries.

The rollout controller (on the replica holding the lease) calls :func:`evaluate_alerts` and then
:func:`deliver_pending` every tick. Evaluation stores the new states and enqueues each transition for each webhook
its rule routes it to in one unit of work, so a transition is never stored without its deliveries nor delivered
without being stored. Delivery reads due rows of the outbox, sends them, and records the attempts: a delivery
leaves the pending set only when a receiver accepted it (2xx) or refused it for good (another 4xx); a failure
worth retrying is tried again after a full-jitter backoff, across restarts, without end. Receivers drop repeats by
the ``Idempotency-Key`` (the transition's id).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx
from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from slmops.control.alert_tables import AlertDeliveryRow, AlertRow
from slmops.control.db import DeviceRow, ReleaseRow, TelemetryWindowRow
from slmops.control.repository import UNVERSIONED, iso, parse_iso, version_labels
from slmops.errors import ConfigError
from slmops.telemetry.alert_rules import AlertConfig, Severity, load_alert_config
from slmops.telemetry.alerts import (
    AlertState,
    AlertStatus,
    DeviceFact,
    ErrorRateFact,
    Facts,
    ReleaseFact,
    Transition,
    evaluate,
)
from slmops.telemetry.webhooks import WebhookSender, WebhookTarget, payload, route, targets_from_env

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane
    from slmops.control.settings import ServerSettings

__all__ = [
    "ERROR_RATE_WINDOW_S",
    "AlertDeliveryPublic",
    "AlertPublic",
    "AlertingJob",
    "DeliveryReport",
    "deliver_pending",
    "evaluate_alerts",
    "gather_facts",
    "list_alerts",
]

log = logging.getLogger(__name__)

ERROR_RATE_WINDOW_S = 900.0  # error rates count the telemetry windows that started this recently
DELIVERIES_PER_CALL = 100  # due outbox rows sent by one deliver_pending call (the rest wait for the next)


# ------------------------------------------------------------------ facts


def _devices(session: Session) -> list[DeviceFact]:
    rows = session.execute(
        select(DeviceRow.id, DeviceRow.device_class, DeviceRow.last_seen, DeviceRow.health).where(
            DeviceRow.state == "approved"
        )
    )
    return [
        DeviceFact(device_id, cls, parse_iso(seen) if seen else None, health or "unknown")
        for device_id, cls, seen, health in rows
    ]


def _releases(session: Session) -> list[ReleaseFact]:
    """The latest release of each blueprint, when it is halted: a newer release of the blueprint supersedes it."""
    latest: dict[str, ReleaseRow] = {}
    for row in session.scalars(select(ReleaseRow).order_by(ReleaseRow.started_at, ReleaseRow.id)):
        latest[row.blueprint] = row
    return [ReleaseFact(row.id, row.state, row.reason) for row in latest.values() if row.state == "halted"]


def _error_rates(session: Session, now: datetime, window_s: float) -> list[ErrorRateFact]:
    rows = session.execute(
        select(TelemetryWindowRow.version_digest, TelemetryWindowRow.device_class, TelemetryWindowRow.body).where(
            TelemetryWindowRow.window_start >= iso(now - timedelta(seconds=window_s)),
            TelemetryWindowRow.window_start <= iso(now),
        )
    ).all()
    sums: dict[tuple[str | None, str], list[int]] = {}
    for digest, cls, body in rows:
        counts = sums.setdefault((digest, cls), [0, 0])
        counts[0] += int(body.get("requests", 0))
        counts[1] += int(body.get("errors", 0))
    labels = version_labels(session, (digest for digest, _ in sums))
    return [
        ErrorRateFact(labels.get(digest or "", UNVERSIONED), cls, requests, errors)
        for (digest, cls), (requests, errors) in sorted(sums.items(), key=lambda item: (item[0][0] or "", item[0][1]))
    ]


def gather_facts(plane: ControlPlane, now: datetime, *, error_window_s: float = ERROR_RATE_WINDOW_S) -> Facts:
    """What the rules look at: approved devices, halted releases, error rates of each (version, class) over the
    last ``error_window_s`` of telemetry, and drift verdicts."""
    from slmops.control.drift import drift_facts

    with Session(plane.engine) as session:
        devices = _devices(session)
        releases = _releases(session)
        error_rates = _error_rates(session, now, error_window_s)
    return Facts(now=now, devices=devices, releases=releases, error_rates=error_rates, drift=drift_facts(plane, now))


# ------------------------------------------------------------------ states


def _time(text: str | None) -> datetime | None:
    return parse_iso(text) if text else None


def _state(row: AlertRow) -> AlertState:
    return AlertState(
        fingerprint=row.fingerprint,
        rule=row.rule,
        labels={str(k): str(v) for k, v in row.labels.items()},
        severity=cast(Severity, row.severity),
        status=cast(AlertStatus, row.status),
        active_since=parse_iso(row.active_since),
        fired_at=_time(row.fired_at),
        resolved_at=_time(row.resolved_at),
        value=row.value,
        summary=row.summary,
    )


def _store(row: AlertRow, state: AlertState, now: str) -> None:
    changed = _state(row) != state if row.fingerprint else True
    row.fingerprint = state.fingerprint
    row.rule = state.rule
    row.labels = dict(state.labels)
    row.severity = state.severity
    row.status = state.status
    row.active_since = iso(state.active_since)
    row.fired_at = iso(state.fired_at) if state.fired_at else None
    row.resolved_at = iso(state.resolved_at) if state.resolved_at else None
    row.value = state.value
    row.summary = state.summary
    if changed or not row.updated_at:
        row.updated_at = now


def evaluate_alerts(plane: ControlPlane, config: AlertConfig, now: datetime) -> list[Transition]:
    """Evaluate the rules on the facts at ``now``; store the states and enqueue the transitions' deliveries in one
    unit of work. Returns the transitions (firing, then resolved)."""
    facts = gather_facts(plane, now)
    with Session(plane.engine) as session:
        rows = {row.fingerprint: row for row in session.scalars(select(AlertRow))}
        evaluation = evaluate(
            config.rules,
            facts,
            {fp: _state(row) for fp, row in rows.items()},
            resolved_retention_s=config.resolved_retention_s,
        )
        stamp = iso(now)
        for fp, state in evaluation.states.items():
            row = rows.get(fp)
            if row is None:
                row = AlertRow(fingerprint="", updated_at="")
                _store(row, state, stamp)
                session.add(row)
            else:
                _store(row, state, stamp)
        gone = [fp for fp in rows if fp not in evaluation.states]
        for fp in gone:
            session.delete(rows[fp])  # a pending alert whose condition stopped, or a resolved one past retention
        if gone:  # its finished deliveries go with it; pending ones stay until a receiver takes them
            session.execute(
                delete(AlertDeliveryRow).where(
                    AlertDeliveryRow.fingerprint.in_(gone), AlertDeliveryRow.status != "pending"
                )
            )
        for delivery in route(evaluation.transitions, config.rules, config.webhooks):
            key = (delivery.transition.id, delivery.webhook)
            if session.get(AlertDeliveryRow, key) is not None:
                continue  # the same episode's transition enqueued before
            session.add(
                AlertDeliveryRow(
                    transition_id=delivery.transition.id,
                    webhook=delivery.webhook,
                    fingerprint=delivery.transition.alert.fingerprint,
                    kind=delivery.transition.kind,
                    payload=payload(delivery.transition).decode(),
                    status="pending",
                    attempts=0,
                    created_at=stamp,
                    next_attempt_at=stamp,
                )
            )
        session.commit()
    for transition in evaluation.transitions:
        log.info("alert %s %s: %s", transition.alert.rule, transition.kind, transition.alert.summary)
    return evaluation.transitions


# ------------------------------------------------------------------ delivery


def _transition(body: Mapping[str, Any]) -> Transition:
    """The transition a stored payload was made from (so the sender signs and sends the same bytes)."""
    alert = body["alert"]
    state = AlertState(
        fingerprint=alert["fingerprint"],
        rule=alert["rule"],
        labels=dict(alert["labels"]),
        severity=alert["severity"],
        status=alert["status"],
        active_since=datetime.fromisoformat(alert["active_since"]),
        fired_at=datetime.fromisoformat(alert["fired_at"]) if alert["fired_at"] else None,
        resolved_at=datetime.fromisoformat(alert["resolved_at"]) if alert["resolved_at"] else None,
        value=float(alert["value"]),
        summary=alert["summary"],
    )
    kind = cast(Literal["firing", "resolved"], str(body["type"]).removeprefix("alert."))
    return Transition(body["id"], kind, datetime.fromisoformat(body["at"]), state)


@dataclass(frozen=True)
class DeliveryReport:
    """What one :func:`deliver_pending` call did."""

    delivered: int = 0
    retrying: int = 0  # failed now, due again after a backoff
    refused: int = 0  # refused for good by the receiver (a 4xx other than 408, 425, 429)
    skipped: int = 0  # due, but for a webhook not configured now: left pending


def _backoff_s(target: WebhookTarget, attempts: int, rng: random.Random) -> float:
    """Full jitter: uniform in ``[0, min(backoff_max_s, backoff_base_s * 2**(attempts - 1))]``."""
    spec = target.spec
    ceiling = min(spec.backoff_max_s, spec.backoff_base_s * 2 ** max(0, min(attempts - 1, 30)))
    return rng.uniform(0.0, ceiling)


def deliver_pending(
    plane: ControlPlane,
    sender: WebhookSender,
    targets: Mapping[str, WebhookTarget],
    now: datetime,
    *,
    limit: int = DELIVERIES_PER_CALL,
    rng: random.Random | None = None,
) -> DeliveryReport:
    """Send the outbox rows due at ``now`` (oldest first, at most ``limit``) and record each outcome at once.

    A row for a webhook not in ``targets`` stays pending untouched (its receiver may be configured again). After one
    retryable failure of a webhook, its other due rows wait for the next call: a receiver that is down or slow costs
    one timeout per call, not one per row."""
    rng = rng or random.Random()
    failing: set[str] = set()
    stamp = iso(now)
    delivered = retrying = refused = skipped = 0
    with Session(plane.engine) as session:
        due = session.execute(
            select(AlertDeliveryRow.transition_id, AlertDeliveryRow.webhook)
            .where(AlertDeliveryRow.status == "pending", AlertDeliveryRow.next_attempt_at <= stamp)
            .order_by(AlertDeliveryRow.created_at, AlertDeliveryRow.transition_id, AlertDeliveryRow.webhook)
            .limit(limit)
        ).all()
    for transition_id, webhook in due:
        target = targets.get(webhook)
        if target is None or webhook in failing:
            skipped += 1
            continue
        with Session(plane.engine) as session:
            row = session.get(AlertDeliveryRow, (transition_id, webhook))
            if row is None or row.status != "pending":
                continue
            transition = _transition(json.loads(row.payload))
        result = sender.deliver(target, transition)  # no session held while the network is waited on
        with Session(plane.engine) as session:
            row = session.get(AlertDeliveryRow, (transition_id, webhook))
            if row is None:
                continue
            row.attempts += result.attempts
            if result.delivered:
                row.status, row.delivered_at, row.next_attempt_at, row.last_error = "delivered", stamp, None, None
                delivered += 1
            elif result.retryable:
                wait_s = _backoff_s(target, row.attempts, rng)
                row.next_attempt_at = iso(now + timedelta(seconds=max(1.0, wait_s)))
                row.last_error = result.error
                retrying += 1
                failing.add(webhook)
            else:
                row.status, row.next_attempt_at, row.last_error = "refused", None, result.error
                refused += 1
                log.warning("webhook %s refused transition %s for good: %s", webhook, transition_id, result.error)
            session.commit()
    return DeliveryReport(delivered, retrying, refused, skipped)


# ------------------------------------------------------------------ reading


class AlertDeliveryPublic(BaseModel):
    webhook: str
    transition_id: str  # the Idempotency-Key sent
    kind: Literal["firing", "resolved"]
    status: Literal["pending", "delivered", "refused"]
    attempts: int  # HTTP requests made so far
    created_at: str
    next_attempt_at: str | None
    delivered_at: str | None
    last_error: str | None


class AlertPublic(BaseModel):
    fingerprint: str
    rule: str
    labels: dict[str, str]
    severity: Severity
    status: AlertStatus
    active_since: str  # RFC 3339 UTC: when the condition began to hold (this episode)
    fired_at: str | None
    resolved_at: str | None
    value: float  # the number the condition looked at (offline devices, error rate, PSI, ...)
    summary: str
    updated_at: str
    deliveries: list[AlertDeliveryPublic]  # of this alert's transitions, oldest first


_ORDER = {"firing": 0, "pending": 1, "resolved": 2}
_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def list_alerts(plane: ControlPlane, status: AlertStatus | None = None) -> list[AlertPublic]:
    """Alerts (firing first, then pending, then resolved; the most severe and the oldest first), with their
    deliveries."""
    with Session(plane.engine) as session:
        query = select(AlertRow)
        if status is not None:
            query = query.where(AlertRow.status == status)
        rows = list(session.scalars(query))
        fingerprints = [row.fingerprint for row in rows]
        deliveries: dict[str, list[AlertDeliveryPublic]] = {}
        if fingerprints:
            for d in session.scalars(
                select(AlertDeliveryRow)
                .where(AlertDeliveryRow.fingerprint.in_(fingerprints))
                .order_by(AlertDeliveryRow.created_at, AlertDeliveryRow.kind, AlertDeliveryRow.webhook)
            ):
                deliveries.setdefault(d.fingerprint, []).append(
                    AlertDeliveryPublic(
                        webhook=d.webhook,
                        transition_id=d.transition_id,
                        kind=cast(Literal["firing", "resolved"], d.kind),
                        status=cast(Literal["pending", "delivered", "refused"], d.status),
                        attempts=d.attempts,
                        created_at=d.created_at,
                        next_attempt_at=d.next_attempt_at,
                        delivered_at=d.delivered_at,
                        last_error=d.last_error,
                    )
                )
        found = [
            AlertPublic(
                fingerprint=row.fingerprint,
                rule=row.rule,
                labels={str(k): str(v) for k, v in row.labels.items()},
                severity=cast(Severity, row.severity),
                status=cast(AlertStatus, row.status),
                active_since=row.active_since,
                fired_at=row.fired_at,
                resolved_at=row.resolved_at,
                value=row.value,
                summary=row.summary,
                updated_at=row.updated_at,
                deliveries=deliveries.get(row.fingerprint, []),
            )
            for row in rows
        ]
    found.sort(key=lambda a: (_ORDER[a.status], _SEVERITY_ORDER[a.severity], a.active_since, a.fingerprint))
    return found


# ------------------------------------------------------------------ the controller's job


class AlertingJob:
    """What the rollout controller runs each tick: evaluate the rules, then send what is due.

    The controller's sender makes one HTTP attempt per delivery per tick (its thread also moves releases, so it
    never sleeps through a receiver's backoff); the outbox spaces the next attempts with full jitter."""

    def __init__(self, config: AlertConfig, targets: Mapping[str, WebhookTarget], sender: WebhookSender) -> None:
        self.config = config
        self.targets = targets
        self.sender = sender

    @classmethod
    def load(cls, settings: ServerSettings, environ: Mapping[str, str], client: httpx.Client) -> AlertingJob | None:
        """The job for ``settings.alert_rules_file`` (None when unset); a bad file or a missing webhook secret
        raises :class:`~slmops.errors.ConfigError` saying what to fix."""
        path = settings.alert_rules_file
        if path is None:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the alert rules file {path}: {exc.strerror or exc}; fix SLMOPS_ALERT_RULES_FILE or "
                "unset it to evaluate no alerts"
            ) from None
        config = load_alert_config(text, origin=str(path))
        targets = {
            name: WebhookTarget(target.spec.model_copy(update={"max_attempts": 1}), target.secret)
            for name, target in targets_from_env(config.webhooks, environ).items()
        }
        return cls(config, targets, WebhookSender(client, sleep=lambda _s: None))

    def run(self, plane: ControlPlane) -> DeliveryReport:
        evaluate_alerts(plane, self.config, plane.clock())
        return deliver_pending(plane, self.sender, self.targets, plane.clock())
