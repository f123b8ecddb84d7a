"""Release, gate and rollout-controller metrics for the control plane's ``GET /metrics``.

Read from the database at scrape time (cached with the fleet gauges). Labels stay bounded: release ids appear only
for *active* releases (running or paused: a handful at a time); finished ones are counted by state only.

=================================================  =====  =========================================================
metric                                             type   labels
=================================================  =====  =========================================================
``slmops_releases``                                gauge  ``state``: releases per state (every state, 0 included)
``slmops_release_stage``                           gauge  ``release, blueprint, version, state``: stage index
``slmops_release_stage_fraction``                  gauge  same labels: the fleet fraction of the current stage
``slmops_release_stage_started_timestamp_seconds`` gauge  same labels: when the current stage began
``slmops_release_class_devices``                   gauge  ``release, device_class, count``: the last evaluation's
                                                          devices, members, online_members, switched, reporting,
                                                          rolled_back per class
``slmops_release_gate_verdict``                    gauge  ``release, device_class, gate, verdict``: 1 for the
                                                          current verdict of each gate (pass, fail, wait)
``slmops_release_events_total``                    counter ``kind``: release events (started, promoted, hold,
                                                          halted, paused, resumed, aborted, completed)
``slmops_controller_ticks_total``                  counter ticks run by this replica's rollout controller
``slmops_controller_last_tick_timestamp_seconds``  gauge  when this replica's controller last ticked
``slmops_controller_holds_lease``                  gauge  1 if this replica's controller holds the lease
``slmops_controller_lease_held``                   gauge  1 if any replica holds an unexpired controller lease
``slmops_controller_lease_holder``                 gauge  ``holder``: 1 for the replica holding the lease
``slmops_controller_lease_expires_timestamp_seconds`` gauge  when the current lease runs out unless renewed
=================================================  =====  =========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from slmops.control.db import ACTIVE_RELEASE_STATES, LeaseRow, ReleaseEventRow, ReleaseRow
from slmops.control.rollouts.controller import CONTROLLER_LEASE
from slmops.control.schemas import ReleaseState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from slmops.control.plane import ControlPlane

__all__ = ["CLASS_COUNTS", "controller_metrics", "release_metrics"]

CLASS_COUNTS = ("devices", "members", "online_members", "switched", "reporting", "rolled_back")
_RELEASE_LABELS = ["release", "blueprint", "version", "state"]


def release_metrics(plane: ControlPlane, version_label: Callable[[str], str]) -> list[Metric]:
    """Releases by state, the active releases' stages, per-class progress and gate verdicts, release events.

    ``version_label`` maps a digest to the label used for it elsewhere in /metrics."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    with Session(plane.engine) as session:
        by_state = dict(session.execute(select(ReleaseRow.state, func.count()).group_by(ReleaseRow.state)).all())
        active = list(
            session.scalars(
                select(ReleaseRow).where(ReleaseRow.state.in_(ACTIVE_RELEASE_STATES)).order_by(ReleaseRow.id)
            )
        )
        events = dict(session.execute(select(ReleaseEventRow.kind, func.count()).group_by(ReleaseEventRow.kind)).all())
    states = GaugeMetricFamily("slmops_releases", "Releases, by state.", labels=["state"])
    for state in sorted({*get_args(ReleaseState), *by_state}):
        states.add_metric([state], float(by_state.get(state, 0)))
    stage = GaugeMetricFamily(
        "slmops_release_stage", "The current stage index (0-based) of each active release.", labels=_RELEASE_LABELS
    )
    fraction = GaugeMetricFamily(
        "slmops_release_stage_fraction",
        "The fleet fraction (0-1) of each active release's current stage.",
        labels=_RELEASE_LABELS,
    )
    started = GaugeMetricFamily(
        "slmops_release_stage_started_timestamp_seconds",
        "When each active release's current stage began (epoch seconds).",
        labels=_RELEASE_LABELS,
    )
    devices = GaugeMetricFamily(
        "slmops_release_class_devices",
        "Per active release and device class, the counts of its last evaluation (devices in scope, cohort members, "
        "online members, switched to the new version, reporting telemetry, rolled back).",
        labels=["release", "device_class", "count"],
    )
    gates = GaugeMetricFamily(
        "slmops_release_gate_verdict",
        "1 for the current verdict (pass, fail, wait) of each gate, per active release and device class.",
        labels=["release", "device_class", "gate", "verdict"],
    )
    for row in active:
        version = version_label(row.to_digest)
        labels = [row.id, row.blueprint, version, row.state]
        stage.add_metric(labels, float(row.stage_index))
        stages = (row.policy or {}).get("stages") or []
        if 0 <= row.stage_index < len(stages):
            fraction.add_metric(labels, float(stages[row.stage_index]))
        started.add_metric(labels, float(row.stage_started_at))
        for cls in _classes(row.evaluation):
            device_class = str(cls.get("device_class", ""))
            for count in CLASS_COUNTS:
                if isinstance(cls.get(count), int | float):
                    devices.add_metric([row.id, device_class, count], float(cls[count]))
            for gate in cls.get("gates") or []:
                if isinstance(gate, dict) and gate.get("gate") and gate.get("verdict"):
                    gates.add_metric([row.id, device_class, str(gate["gate"]), str(gate["verdict"])], 1.0)
    kinds = CounterMetricFamily("slmops_release_events", "Release events recorded, by kind.", labels=["kind"])
    for kind, n in sorted(events.items()):
        kinds.add_metric([kind], float(n))
    return [states, stage, fraction, started, devices, gates, kinds]


def _classes(evaluation: dict[str, Any] | None) -> list[dict[str, Any]]:
    classes = (evaluation or {}).get("classes")
    return [c for c in classes if isinstance(c, dict)] if isinstance(classes, list) else []


def controller_metrics(plane: ControlPlane, controller: Any | None) -> list[Metric]:
    """This replica's controller (``app.state.controller``, None when it runs no controller) and the lease row."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families: list[Metric] = []
    if controller is not None:
        families.append(
            CounterMetricFamily(
                "slmops_controller_ticks", "Ticks run by this replica's rollout controller.", value=controller.ticks
            )
        )
        if controller.last_tick_at is not None:
            families.append(
                GaugeMetricFamily(
                    "slmops_controller_last_tick_timestamp_seconds",
                    "When this replica's rollout controller last ticked (epoch seconds).",
                    value=float(controller.last_tick_at),
                )
            )
    families.append(
        GaugeMetricFamily(
            "slmops_controller_holds_lease",
            "1 if this replica's rollout controller holds the controller lease.",
            value=float(bool(controller is not None and controller.holds_lease)),
        )
    )
    with Session(plane.engine) as session:
        lease = session.get(LeaseRow, CONTROLLER_LEASE)
    held = lease is not None and lease.expires_at > plane.now_epoch()
    families.append(
        GaugeMetricFamily(
            "slmops_controller_lease_held",
            "1 if some replica holds an unexpired rollout-controller lease (0: no replica moves releases).",
            value=float(held),
        )
    )
    holder = GaugeMetricFamily(
        "slmops_controller_lease_holder", "1 for the replica holding the rollout-controller lease.", labels=["holder"]
    )
    expires = GaugeMetricFamily(
        "slmops_controller_lease_expires_timestamp_seconds",
        "When the rollout-controller lease runs out unless its holder renews it (epoch seconds).",
    )
    if lease is not None and held:
        holder.add_metric([lease.holder], 1.0)
        expires.add_metric([], float(lease.expires_at))
    families += [holder, expires]
    return families
