"""The telemetry roll-ups behind /metrics on every database backend: windows counted exactly once across refreshes
(late commits included), the backfill horizon, the series limit; and the online cutoff of the device gauges."""

from __future__ import annotations

import itertools
from datetime import timedelta

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from slmops.control.db import DeviceRow, TelemetryWindowRow
from slmops.control.devices import is_online
from slmops.control.metrics import online_cutoff
from slmops.control.metrics_telemetry import OTHER, TelemetryRollup, VersionLabels
from slmops.control.plane import ControlPlane
from slmops.control.repository import iso
from tests.control.conftest import Clock

DIGESTS = [f"sha256:{c * 64}" for c in "abc"]
_ids = itertools.count()


def add_device(plane: ControlPlane, digest: str | None, device_class: str = "x86_64-8gb") -> str:
    device_id = f"dev-r{next(_ids):06d}"
    now = plane.now_iso()
    row = {
        "id": device_id,
        "public_key": f"key-{device_id}",
        "state": "approved",
        "hostname": device_id,
        "labels": {},
        "capabilities": {},
        "device_class": device_class,
        "enrolled_at": now,
        "updated_at": now,
        "active_digest": digest,
    }
    with Session(plane.engine) as session:
        session.execute(insert(DeviceRow), [row])
        session.commit()
    return device_id


def add_window(
    plane: ControlPlane, device_id: str, window_id: str, digest: str | None, requests: int, ago_s: float = 0
) -> None:
    received = iso(plane.clock() - timedelta(seconds=ago_s))
    row = {
        "device_id": device_id,
        "window_id": window_id,
        "version_digest": digest,
        "device_class": "x86_64-8gb",
        "window_start": received,
        "window_s": 60.0,
        "received_at": received,
        "body": {"requests": requests, "errors": 0, "prompt_tokens": 2 * requests, "completion_tokens": requests},
    }
    with Session(plane.engine) as session:
        session.execute(insert(TelemetryWindowRow), [row])
        session.commit()


def requests_by_version(rollup: TelemetryRollup) -> dict[str, int]:
    return {digest: total.counters["requests"] for (digest, _), total in rollup.totals.items()}


def test_windows_count_once_across_refreshes_and_late_commits_are_caught(plane: ControlPlane, clock: Clock) -> None:
    # Prepare: one device on version a; one window from before the backfill horizon, one recent.
    device = add_device(plane, DIGESTS[0])
    add_window(plane, device, "ancient", DIGESTS[0], 1000, ago_s=7200)
    add_window(plane, device, "w1", DIGESTS[0], 5, ago_s=60)
    rollup = TelemetryRollup(backfill_s=3600)

    # Execute / Assert: the first refresh backfills an hour only.
    rollup.refresh(plane)
    assert requests_by_version(rollup) == {DIGESTS[0]: 5}

    # Nothing new: refreshing again counts nothing twice.
    clock.advance(5)
    rollup.refresh(plane)
    assert requests_by_version(rollup) == {DIGESTS[0]: 5} and rollup.rows_read == 1

    # A new window, and one committed late with a received_at 20 s before the newest seen (inside the overlap).
    add_window(plane, device, "w2", DIGESTS[0], 7)
    rollup.refresh(plane)
    add_window(plane, device, "late", DIGESTS[0], 11, ago_s=20)
    clock.advance(5)
    rollup.refresh(plane)
    rollup.refresh(plane)
    assert requests_by_version(rollup) == {DIGESTS[0]: 5 + 7 + 11}
    assert rollup.rows_read == 3
    # Windows without a version count under "none".
    add_window(plane, device, "unversioned", None, 2)
    rollup.refresh(plane)
    assert requests_by_version(rollup) == {DIGESTS[0]: 23, "none": 2}


def test_beyond_max_series_windows_count_under_other(plane: ControlPlane) -> None:
    devices = [add_device(plane, digest) for digest in DIGESTS]
    for n, (device, digest) in enumerate(zip(devices, DIGESTS, strict=True)):
        add_window(plane, device, "w", digest, 10 + n)
    rollup = TelemetryRollup(max_series=2)

    rollup.refresh(plane)

    totals = requests_by_version(rollup)
    assert len(totals) == 3 and OTHER in totals and sum(totals.values()) == 10 + 11 + 12
    labels = VersionLabels(plane)
    names = {f.name for f in rollup.families(labels)}
    assert "slmops_fleet_requests" in names


def test_the_online_cutoff_agrees_with_is_online_to_the_second(plane: ControlPlane, clock: Clock) -> None:
    device = add_device(plane, None)
    ttl_s = plane.settings.device_offline_after_s + plane.settings.device_offline_grace_s
    clock.now = clock.now.replace(microsecond=250_000)
    for age_s in (0, ttl_s - 1, ttl_s - 0.25, ttl_s, ttl_s + 0.25, ttl_s + 1, ttl_s + 3600):
        last_seen = iso(clock.now - timedelta(seconds=age_s))
        with Session(plane.engine) as session:
            session.execute(update(DeviceRow).where(DeviceRow.id == device).values(last_seen=last_seen))
            session.commit()
        assert (last_seen >= online_cutoff(plane)) == is_online(plane, last_seen), (age_s, last_seen)
