"""Drift on the control plane (service level, every database backend): windows stored through the telemetry
ingestion service, compared per (version, class) against the version's first days or a pinned range."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from benchmarks.drift_detection import DIGEST, enroll_fleet, post_hour

from slmops.control.devices import list_devices
from slmops.control.drift import drift_entry, drift_facts, drift_overview, pin_reference, unpin_reference
from slmops.control.plane import ControlPlane
from slmops.control.telemetry import store_telemetry
from slmops.core.wire import TelemetryBatch, TelemetryWindow
from slmops.errors import ConfigError, NotFoundError
from tests.control.conftest import Clock, register_variants
from tests.telemetry.synthetic import STEP_S, T0, Shift, series, step_of

HOURS = 60
SHIFT_AT = 52


def _at(hour: int) -> datetime:
    return T0 + timedelta(seconds=hour * STEP_S)


def _fleet(plane: ControlPlane, clock: Clock, hours: int = HOURS, digest: str = DIGEST) -> tuple[str, str]:
    """One device per class; the first class's inputs 0.5 nats more surprising from hour SHIFT_AT on."""
    clock.now = T0
    devices = enroll_fleet(plane, 1)
    shifted, stable = sorted(devices)
    streams = {
        devices[shifted][0]: series(hours, seed=5, shift=Shift(SHIFT_AT, nll_shift=0.5)),
        devices[stable][0]: series(hours, seed=6),
    }
    for hour in range(hours):
        for device_id, points in streams.items():
            post_hour(plane, device_id, hour, points[hour], digest)
    clock.now = T0 + timedelta(seconds=hours * STEP_S)
    return shifted, stable


def test_each_version_and_class_is_compared_with_its_first_two_days(plane: ControlPlane, clock: Clock) -> None:
    # Prepare
    shifted, stable = _fleet(plane, clock)

    # Execute
    entries = drift_overview(plane, clock.now)

    # Assert
    assert [(e.version_digest, e.device_class) for e in entries] == sorted([(DIGEST, shifted), (DIGEST, stable)])
    by_class = {e.device_class: e for e in entries}
    drifting, quiet = by_class[shifted], by_class[stable]
    for entry in entries:
        assert entry.model is None and entry.name == DIGEST  # the registry does not know this digest
        assert (entry.reference.kind, entry.reference.since, entry.reference.until) == ("first", T0, _at(48))
        assert (entry.reference_steps, entry.monitored_steps) == (48, HOURS - 48)
        assert entry.report.current_since == _at(HOURS - 3)
    nll = {v.signal: v for v in drifting.report.verdicts}["prompt_nll"]
    assert nll.level == "alert" and nll.psi is not None and nll.p_value is not None and nll.p_value < 0.01
    assert nll.numbers["current_mean"] - nll.numbers["reference_mean"] > 0.4
    assert drifting.level == "alert"
    began = step_of(drifting.shift_began)
    assert began is not None and SHIFT_AT - 2 <= began <= SHIFT_AT, began
    assert quiet.level == "ok" and quiet.shift_began is None
    assert all(v.level == "ok" for v in quiet.report.verdicts), quiet.report.verdicts


def test_facts_give_each_signal_of_the_current_hours(plane: ControlPlane, clock: Clock) -> None:
    shifted, stable = _fleet(plane, clock)

    facts = drift_facts(plane, clock.now)
    later = drift_facts(plane, clock.now + timedelta(days=1))  # no window in the last three hours then

    assert len(facts) == 12 and {f.version for f in facts} == {DIGEST}
    levels = {(f.device_class, f.verdict.signal): f.verdict.level for f in facts}
    assert levels[(shifted, "prompt_nll")] == "alert"
    assert {level for (cls, _), level in levels.items() if cls == stable} == {"ok"}
    assert later == []


def test_the_registry_names_the_version(plane: ControlPlane, clock: Clock, tmp_path: Path) -> None:
    variants = register_variants(plane.registry, tmp_path)
    shifted, _ = _fleet(plane, clock, hours=50, digest=variants.q8.digest)

    entry = drift_entry(plane, f"tiny@{variants.q8.manifest.version}", shifted, clock.now)
    [fact] = {f.version for f in drift_facts(plane, clock.now)}

    assert (entry.version_digest, entry.model, entry.version) == (
        variants.q8.digest,
        "tiny",
        variants.q8.manifest.version,
    )
    assert fact == f"tiny@{variants.q8.manifest.version}"


def test_a_pinned_reference_replaces_the_first_days_until_unpinned(plane: ControlPlane, clock: Clock) -> None:
    # Prepare: pinned to the shifted hours, the shifted class no longer drifts
    shifted, _ = _fleet(plane, clock)
    clock.now += timedelta(minutes=5)

    # Execute
    pinned = pin_reference(plane, DIGEST, shifted, _at(SHIFT_AT), _at(HOURS - 3), "alice")
    entry = drift_entry(plane, DIGEST, shifted, clock.now)
    again = pin_reference(plane, DIGEST, shifted, _at(SHIFT_AT + 1), _at(HOURS - 3), "bob")  # replaces
    removed = unpin_reference(plane, DIGEST, shifted)
    after = drift_entry(plane, DIGEST, shifted, clock.now)

    # Assert
    assert (pinned.kind, pinned.since, pinned.until, pinned.pinned_by) == ("pinned", _at(52), _at(57), "alice")
    assert pinned.pinned_at == clock.now.replace(microsecond=0)
    assert entry.reference == pinned and entry.reference_steps == 5 and entry.monitored_steps == 3
    assert {v.signal: v.level for v in entry.report.verdicts}["prompt_nll"] == "ok"  # both shifted
    assert again.pinned_by == "bob" and removed == again
    assert after.reference.kind == "first" and after.level == "alert"


def test_pinning_refuses_bad_ranges_and_unknown_versions_and_classes(plane: ControlPlane, clock: Clock) -> None:
    shifted, stable = _fleet(plane, clock, hours=50)

    with pytest.raises(ConfigError, match="start < end"):
        pin_reference(plane, DIGEST, shifted, _at(10), _at(10), "alice")
    with pytest.raises(ConfigError, match=r"no windows of version .* start in 2025"):
        pin_reference(plane, DIGEST, shifted, T0.replace(year=2025), T0.replace(year=2025, month=2), "alice")
    with pytest.raises(NotFoundError, match="no telemetry windows of version sha256:e"):
        pin_reference(plane, "sha256:" + "e" * 64, shifted, _at(0), _at(10), "alice")
    with pytest.raises(NotFoundError, match=f"classes with windows: {', '.join(sorted([shifted, stable]))}"):
        pin_reference(plane, DIGEST, "no-such-class", _at(0), _at(10), "alice")
    with pytest.raises(NotFoundError, match="no model named 'nope'"):
        pin_reference(plane, "nope@v1", shifted, _at(0), _at(10), "alice")
    with pytest.raises(NotFoundError, match="no pinned drift reference"):
        unpin_reference(plane, DIGEST, shifted)
    with pytest.raises(NotFoundError, match="on class 'no-such-class'"):
        drift_entry(plane, DIGEST, "no-such-class", clock.now)


def test_windows_without_summaries_make_no_entry_and_a_late_window_counts(plane: ControlPlane, clock: Clock) -> None:
    # Prepare: a version whose (older) agents send no drift summaries, next to the fleet
    shifted, _ = _fleet(plane, clock)
    old = "sha256:" + "0" * 64
    device_id = plane_device(plane, shifted)
    store_telemetry(
        plane,
        device_id,
        TelemetryBatch(
            windows=[TelemetryWindow(id="old", version_digest=old, window_start="2026-01-03T10:00:00Z", window_s=60)]
        ),
    )
    before = drift_entry(plane, DIGEST, shifted, clock.now)

    # Execute: a window of the reference days arrives late (store and forward)
    late = series(1, seed=99)[0]
    store_telemetry(
        plane,
        device_id,
        TelemetryBatch(
            windows=[
                TelemetryWindow(
                    id="late",
                    version_digest=DIGEST,
                    window_start="2026-01-01T03:10:00Z",
                    window_s=60,
                    latency_ms=late.latency_ms,
                    drift=late.summary,
                )
            ]
        ),
    )
    after = drift_entry(plane, DIGEST, shifted, clock.now)

    # Assert
    assert {e.version_digest for e in drift_overview(plane, clock.now)} == {DIGEST}
    assert late.summary is not None
    grew = {v.signal: v.reference_n for v in after.report.verdicts}
    was = {v.signal: v.reference_n for v in before.report.verdicts}
    assert grew["prompt_tokens"] == was["prompt_tokens"] + late.summary.requests


def plane_device(plane: ControlPlane, device_class: str) -> str:
    return next(d.id for d in list_devices(plane) if d.device_class == device_class)
