"""Alert evaluation, pure: rules + a snapshot of facts + the previous states -> new states and transitions.

The controller gathers :class:`Facts` (its clock's ``now`` included), calls :func:`evaluate`, stores the states and
hands the transitions to the webhooks. As in Prometheus, a condition that starts holding makes an alert
``pending``; once it has held for the rule's ``for_s`` the alert is ``firing`` (a ``firing`` transition); when it
stops holding a firing alert is ``resolved`` (a ``resolved`` transition) and stays listed for the retention time,
while a pending one is dropped without a word. Pending alerts are never delivered.

An alert's identity, its ``fingerprint``, is the rule name plus a bounded label set (device class, version,
signal, release; a device only for a ``device_offline`` rule grouped by device), so evaluating the same facts
again changes nothing and never duplicates an alert. A transition's ``id`` names (alert, kind, episode): it is the
idempotency key a receiver uses to drop a redelivered transition.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from slmops.telemetry.alert_rules import (
    AlertRule,
    ClassUnhealthyRule,
    DeviceOfflineRule,
    DriftRule,
    ErrorRateRule,
    ReleaseHaltedRule,
    Severity,
)
from slmops.telemetry.drift import DriftVerdict

__all__ = [
    "AlertState",
    "AlertStatus",
    "DeviceFact",
    "DriftFact",
    "ErrorRateFact",
    "Evaluation",
    "Facts",
    "ReleaseFact",
    "Transition",
    "evaluate",
    "fingerprint",
]

AlertStatus = Literal["pending", "firing", "resolved"]
_SHOWN = 10  # device ids named in a summary


@dataclass(frozen=True)
class DeviceFact:
    device_id: str
    device_class: str
    last_seen: datetime | None  # None: never reported
    health: str = "unknown"  # ok, degraded, failing, unknown


@dataclass(frozen=True)
class ReleaseFact:
    name: str
    state: str  # running, paused, halted, aborted, completed
    reason: str = ""


@dataclass(frozen=True)
class ErrorRateFact:
    """Requests and errors of one (version, class) over the window the controller chose."""

    version: str
    device_class: str
    requests: int
    errors: int


@dataclass(frozen=True)
class DriftFact:
    version: str
    device_class: str
    verdict: DriftVerdict


@dataclass(frozen=True)
class Facts:
    """What the rules look at, taken at ``now`` (timezone-aware)."""

    now: datetime
    devices: Sequence[DeviceFact] = ()
    releases: Sequence[ReleaseFact] = ()
    error_rates: Sequence[ErrorRateFact] = ()
    drift: Sequence[DriftFact] = ()


@dataclass(frozen=True)
class AlertState:
    fingerprint: str
    rule: str
    labels: dict[str, str]  # the identity labels plus the rule's static labels
    severity: Severity
    status: AlertStatus
    active_since: datetime  # when the condition began to hold (this episode)
    fired_at: datetime | None = None
    resolved_at: datetime | None = None
    value: float = 0.0  # the number the condition looked at (offline devices, error rate, PSI, ...)
    summary: str = ""


@dataclass(frozen=True)
class Transition:
    id: str  # idempotency key: the same (alert, kind, episode) always has the same id
    kind: Literal["firing", "resolved"]
    at: datetime
    alert: AlertState


@dataclass(frozen=True)
class Evaluation:
    states: dict[str, AlertState]  # by fingerprint
    transitions: list[Transition] = field(default_factory=list)


def fingerprint(rule: str, labels: Mapping[str, str]) -> str:
    """The stable identity of an alert: its rule and its identity labels."""
    text = json.dumps([rule, sorted(labels.items())], separators=(",", ":"))
    return "al-" + hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class _Active:
    labels: dict[str, str]
    value: float
    summary: str


def _seen_within(device: DeviceFact, now: datetime, ttl_s: float) -> bool:
    return device.last_seen is not None and (now - device.last_seen).total_seconds() <= ttl_s


def _offline(rule: DeviceOfflineRule, facts: Facts) -> list[_Active]:
    down = [d for d in facts.devices if not _seen_within(d, facts.now, rule.ttl_s)]
    if rule.group_by == "device":
        return [
            _Active(
                {"device_class": d.device_class, "device": d.device_id},
                1.0,
                f"device {d.device_id} ({d.device_class}) not seen for more than {rule.ttl_s:g}s",
            )
            for d in down
        ]
    result = []
    for cls in sorted({d.device_class for d in down}):
        ids = sorted(d.device_id for d in down if d.device_class == cls)
        total = sum(1 for d in facts.devices if d.device_class == cls)
        shown = ", ".join(ids[:_SHOWN]) + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")
        text = f"{len(ids)} of {total} devices of class {cls} not seen for more than {rule.ttl_s:g}s: {shown}"
        result.append(_Active({"device_class": cls}, float(len(ids)), text))
    return result


def _unhealthy(rule: ClassUnhealthyRule, facts: Facts) -> list[_Active]:
    result = []
    for cls in sorted({d.device_class for d in facts.devices}):
        members = [d for d in facts.devices if d.device_class == cls]
        if not any(d.health == "ok" and _seen_within(d, facts.now, rule.ttl_s) for d in members):
            text = f"no healthy device in class {cls}: none of its {len(members)} reported ok in {rule.ttl_s:g}s"
            result.append(_Active({"device_class": cls}, float(len(members)), text))
    return result


def _error_rate(rule: ErrorRateRule, facts: Facts) -> list[_Active]:
    result = []
    for fact in facts.error_rates:
        if fact.requests < rule.min_requests:
            continue
        rate = fact.errors / fact.requests
        if rate > rule.threshold:
            text = (
                f"error rate {rate:.2%} ({fact.errors} of {fact.requests} requests) of version {fact.version} on "
                f"class {fact.device_class}, above {rule.threshold:.2%}"
            )
            result.append(_Active({"version": fact.version, "device_class": fact.device_class}, rate, text))
    return result


def _drift(rule: DriftRule, facts: Facts) -> list[_Active]:
    result = []
    for fact in facts.drift:
        verdict = fact.verdict
        if rule.signal not in ("any", verdict.signal) or verdict.psi is None:
            continue
        if rule.threshold is None:
            drifted = verdict.level == "alert"
        else:
            drifted = verdict.level in ("warn", "alert") and verdict.psi >= rule.threshold
        if drifted:
            labels = {"version": fact.version, "device_class": fact.device_class, "signal": verdict.signal}
            text = f"{verdict.signal} drift of version {fact.version} on class {fact.device_class}: {verdict.reason}"
            result.append(_Active(labels, verdict.psi, text))
    return result


def _halted(rule: ReleaseHaltedRule, facts: Facts) -> list[_Active]:
    return [
        _Active({"release": r.name}, 1.0, f"release {r.name} halted" + (f": {r.reason}" if r.reason else ""))
        for r in facts.releases
        if r.state == "halted"
    ]


def _conditions(rule: AlertRule, facts: Facts) -> list[_Active]:
    if isinstance(rule, DeviceOfflineRule):
        return _offline(rule, facts)
    if isinstance(rule, ClassUnhealthyRule):
        return _unhealthy(rule, facts)
    if isinstance(rule, ErrorRateRule):
        return _error_rate(rule, facts)
    if isinstance(rule, DriftRule):
        return _drift(rule, facts)
    return _halted(rule, facts)


def _transition(kind: Literal["firing", "resolved"], at: datetime, alert: AlertState) -> Transition:
    text = f"{alert.fingerprint}|{kind}|{alert.active_since.isoformat()}"
    return Transition("tr-" + hashlib.sha256(text.encode()).hexdigest()[:32], kind, at, alert)


def _step(rule: AlertRule, active: _Active, prev: AlertState | None, now: datetime) -> tuple[AlertState, bool]:
    """The alert's next state while its condition holds, and whether it has just begun firing."""
    fp = fingerprint(rule.name, active.labels)
    labels = {**rule.labels, **active.labels}
    if prev is None or prev.status == "resolved":
        since, fired_at = now, None
    else:
        since, fired_at = prev.active_since, prev.fired_at
    held_s = max(0.0, (now - since).total_seconds())
    firing = fired_at is not None or held_s >= rule.for_s
    state = AlertState(
        fingerprint=fp,
        rule=rule.name,
        labels=labels,
        severity=rule.severity,
        status="firing" if firing else "pending",
        active_since=since,
        fired_at=(fired_at or now) if firing else None,
        value=active.value,
        summary=active.summary,
    )
    return state, firing and fired_at is None


def evaluate(
    rules: Sequence[AlertRule],
    facts: Facts,
    previous: Mapping[str, AlertState] | Iterable[AlertState] = (),
    *,
    resolved_retention_s: float = 3600.0,
) -> Evaluation:
    """The alerts' states after looking at ``facts``, and the transitions to deliver (firing, then resolved)."""
    if not resolved_retention_s > 0:
        raise ValueError(f"resolved_retention_s must be > 0; got {resolved_retention_s!r}")
    prev = dict(previous) if isinstance(previous, Mapping) else {s.fingerprint: s for s in previous}
    now = facts.now
    states: dict[str, AlertState] = {}
    fired: list[Transition] = []
    for rule in rules:
        for active in _conditions(rule, facts):
            fp = fingerprint(rule.name, active.labels)
            if fp in states:
                continue
            state, began = _step(rule, active, prev.get(fp), now)
            states[fp] = state
            if began:
                fired.append(_transition("firing", now, state))
    resolved: list[Transition] = []
    for fp, old in sorted(prev.items()):
        if fp in states:
            continue
        if old.status == "firing":
            state = replace(old, status="resolved", resolved_at=now)
            states[fp] = state
            resolved.append(_transition("resolved", now, state))
        elif old.resolved_at is not None and (now - old.resolved_at).total_seconds() <= resolved_retention_s:
            states[fp] = old  # resolved: listed a while longer
    return Evaluation(states=states, transitions=fired + resolved)
