"""Alerts on a real control plane (SQLite in memory, SQLite file, PostgreSQL): facts from devices, releases and
telemetry; states in the database; the outbox delivered to a real webhook receiver on loopback."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.control.alert_tables import AlertDeliveryRow
from slmops.control.alerting import deliver_pending, evaluate_alerts, gather_facts, list_alerts
from slmops.control.plane import ControlPlane
from slmops.registry.db import make_engine, migrate
from slmops.telemetry.alert_rules import AlertConfig, load_alert_config
from slmops.telemetry.alerts import DriftFact
from slmops.telemetry.drift import DriftVerdict
from slmops.telemetry.webhooks import WebhookSender, targets_from_env
from tests.control.alerting_support import (
    SECRET,
    Receiver,
    enroll,
    halted_release,
    heartbeat,
    send_window,
    serve_receiver,
)
from tests.control.conftest import Clock, make_plane, register_variants

RULES = """
rules:
  - {name: offline, kind: device_offline, ttl_s: 120}
  - {name: unhealthy, kind: class_unhealthy, ttl_s: 120, severity: critical}
  - {name: errors, kind: error_rate, threshold: 0.05, min_requests: 50}
  - {name: halted, kind: release_halted, severity: critical}
webhooks:
  - {name: ops, url: "http://127.0.0.1:9/hook", secret_env: SLMOPS_TEST_HOOK_SECRET}
"""
OFFLINE = """
rules: [{name: offline, kind: device_offline, ttl_s: 60}]
webhooks: [{name: ops, url: "http://127.0.0.1:9/hook", secret_env: SLMOPS_TEST_HOOK_SECRET}]
"""


def config(text: str = RULES, url: str | None = None) -> AlertConfig:
    return load_alert_config(text.replace("http://127.0.0.1:9/hook", url) if url else text)


def statuses(plane: ControlPlane) -> dict[tuple[str, str], str]:
    """(rule, the alert's identity labels joined) -> status."""
    found: dict[tuple[str, str], str] = {}
    for a in list_alerts(plane):
        ident = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
        found[(a.rule, ident)] = a.status
    return found


def outbox(plane: ControlPlane) -> list[AlertDeliveryRow]:
    with Session(plane.engine) as session:
        return list(session.scalars(select(AlertDeliveryRow).order_by(AlertDeliveryRow.created_at)))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from serve_receiver(Receiver(fail_first=2))


def test_rules_fire_and_resolve_on_every_backend(plane: ControlPlane, clock: Clock, tmp_path: Path) -> None:
    v1 = register_variants(plane.registry, tmp_path).base  # tiny@v1
    small_a, small = enroll(plane, 8)
    small_b, _ = enroll(plane, 8)
    big, large = enroll(plane, 16)
    for device in (small_a, small_b, big):
        heartbeat(plane, device)
    send_window(plane, small_a, v1.digest, "2025-06-01T11:58:00Z", requests=100, errors=9)
    send_window(plane, big, v1.digest, "2025-06-01T11:58:00Z", requests=100, errors=1)
    halted_release(plane, "rel-old", "shops", plane.now_epoch() - 600, "halted")
    halted_release(plane, "rel-new", "shops", plane.now_epoch() - 60, "running")  # supersedes the halted one
    halted_release(plane, "rel-bad", "clinics", plane.now_epoch() - 60, "halted")
    rules = config()

    first = evaluate_alerts(plane, rules, clock())

    assert {(t.alert.rule, t.kind) for t in first} == {("errors", "firing"), ("halted", "firing")}
    assert statuses(plane) == {
        ("errors", f"device_class={small},version=tiny@v1"): "firing",
        ("halted", "release=rel-bad"): "firing",
    }
    [errors] = [a for a in list_alerts(plane) if a.rule == "errors"]
    assert errors.value == pytest.approx(0.09) and "9 of 100 requests" in errors.summary
    assert [(d.webhook, d.kind, d.status, d.attempts) for d in errors.deliveries] == [("ops", "firing", "pending", 0)]

    # the small devices go quiet: offline and no healthy device in their class; the error window ages out
    clock.advance(1000)
    heartbeat(plane, big)
    second = evaluate_alerts(plane, rules, clock())

    assert {(t.alert.rule, t.kind) for t in second} == {
        ("offline", "firing"),
        ("unhealthy", "firing"),
        ("errors", "resolved"),
    }
    [offline] = [a for a in list_alerts(plane, "firing") if a.rule == "offline"]
    assert offline.value == 2 and offline.labels == {"device_class": small}
    assert statuses(plane)[("errors", f"device_class={small},version=tiny@v1")] == "resolved"

    # one comes back healthy: the class has a healthy device again, one device is still offline
    clock.advance(30)
    heartbeat(plane, small_a)
    heartbeat(plane, big)
    third = evaluate_alerts(plane, rules, clock())
    assert [(t.alert.rule, t.kind) for t in third] == [("unhealthy", "resolved")]
    [offline] = [a for a in list_alerts(plane, "firing") if a.rule == "offline"]
    assert offline.value == 1 and small_b in offline.summary

    heartbeat(plane, small_b)
    fourth = evaluate_alerts(plane, rules, clock())
    assert [(t.alert.rule, t.kind) for t in fourth] == [("offline", "resolved")]
    assert evaluate_alerts(plane, rules, clock()) == []  # the same facts again change nothing
    kinds = sorted((row.fingerprint == offline.fingerprint, row.kind) for row in outbox(plane))
    assert kinds.count((True, "firing")) == 1 and kinds.count((True, "resolved")) == 1
    assert len(outbox(plane)) == 7  # 4 firing and 3 resolved transitions (the halted release still fires)
    assert large not in {a.labels.get("device_class") for a in list_alerts(plane, "firing") if a.rule != "halted"}


def test_a_pending_alert_is_not_delivered_and_is_dropped_when_its_condition_stops(
    plane: ControlPlane, clock: Clock
) -> None:
    device, _ = enroll(plane, 8)
    rules = config("rules: [{name: offline, kind: device_offline, ttl_s: 60, for_s: 300}]\n")

    assert evaluate_alerts(plane, rules, clock()) == []  # never seen: the condition holds, for_s not yet
    assert [a.status for a in list_alerts(plane)] == ["pending"]
    clock.advance(100)
    heartbeat(plane, device)
    assert evaluate_alerts(plane, rules, clock()) == []
    assert list_alerts(plane) == []  # a pending alert goes without a word
    clock.advance(200)
    assert evaluate_alerts(plane, rules, clock()) == []  # offline again: pending from now
    clock.advance(300)
    [fired] = evaluate_alerts(plane, rules, clock())
    assert fired.kind == "firing" and fired.alert.active_since == datetime(2025, 6, 1, 12, 5, tzinfo=UTC)
    assert fired.alert.fired_at == datetime(2025, 6, 1, 12, 10, tzinfo=UTC)


def test_state_survives_a_new_plane_on_the_same_database(database_url: str, tmp_path: Path) -> None:
    clock = Clock()
    engine = make_engine(database_url)
    migrate(engine)
    plane = make_plane(engine, tmp_path / "home", clock)
    enroll(plane, 8)
    rules = config(OFFLINE)
    [fired] = evaluate_alerts(plane, rules, clock())
    engine.dispose()

    clock.advance(60)
    again = make_engine(database_url)  # a restarted server
    restarted = make_plane(again, tmp_path / "home", clock)
    assert evaluate_alerts(restarted, rules, clock()) == []  # still firing, not fired again
    [alert] = list_alerts(restarted)
    assert (alert.fingerprint, alert.status) == (fired.alert.fingerprint, "firing")
    assert alert.fired_at == "2025-06-01T12:00:00Z"
    assert [row.transition_id for row in outbox(restarted)] == [fired.id]
    again.dispose()


def test_drift_facts_feed_the_drift_rule(plane: ControlPlane, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    verdict = DriftVerdict(signal="prompt_tokens", level="alert", reason="PSI 0.40 against the reference", psi=0.4)
    monkeypatch.setattr("slmops.control.drift.drift_facts", lambda _plane, _now: [DriftFact("tiny@v1", "c1", verdict)])
    rules = config("rules: [{name: drift, kind: drift, threshold: 0.25}]\n")

    assert gather_facts(plane, clock()).drift[0].verdict.psi == 0.4
    [fired] = evaluate_alerts(plane, rules, clock())
    assert fired.alert.labels == {"version": "tiny@v1", "device_class": "c1", "signal": "prompt_tokens"}


def test_the_outbox_is_delivered_signed_retried_and_deduplicated_by_the_receiver(
    plane: ControlPlane, clock: Clock, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    enroll(plane, 8)  # never seen: offline
    monkeypatch.setenv("SLMOPS_TEST_HOOK_SECRET", SECRET)
    rules = config(OFFLINE, url=receiver.url)
    targets = targets_from_env(rules.webhooks, {"SLMOPS_TEST_HOOK_SECRET": SECRET})
    [fired] = evaluate_alerts(plane, rules, clock())
    slept: list[float] = []
    with httpx.Client() as client:
        sender = WebhookSender(client, sleep=slept.append)

        report = deliver_pending(plane, sender, targets, clock(), rng=random.Random(1))
        repeat = deliver_pending(plane, sender, targets, clock())

    assert (report.delivered, report.retrying, repeat.delivered) == (1, 0, 0)
    assert len(receiver.requests) == 3 and receiver.bad_signatures == 0  # 500, 500, 200
    assert {r["key"] for r in receiver.requests} == {fired.id}
    assert len({r["body"] for r in receiver.requests}) == 1  # the same bytes every attempt
    assert len(slept) == 2 and all(0 <= s <= 2.0 for s in slept)  # full jitter: [0, 1], [0, 2]
    assert list(receiver.accepted) == [fired.id]
    assert receiver.accepted[fired.id]["type"] == "alert.firing"
    [row] = outbox(plane)
    assert (row.status, row.attempts, row.delivered_at, row.next_attempt_at) == (
        "delivered",
        3,
        "2025-06-01T12:00:00Z",
        None,
    )
    [alert] = list_alerts(plane)
    assert [(d.status, d.attempts) for d in alert.deliveries] == [("delivered", 3)]


def test_a_delivery_lost_in_a_crash_is_sent_again_and_the_receiver_drops_the_repeat(
    plane: ControlPlane, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    enroll(plane, 8)
    for receiver in serve_receiver(Receiver(fail_first=0)):
        rules = config(OFFLINE, url=receiver.url)
        targets = targets_from_env(rules.webhooks, {"SLMOPS_TEST_HOOK_SECRET": SECRET})
        [fired] = evaluate_alerts(plane, rules, clock())
        with httpx.Client() as client:
            sender = WebhookSender(client)
            crash = WebhookSender(client)

            def send_then_die(target: object, transition: object, sender: WebhookSender = sender) -> object:
                sender.deliver(target, transition)  # type: ignore[arg-type]
                raise SystemExit("the server died before recording the delivery")

            monkeypatch.setattr(crash, "deliver", send_then_die)
            with pytest.raises(SystemExit):
                deliver_pending(plane, crash, targets, clock())
            assert outbox(plane)[0].status == "pending"  # nothing was recorded: it is sent again

            report = deliver_pending(plane, sender, targets, clock())

        assert report.delivered == 1
        assert [r["key"] for r in receiver.requests] == [fired.id, fired.id]  # at least once ...
        assert list(receiver.accepted) == [fired.id]  # ... and once after the receiver's dedup


def test_a_failing_receiver_is_retried_after_a_jittered_backoff_and_a_refusal_is_kept(
    plane: ControlPlane, clock: Clock
) -> None:
    enroll(plane, 8)
    rules = config(
        "rules: [{name: offline, kind: device_offline, ttl_s: 60}]\n"
        "webhooks: [{name: ops, url: 'http://127.0.0.1:9/hook', secret_env: S, max_attempts: 1, backoff_max_s: 30}]\n"
    )
    targets = targets_from_env(rules.webhooks, {"S": SECRET})
    [fired] = evaluate_alerts(plane, rules, clock())
    with httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(503))) as client:
        sender = WebhookSender(client, sleep=lambda _s: None)
        first = deliver_pending(plane, sender, targets, clock(), rng=random.Random(7))
        [row] = outbox(plane)
        assert (first.retrying, row.status, row.attempts, row.last_error) == (1, "pending", 1, "HTTP 503")
        assert row.next_attempt_at is not None and row.next_attempt_at > "2025-06-01T12:00:00Z"
        assert deliver_pending(plane, sender, targets, clock()).retrying == 0  # not due yet
        clock.advance(31)
        assert deliver_pending(plane, sender, targets, clock()).retrying == 1
        assert outbox(plane)[0].attempts == 2
    assert deliver_pending(plane, sender, {}, clock() + timedelta(hours=1)).skipped == 1
    with httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(410))) as client:
        clock.advance(60)
        refused = deliver_pending(plane, WebhookSender(client), targets, clock())
    [row] = outbox(plane)
    assert (refused.refused, row.status, row.attempts, row.next_attempt_at) == (1, "refused", 3, None)
    assert json.loads(row.payload)["id"] == fired.id


def test_a_resolved_alert_leaves_after_the_retention_with_its_delivered_transitions_only(
    plane: ControlPlane, clock: Clock
) -> None:
    device, _ = enroll(plane, 8)
    rules = config(
        "rules: [{name: offline, kind: device_offline, ttl_s: 60}]\n"
        "webhooks: [{name: ops, url: 'http://127.0.0.1:9/hook', secret_env: S}]\nresolved_retention_s: 600\n"
    )
    evaluate_alerts(plane, rules, clock())
    with httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(204))) as client:
        assert deliver_pending(plane, WebhookSender(client), targets_from_env(rules.webhooks, {"S": SECRET}), clock())
    heartbeat(plane, device)
    [resolved] = evaluate_alerts(plane, rules, clock())  # its delivery is left pending
    clock.advance(599)
    heartbeat(plane, device)
    assert evaluate_alerts(plane, rules, clock()) == [] and [a.status for a in list_alerts(plane)] == ["resolved"]

    clock.advance(2)
    heartbeat(plane, device)
    assert evaluate_alerts(plane, rules, clock()) == []

    assert list_alerts(plane) == []
    assert [(row.transition_id, row.status) for row in outbox(plane)] == [(resolved.id, "pending")]
