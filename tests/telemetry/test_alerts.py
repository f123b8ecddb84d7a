from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.telemetry.alert_rules import (
    AlertRule,
    ClassUnhealthyRule,
    DeviceOfflineRule,
    DriftRule,
    ErrorRateRule,
    ReleaseHaltedRule,
)
from slmops.telemetry.alerts import (
    AlertState,
    DeviceFact,
    DriftFact,
    ErrorRateFact,
    Facts,
    ReleaseFact,
    evaluate,
    fingerprint,
)
from slmops.telemetry.drift import DriftVerdict

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_an_alert_goes_pending_firing_resolved_and_delivers_two_transitions() -> None:
    # Prepare
    rule = ErrorRateRule(name="errors", kind="error_rate", threshold=0.05, min_requests=100, for_s=300)
    bad = [ErrorRateFact("m@v2", "x86_64-8gb", requests=1000, errors=80)]

    # Execute / Assert: pending first, nothing delivered
    first = evaluate([rule], Facts(now=_at(0), error_rates=bad))
    (state,) = first.states.values()
    assert state.status == "pending" and first.transitions == []
    assert state.labels == {"version": "m@v2", "device_class": "x86_64-8gb"} and state.value == 0.08
    assert "8.00% (80 of 1000 requests)" in state.summary

    # still pending before for_s, firing once it has held that long
    assert evaluate([rule], Facts(now=_at(299), error_rates=bad), first.states).transitions == []
    firing = evaluate([rule], Facts(now=_at(300), error_rates=bad), first.states)
    (fired,) = firing.transitions
    assert fired.kind == "firing" and fired.alert.status == "firing" and fired.alert.fired_at == _at(300)
    assert fired.alert.active_since == _at(0)

    # staying bad changes nothing; getting better resolves it, once
    again = evaluate([rule], Facts(now=_at(900), error_rates=bad), firing.states)
    assert again.transitions == [] and next(iter(again.states.values())).fired_at == _at(300)
    good = [ErrorRateFact("m@v2", "x86_64-8gb", requests=1000, errors=10)]
    resolved = evaluate([rule], Facts(now=_at(1000), error_rates=good), again.states)
    (done,) = resolved.transitions
    assert done.kind == "resolved" and done.alert.resolved_at == _at(1000) and done.id != fired.id
    assert evaluate([rule], Facts(now=_at(1001), error_rates=good), resolved.states).transitions == []

    # a resolved alert stays listed for the retention time, then goes
    kept = evaluate([rule], Facts(now=_at(1000 + 3600)), resolved.states, resolved_retention_s=3600)
    assert [s.status for s in kept.states.values()] == ["resolved"]
    assert evaluate([rule], Facts(now=_at(1000 + 3601)), kept.states, resolved_retention_s=3600).states == {}


def test_a_pending_alert_that_clears_is_dropped_silently_and_a_new_episode_has_new_ids() -> None:
    rule = ReleaseHaltedRule(name="halted", kind="release_halted", for_s=60)
    halted = Facts(now=_at(0), releases=[ReleaseFact("r1", "halted", "latency gate failed")])
    pending = evaluate([rule], halted)
    assert evaluate([rule], Facts(now=_at(30), releases=[ReleaseFact("r1", "running")]), pending.states).states == {}

    now_rule = ReleaseHaltedRule(name="halted", kind="release_halted")
    first = evaluate([now_rule], halted)
    (t1,) = first.transitions
    assert t1.alert.summary == "release r1 halted: latency gate failed"
    cleared = evaluate([now_rule], Facts(now=_at(10)), first.states)
    refired = evaluate([now_rule], Facts(now=_at(20), releases=halted.releases), cleared.states)
    (t2,) = refired.transitions
    assert t2.kind == "firing" and t2.alert.fingerprint == t1.alert.fingerprint and t2.id != t1.id


def test_device_offline_groups_by_class_or_by_device() -> None:
    devices = [
        DeviceFact("d1", "aarch64-4gb", _at(-1000), "ok"),
        DeviceFact("d2", "aarch64-4gb", _at(-10), "ok"),
        DeviceFact("d3", "x86_64-8gb", None),
        *[DeviceFact(f"e{i:02d}", "x86_64-16gb", _at(-5000)) for i in range(12)],
    ]
    by_class = DeviceOfflineRule(name="offline", kind="device_offline", ttl_s=900, labels={"team": "edge"})
    states = evaluate([by_class], Facts(now=T0, devices=devices)).states
    summaries = {s.labels["device_class"]: s for s in states.values()}
    assert set(summaries) == {"aarch64-4gb", "x86_64-8gb", "x86_64-16gb"}
    assert summaries["aarch64-4gb"].value == 1 and "1 of 2 devices" in summaries["aarch64-4gb"].summary
    assert summaries["aarch64-4gb"].labels == {"team": "edge", "device_class": "aarch64-4gb"}
    assert summaries["x86_64-16gb"].summary.endswith("e09 and 2 more")  # bounded text too
    per_device = DeviceOfflineRule(name="offline", kind="device_offline", ttl_s=900, group_by="device")
    labels = sorted(s.labels["device"] for s in evaluate([per_device], Facts(now=T0, devices=devices)).states.values())
    assert labels[:2] == ["d1", "d3"] and len(labels) == 14


def test_class_unhealthy_needs_a_recent_ok_device() -> None:
    rule = ClassUnhealthyRule(name="no-healthy", kind="class_unhealthy", ttl_s=300)
    devices = [
        DeviceFact("a", "c-ok", _at(-10), "ok"),
        DeviceFact("b", "c-ok", _at(-10), "failing"),
        DeviceFact("c", "c-stale", _at(-600), "ok"),
        DeviceFact("d", "c-bad", _at(-1), "degraded"),
    ]
    states = evaluate([rule], Facts(now=T0, devices=devices)).states
    assert sorted(s.labels["device_class"] for s in states.values()) == ["c-bad", "c-stale"]


def _verdict(signal: str, level: str, psi: float | None) -> DriftVerdict:
    return DriftVerdict(signal=signal, level=level, reason=f"PSI {psi}", psi=psi)  # type: ignore[arg-type]


def test_drift_rules_follow_the_verdicts() -> None:
    facts = Facts(
        now=T0,
        drift=[
            DriftFact("m@v1", "c1", _verdict("prompt_nll", "alert", 0.4)),
            DriftFact("m@v1", "c1", _verdict("prompt_tokens", "warn", 0.15)),
            DriftFact("m@v1", "c2", _verdict("latency", "ok", 0.3)),  # large but not significant
            DriftFact("m@v1", "c3", _verdict("latency", "insufficient", None)),
        ],
    )
    default = DriftRule(name="drift", kind="drift")
    assert [s.labels["signal"] for s in evaluate([default], facts).states.values()] == ["prompt_nll"]
    low = DriftRule(name="drift", kind="drift", threshold=0.1)
    assert sorted(s.labels["signal"] for s in evaluate([low], facts).states.values()) == ["prompt_nll", "prompt_tokens"]
    only = DriftRule(name="drift", kind="drift", signal="prompt_tokens", threshold=0.1)
    (state,) = evaluate([only], facts).states.values()
    assert state.value == 0.15 and state.labels == {"version": "m@v1", "device_class": "c1", "signal": "prompt_tokens"}


def test_a_removed_rule_resolves_its_firing_alerts() -> None:
    rule = ReleaseHaltedRule(name="halted", kind="release_halted")
    fired = evaluate([rule], Facts(now=T0, releases=[ReleaseFact("r1", "halted")]))
    after = evaluate([], Facts(now=_at(5), releases=[ReleaseFact("r1", "halted")]), list(fired.states.values()))
    assert [t.kind for t in after.transitions] == ["resolved"]


def test_identity_is_the_rule_and_its_labels() -> None:
    assert fingerprint("r", {"a": "1", "b": "2"}) == fingerprint("r", {"b": "2", "a": "1"})
    assert fingerprint("r", {"a": "1"}) != fingerprint("s", {"a": "1"})
    assert fingerprint("r", {"a": "1"}) != fingerprint("r", {"a": "2"})


RULES: list[AlertRule] = [
    DeviceOfflineRule(name="offline", kind="device_offline", ttl_s=600, for_s=120),
    ClassUnhealthyRule(name="unhealthy", kind="class_unhealthy"),
    ErrorRateRule(name="errors", kind="error_rate", threshold=0.1, min_requests=10, for_s=60),
    ReleaseHaltedRule(name="halted", kind="release_halted"),
    DriftRule(name="drift", kind="drift", threshold=0.2),
]
device_facts = st.builds(
    DeviceFact,
    device_id=st.sampled_from(["d1", "d2", "d3", "d4"]),
    device_class=st.sampled_from(["c1", "c2"]),
    last_seen=st.none() | st.integers(-2000, 0).map(_at),
    health=st.sampled_from(["ok", "degraded", "failing", "unknown"]),
)
error_facts = st.builds(
    ErrorRateFact,
    version=st.sampled_from(["v1", "v2"]),
    device_class=st.sampled_from(["c1", "c2"]),
    requests=st.integers(0, 100),
    errors=st.integers(0, 100),
).filter(lambda f: f.errors <= f.requests)
drift_facts = st.builds(
    DriftFact,
    version=st.sampled_from(["v1", "v2"]),
    device_class=st.sampled_from(["c1", "c2"]),
    verdict=st.builds(
        DriftVerdict,
        signal=st.sampled_from(["latency", "prompt_nll"]),
        level=st.sampled_from(["ok", "warn", "alert", "insufficient"]),
        reason=st.just(""),
        psi=st.none() | st.floats(0, 1),
    ),
)
facts_at = st.builds(
    Facts,
    now=st.integers(0, 600).map(_at),
    devices=st.lists(device_facts, max_size=6),
    releases=st.lists(st.builds(ReleaseFact, st.sampled_from(["r1", "r2"]), st.sampled_from(["running", "halted"]))),
    error_rates=st.lists(error_facts, max_size=4),
    drift=st.lists(drift_facts, max_size=4),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(facts_at, min_size=1, max_size=4), facts_at)
def test_evaluation_is_idempotent(history: list[Facts], facts: Facts) -> None:
    # Prepare: some earlier evaluations, in time order, then the one under test
    states: dict[str, AlertState] = {}
    moments = sorted(f.now for f in [*history, facts])
    for earlier, now in zip(history, moments, strict=False):
        earlier_facts = Facts(now, earlier.devices, earlier.releases, earlier.error_rates, earlier.drift)
        states = evaluate(RULES, earlier_facts, states).states
    facts = Facts(moments[-1], facts.devices, facts.releases, facts.error_rates, facts.drift)

    # Execute
    once = evaluate(RULES, facts, states)
    twice = evaluate(RULES, facts, once.states)

    # Assert: the same facts again change nothing and deliver nothing; every alert appears once
    assert twice.states == once.states
    assert twice.transitions == []
    assert len({t.id for t in once.transitions}) == len(once.transitions)
    assert all(s.fingerprint == fp for fp, s in once.states.items())
