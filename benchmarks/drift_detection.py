"""Drift detection on the control plane: how many windows after a shift until it is flagged, and how often an
unshifted fleet is flagged anyway.

    python -m benchmarks.drift_detection [--seeds 10] [--stable-steps 500] [--devices-per-class 3]

Each run is a fresh control plane (SQLite in memory, migrated, a real registry) with two device classes
(``2 GiB`` and ``64 GiB`` devices, enrolled through :func:`slmops.control.enrollment.enroll_device`), each with
``--devices-per-class`` devices running one version. Every hour each device posts one telemetry window through
:func:`slmops.control.telemetry.store_telemetry` (the ingestion path of ``POST /devices/{id}/telemetry``) carrying
the drift summary of a seeded synthetic hour of ~100 requests (:mod:`tests.telemetry.synthetic`: a daily cycle and
step noise). After each hour the clock moves to the end of it and :func:`slmops.control.drift.drift_facts` -- what
the alert rules call every controller tick -- gives the verdicts of the last three hours against the version's first
two days, per class and signal, with the default :class:`~slmops.telemetry.drift.DriftConfig`.

- **Shifted runs**: from hour 100 on, one class's prompts get ``k`` times longer (``prompt_tokens``) or its inputs
  ``d`` nats per token more surprising (``prompt_nll``); the other class stays unshifted. Delay = hours from the
  shift's first hour to the first evaluation at which the shifted signal of that class is ``warn`` or ``alert`` (0:
  flagged at the end of the shift's first hour); a run that finds nothing in 24 hours counts as missed. At the end
  (detection + 3 hours, or hour 124) :func:`slmops.control.drift.drift_entry` dates the shift (CUSUM change point).
- **Stable runs**: no shift, ``--stable-steps`` hours. A false alarm is one (evaluation, class, signal) at ``warn``
  or ``alert``; the rate is per class-hour evaluated (after the two reference days), over all six signals. The
  unshifted class of the shifted runs and the shifted class before its shift are counted too.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine
from sqlalchemy.pool import StaticPool
from tests.telemetry.synthetic import STEP_S, T0, Shift, series

from benchmarks._report import write_section
from benchmarks.capacity import _machine
from slmops.control.devices import get_device
from slmops.control.drift import drift_entry, drift_facts
from slmops.control.enrollment import create_enrollment_token, enroll_device
from slmops.control.plane import ControlPlane
from slmops.control.repository import iso
from slmops.control.settings import ServerSettings
from slmops.control.telemetry import store_telemetry
from slmops.core.wire import Capabilities, EnrollRequest, TelemetryBatch, TelemetryWindow
from slmops.registry import DirectoryBlobStore, KeyRing, Registry
from slmops.registry.db import migrate
from slmops.registry.signing import format_public_key
from slmops.telemetry.drift import DriftPoint, Signal

__all__ = [
    "DIGEST",
    "Fleet",
    "RunResult",
    "ShiftCase",
    "enroll_fleet",
    "markdown",
    "open_fleet",
    "post_hour",
    "run_benchmark",
    "run_one",
]

DIGEST = "sha256:" + "d" * 64
SHIFT_AT = 100  # the first shifted hour (after 48 reference hours and 52 monitored ones)
MAX_DELAY = 24  # hours after the shift without a flag: missed
REFERENCE_STEPS = 48
_GIB = 1 << 30
CLASSES_GIB = (2.0, 64.0)


@dataclass(frozen=True)
class ShiftCase:
    label: str
    signal: Signal
    shift: Shift


DEFAULT_CASES: tuple[ShiftCase, ...] = (
    ShiftCase("prompts 10% longer", "prompt_tokens", Shift(SHIFT_AT, prompt_scale=1.1)),
    ShiftCase("prompts 20% longer", "prompt_tokens", Shift(SHIFT_AT, prompt_scale=1.2)),
    ShiftCase("prompts 30% longer", "prompt_tokens", Shift(SHIFT_AT, prompt_scale=1.3)),
    ShiftCase("prompts 50% longer", "prompt_tokens", Shift(SHIFT_AT, prompt_scale=1.5)),
    ShiftCase("prompt NLL +0.1 nats", "prompt_nll", Shift(SHIFT_AT, nll_shift=0.1)),
    ShiftCase("prompt NLL +0.2 nats", "prompt_nll", Shift(SHIFT_AT, nll_shift=0.2)),
    ShiftCase("prompt NLL +0.3 nats", "prompt_nll", Shift(SHIFT_AT, nll_shift=0.3)),
    ShiftCase("prompt NLL +0.5 nats", "prompt_nll", Shift(SHIFT_AT, nll_shift=0.5)),
)


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def enroll_fleet(
    plane: ControlPlane, devices_per_class: int, classes_gib: Sequence[float] = CLASSES_GIB
) -> dict[str, list[str]]:
    """``devices_per_class`` approved devices with each memory size, enrolled through the enrollment service; their
    ids per device class."""
    token = create_enrollment_token(
        plane,
        max_uses=len(classes_gib) * devices_per_class,
        expires_in_s=None,
        auto_approve=True,
        labels={},
        created_by="benchmark",
    ).token
    devices: dict[str, list[str]] = {}
    for gib in classes_gib:
        for _ in range(devices_per_class):
            key = format_public_key(Ed25519PrivateKey.generate().public_key()).strip()
            caps = Capabilities(
                memory_bytes=int(gib * _GIB), disk_free_bytes=64 * _GIB, cpu_cores=4, cpu_flags=["avx2"], arch="x86_64"
            )
            answer = enroll_device(plane, EnrollRequest(token=token, public_key=key, capabilities=caps))
            devices.setdefault(get_device(plane, answer.device_id).device_class, []).append(answer.device_id)
    return devices


def post_hour(plane: ControlPlane, device_id: str, hour: int, point: DriftPoint, digest: str = DIGEST) -> None:
    """One device's window of one hour (its latency and drift summary), through the ingestion service."""
    summary = point.summary
    window = TelemetryWindow(
        id=f"h{hour}",
        version_digest=digest,
        window_start=iso(point.start),
        window_s=STEP_S,
        requests=summary.requests if summary else 0,
        latency_ms=point.latency_ms,
        drift=summary,
    )
    store_telemetry(plane, device_id, TelemetryBatch(windows=[window]))


@dataclass
class Fleet:
    """A control plane and its devices: per device class, the device ids."""

    plane: ControlPlane
    clock: _Clock
    devices: dict[str, list[str]]

    def close(self) -> None:
        self.plane.engine.dispose()


def open_fleet(home: Path, devices_per_class: int) -> Fleet:
    """A fresh control plane on SQLite in memory, with ``devices_per_class`` approved devices per class."""
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    migrate(engine)
    clock = _Clock(T0)
    registry = Registry(engine, DirectoryBlobStore(home / "blobs"), KeyRing(home / "keys"), clock=clock)
    registry.initialize()
    plane = ControlPlane(engine, registry, ServerSettings(home=home), clock)
    return Fleet(plane, clock, enroll_fleet(plane, devices_per_class))


@dataclass
class RunResult:
    seed: int
    case: str  # "stable" for an unshifted run
    hours: int  # hours simulated
    evaluated_class_hours: int  # class-hours evaluated after the reference, unshifted data only
    false_alarms: int  # (evaluation, class, signal) at warn or alert on unshifted data
    delay: int | None = None  # hours after the shift until flagged; None: missed (or a stable run)
    alert_delay: int | None = None  # ... until the level was alert
    began_error: int | None = None  # estimated shift start minus the true one, in hours; None: not dated
    facts_ms: list[float] = field(default_factory=list)  # wall time of each drift_facts call
    entry_ms: float | None = None  # wall time of the drift_entry call


def run_one(
    seed: int,
    case: ShiftCase | None,
    *,
    hours: int = SHIFT_AT + MAX_DELAY,
    devices_per_class: int = 3,
    home: Path | None = None,
) -> RunResult:
    """One seeded run; ``case`` None: an unshifted fleet over ``hours``."""
    with tempfile.TemporaryDirectory() as scratch:
        fleet = open_fleet(home or Path(scratch), devices_per_class)
        try:
            return _run(fleet, seed, case, hours, devices_per_class)
        finally:
            fleet.close()


def _run(fleet: Fleet, seed: int, case: ShiftCase | None, hours: int, per_class: int) -> RunResult:
    classes = sorted(fleet.devices)
    shifted_class = classes[0] if case else None
    requests = 300 // per_class
    streams = {
        device_id: series(
            hours,
            seed=seed * 1000 + 10 * i + j,
            shift=case.shift if cls == shifted_class and case else None,
            requests_per_step=requests,
        )
        for i, cls in enumerate(classes)
        for j, device_id in enumerate(fleet.devices[cls])
    }
    result = RunResult(
        seed=seed, case=case.label if case else "stable", hours=0, evaluated_class_hours=0, false_alarms=0
    )
    stop = hours
    for hour in range(hours):
        if hour >= stop:
            break
        for device_id, points in streams.items():
            post_hour(fleet.plane, device_id, hour, points[hour])
        now = T0 + timedelta(seconds=(hour + 1) * STEP_S)
        fleet.clock.now = now
        started = time.perf_counter()
        facts = drift_facts(fleet.plane, now)
        result.facts_ms.append(1000 * (time.perf_counter() - started))
        result.hours = hour + 1
        if hour < REFERENCE_STEPS:  # no step after the reference yet
            continue
        flagged = {
            (f.device_class, f.verdict.signal): f.verdict.level for f in facts if f.verdict.level in ("warn", "alert")
        }
        for cls in classes:
            if cls == shifted_class and case is not None and hour >= case.shift.at:
                continue
            result.evaluated_class_hours += 1
            result.false_alarms += sum(1 for (c, _), _level in flagged.items() if c == cls)
        if case is None or shifted_class is None or hour < case.shift.at:
            continue
        level = flagged.get((shifted_class, case.signal))
        if level is not None and result.delay is None:
            result.delay = hour - case.shift.at
            stop = min(stop, hour + 4)
        if level == "alert" and result.alert_delay is None:
            result.alert_delay = hour - case.shift.at
    if case is not None and shifted_class is not None:
        started = time.perf_counter()
        entry = drift_entry(fleet.plane, DIGEST, shifted_class, fleet.clock.now)
        result.entry_ms = 1000 * (time.perf_counter() - started)
        [estimate] = [s for s in entry.report.shifts if s.signal == case.signal]
        if estimate.began is not None:
            result.began_error = round(
                (estimate.began - (T0 + timedelta(seconds=case.shift.at * STEP_S))).total_seconds() / STEP_S
            )
    return result


@dataclass
class BenchmarkResult:
    runs: list[RunResult]
    seeds: int
    stable_steps: int
    devices_per_class: int
    total_s: float
    started_at: str
    command: str
    machine: dict[str, str]


def run_benchmark(
    seeds: int = 10,
    stable_steps: int = 500,
    devices_per_class: int = 3,
    cases: Sequence[ShiftCase] = DEFAULT_CASES,
    progress: Callable[[str], None] | None = None,
    command: str = "",
) -> BenchmarkResult:
    started, start_s = datetime.now(UTC), time.perf_counter()
    runs: list[RunResult] = []
    for seed in range(1, seeds + 1):
        runs.append(run_one(seed, None, hours=stable_steps, devices_per_class=devices_per_class))
        if progress:
            progress(f"seed {seed}: stable run of {stable_steps} hours, {runs[-1].false_alarms} false alarms")
        for case in cases:
            runs.append(run_one(seed, case, devices_per_class=devices_per_class))
            if progress:
                progress(f"seed {seed}: {case.label}: delay {runs[-1].delay}")
    return BenchmarkResult(
        runs=runs,
        seeds=seeds,
        stable_steps=stable_steps,
        devices_per_class=devices_per_class,
        total_s=time.perf_counter() - start_s,
        started_at=iso(started),
        command=command,
        machine=_machine(),
    )


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def markdown(result: BenchmarkResult) -> str:
    """The result as Markdown: a table per shift case, the false-alarm rates, timings and the command."""
    lines = [
        "| shift (one class, from hour 100) | runs | flagged (warn or alert) | median delay, h | max delay, h "
        "| median delay to alert, h | shift start dated | start error, h (min .. max) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    labels = list(dict.fromkeys(r.case for r in result.runs if r.case != "stable"))
    for label in labels:
        runs = [r for r in result.runs if r.case == label]
        delays = [r.delay for r in runs if r.delay is not None]
        alerts = [r.alert_delay for r in runs if r.alert_delay is not None]
        errors = [r.began_error for r in runs if r.began_error is not None]
        lines.append(
            f"| {label} | {len(runs)} | {len(delays)} | "
            + (f"{statistics.median(delays):g} | {max(delays)} | " if delays else "- | - | ")
            + (f"{statistics.median(alerts):g} | " if alerts else "- | ")
            + f"{len(errors)} | "
            + (f"{min(errors)} .. {max(errors)} |" if errors else "- |")
        )
    stable = [r for r in result.runs if r.case == "stable"]
    shifted = [r for r in result.runs if r.case != "stable"]
    s_alarms, s_hours = sum(r.false_alarms for r in stable), sum(r.evaluated_class_hours for r in stable)
    x_alarms, x_hours = sum(r.false_alarms for r in shifted), sum(r.evaluated_class_hours for r in shifted)
    noisy = sum(1 for r in stable if r.false_alarms)
    facts_ms = [ms for r in result.runs for ms in r.facts_ms]
    entry_ms = [r.entry_ms for r in result.runs if r.entry_ms is not None]
    lines += [
        "",
        f"- False alarms, stable runs ({len(stable)} runs x {result.stable_steps} hours x 2 classes, "
        f"{s_hours:,} class-hours evaluated x 6 signals): **{s_alarms}** ({s_alarms / max(1, s_hours):.4f} per "
        f"class-hour); runs with any false alarm: {noisy} of {len(stable)}.",
        f"- False alarms on the unshifted data of the shifted runs ({x_hours:,} class-hours): {x_alarms} "
        f"({x_alarms / max(1, x_hours):.4f} per class-hour).",
        f"- `drift_facts` per call (2 classes, {result.devices_per_class} devices each, SQLite in memory): median "
        f"{statistics.median(facts_ms):.1f} ms, p99 {_pct(facts_ms, 0.99):.1f} ms over {len(facts_ms):,} calls; "
        + (
            f"`drift_entry` (with the change-point search): median {statistics.median(entry_ms):.1f} ms."
            if entry_ms
            else ""
        ),
        "",
        f"{result.seeds} seeds, {result.devices_per_class} devices per class (~{300 // result.devices_per_class} "
        f"requests per device-hour), total {result.total_s:.0f} s (started {result.started_at}). "
        f"Command: `{result.command}`",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in result.machine.items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeded runs per shift case and stable (default 10)")
    parser.add_argument("--stable-steps", type=int, default=500, help="hours of each stable run (default 500)")
    parser.add_argument("--devices-per-class", type=int, default=3, help="devices per class (default 3)")
    parser.add_argument("--write", action="store_true", help="replace the drift-detection section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.drift_detection " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run_benchmark(
        args.seeds,
        args.stable_steps,
        args.devices_per_class,
        progress=lambda text: print(text, file=sys.stderr, flush=True),
        command=command.strip(),
    )
    section = markdown(result)
    print(section)
    if args.write:
        write_section(section, "drift-detection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
