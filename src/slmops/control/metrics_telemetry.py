"""Fleet roll-ups of the devices' telemetry windows per (model version, device class), for ``GET /metrics``.

:class:`TelemetryRollup` reads the stored windows incrementally: each refresh asks only for windows received since
the last one (less an overlap for rows committed late, whose ids it remembers so nothing counts twice), using the
``(version_digest, received_at)`` index. It looks for the overlap's new windows by key first and decodes only the
bodies from the oldest new window on: decoding every body of the overlap again was most of a scrape's CPU in a
large fleet (the scrape's cost is measured in BENCHMARKS.md). At its first refresh it starts ``backfill_s`` back,
so counters begin near the recent totals instead of replaying the whole history. The totals are counters of *this
process*: a restarted server starts again from the backfill (Prometheus' ``rate()`` treats that as a counter reset),
and replicas that share one database each report the same fleet, so aggregate them with ``max by (version,
device_class)``.

Labels: ``version`` (``name@vN (variant)`` when the registry knows the digest, else the short digest, ``none``
for windows without a version) and ``device_class``. At most ``max_series`` (version, class) pairs are kept; windows
of further pairs count under ``version="other"``.

==============================================  =========  ==========================================================
metric                                          type       what
==============================================  =========  ==========================================================
``slmops_fleet_telemetry_windows_total``        counter    telemetry windows received
``slmops_fleet_requests_total``                 counter    requests served on the devices
``slmops_fleet_errors_total``                   counter    failed requests
``slmops_fleet_crashes_total``                  counter    runtime crashes
``slmops_fleet_tokens_total``                   counter    tokens, by ``gen_ai_token_type`` (``input``, ``output``)
``slmops_fleet_request_duration_seconds``       histogram  request duration (the devices'
                                                           ``gen_ai_server_request_duration_seconds``, summed)
``slmops_fleet_time_to_first_token_seconds``    histogram  time to first token
``slmops_fleet_time_per_output_token_seconds``  histogram  decode time per output token
==============================================  =========  ==========================================================

Histogram buckets are the telemetry's :data:`~slmops.core.wire.LATENCY_BUCKETS_MS` in seconds; windows with another
bucket layout are counted but left out of the histograms.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, union
from sqlalchemy.orm import Session

from slmops.control.db import DeviceRow, TelemetryWindowRow
from slmops.control.repository import iso, parse_iso
from slmops.core.candidates import version_label
from slmops.core.wire import LATENCY_BUCKETS_MS
from slmops.errors import NotFoundError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from slmops.control.plane import ControlPlane

__all__ = ["TelemetryRollup", "VersionLabels"]

OTHER = "other"
_HISTOGRAMS = {
    "latency_ms": ("slmops_fleet_request_duration_seconds", "Request duration on the devices"),
    "ttft_ms": ("slmops_fleet_time_to_first_token_seconds", "Time to first token on the devices"),
    "per_token_ms": ("slmops_fleet_time_per_output_token_seconds", "Decode time per output token on the devices"),
}
_COUNTERS = {
    "requests": ("slmops_fleet_requests", "Requests served on the devices"),
    "errors": ("slmops_fleet_errors", "Failed requests on the devices"),
    "crashes": ("slmops_fleet_crashes", "Runtime crashes on the devices"),
}
_LABELS = ["version", "device_class"]


class VersionLabels:
    """Digest -> the label /metrics shows for it (``name@vN (variant)``), remembered once the registry knows it."""

    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane
        self._known: dict[str, str] = {}

    def __call__(self, digest: str | None) -> str:
        if digest is None:
            return "none"
        label = self._known.get(digest)
        if label is None:
            try:
                label = version_label(self._plane.registry.resolve(digest).manifest)
            except NotFoundError:
                return digest[:19]  # sha256: and 12 hex digits; not remembered: the registry may learn it later
            self._known[digest] = label
        return label


@dataclass
class _Totals:
    windows: int = 0
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    input_tokens: int = 0
    output_tokens: int = 0
    buckets: dict[str, list[int]] = field(
        default_factory=lambda: {key: [0] * (len(LATENCY_BUCKETS_MS) + 1) for key in _HISTOGRAMS}
    )
    sums_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_HISTOGRAMS, 0.0))

    def add(self, body: dict[str, Any]) -> None:
        self.windows += 1
        for key in _COUNTERS:
            self.counters[key] += _int(body.get(key))
        self.input_tokens += _int(body.get("prompt_tokens"))
        self.output_tokens += _int(body.get("completion_tokens"))
        for key in _HISTOGRAMS:
            histogram = body.get(key) or {}
            counts = histogram.get("counts") or []
            if list(histogram.get("bounds") or LATENCY_BUCKETS_MS) != list(LATENCY_BUCKETS_MS):
                continue
            if len(counts) != len(LATENCY_BUCKETS_MS) + 1:
                continue
            into = self.buckets[key]
            for i, count in enumerate(counts):
                into[i] += _int(count)
            value = histogram.get("sum", 0.0)
            self.sums_ms[key] += float(value) if isinstance(value, int | float) else 0.0


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and value > 0 else 0


class TelemetryRollup:
    """Totals of the stored telemetry windows per (version digest, device class), read incrementally."""

    OVERLAP_S = 30.0

    def __init__(self, backfill_s: float = 3600.0, max_series: int = 200) -> None:
        self.backfill_s = backfill_s
        self.max_series = max_series
        self.cursor: float | None = None
        self.seen: dict[tuple[str, str], float] = {}
        self.totals: dict[tuple[str, str], _Totals] = {}  # (digest, "none" or "other"; class) -> totals
        self.digests: set[str] = set()
        self.rows_read = 0  # windows read from the database so far (the cost of the refreshes)
        self._lock = threading.Lock()

    def refresh(self, plane: ControlPlane) -> None:
        """Add the windows received since the last refresh."""
        with self._lock, Session(plane.engine) as session:
            now = plane.now_epoch()
            if self.cursor is None:
                self.cursor = now - self.backfill_s
                since = self.cursor
            else:
                since = self.cursor - self.OVERLAP_S
            devices = union(
                select(DeviceRow.active_digest.label("digest")), select(DeviceRow.previous_digest.label("digest"))
            )
            self.digests |= {d for d in session.scalars(select(devices.subquery().c.digest)) if d}
            low = iso(datetime.fromtimestamp(since, UTC))
            keys = (TelemetryWindowRow.device_id, TelemetryWindowRow.window_id, TelemetryWindowRow.received_at)
            columns = (
                TelemetryWindowRow.device_id,
                TelemetryWindowRow.window_id,
                TelemetryWindowRow.version_digest,
                TelemetryWindowRow.device_class,
                TelemetryWindowRow.received_at,
                TelemetryWindowRow.body,
            )
            wheres = [TelemetryWindowRow.version_digest.is_(None)]
            if self.digests:
                wheres.append(TelemetryWindowRow.version_digest.in_(sorted(self.digests)))
            for where in wheres:
                # The overlap's windows were mostly counted already: find the new ones by key first (no JSON
                # bodies to decode), then read bodies only from the oldest new window on ("sorts as text").
                fresh = [
                    received_at
                    for device_id, window_id, received_at in session.execute(
                        select(*keys).where(where, TelemetryWindowRow.received_at >= low)
                    )
                    if (device_id, window_id) not in self.seen
                ]
                if not fresh:
                    continue
                query = select(*columns).where(where, TelemetryWindowRow.received_at >= min(fresh))
                for device_id, window_id, digest, device_class, received_at, body in session.execute(query):
                    self._add(device_id, window_id, digest, device_class, received_at, body)
        horizon = self.cursor - self.OVERLAP_S
        self.seen = {k: t for k, t in self.seen.items() if t >= horizon}

    def _add(
        self, device_id: str, window_id: str, digest: str | None, device_class: str, received_at: str, body: Any
    ) -> None:
        key = (device_id, window_id)
        if key in self.seen:
            return
        moment = parse_iso(received_at).timestamp()
        self.seen[key] = moment
        self.cursor = max(self.cursor or moment, moment)
        self.rows_read += 1
        series = (digest or "none", device_class)
        if series not in self.totals and len(self.totals) >= self.max_series:
            series = (OTHER, device_class)
            if series not in self.totals and len(self.totals) >= self.max_series + 1:
                series = (OTHER, OTHER)
        self.totals.setdefault(series, _Totals()).add(body if isinstance(body, dict) else {})

    def families(self, labels: VersionLabels) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        def label(digest: str) -> str:
            return digest if digest in ("none", OTHER) else labels(digest)

        with self._lock:
            totals = sorted((((label(d), c), t) for (d, c), t in self.totals.items()), key=lambda item: item[0])
        windows = CounterMetricFamily(
            "slmops_fleet_telemetry_windows", "Telemetry windows received from the devices.", labels=_LABELS
        )
        counters = {
            key: CounterMetricFamily(name, f"{text}, from their telemetry.", labels=_LABELS)
            for key, (name, text) in _COUNTERS.items()
        }
        tokens = CounterMetricFamily(
            "slmops_fleet_tokens",
            "Tokens processed on the devices, from their telemetry, by gen_ai_token_type (input, output).",
            labels=[*_LABELS, "gen_ai_token_type"],
        )
        histograms = {
            key: HistogramMetricFamily(name, f"{text} (seconds), from their telemetry.", labels=_LABELS)
            for key, (name, text) in _HISTOGRAMS.items()
        }
        bounds = [floatToGoString(b / 1000.0) for b in LATENCY_BUCKETS_MS] + ["+Inf"]  # type: ignore[no-untyped-call]
        for values, total in _merge(totals):
            series = list(values)
            windows.add_metric(series, total.windows)
            for key, family in counters.items():
                family.add_metric(series, total.counters[key])
            tokens.add_metric([*series, "input"], total.input_tokens)
            tokens.add_metric([*series, "output"], total.output_tokens)
            for key, histogram in histograms.items():
                cumulative, running = [], 0
                for bound, count in zip(bounds, total.buckets[key], strict=True):
                    running += count
                    cumulative.append((bound, float(running)))
                histogram.add_metric(series, cumulative, sum_value=total.sums_ms[key] / 1000.0)
        return [windows, *counters.values(), tokens, *histograms.values()]


def _merge(totals: list[tuple[tuple[str, str], _Totals]]) -> list[tuple[tuple[str, str], _Totals]]:
    """Series whose labels coincide (two digests the registry gives one label) summed into one."""
    merged: dict[tuple[str, str], _Totals] = {}
    for values, total in totals:
        into = merged.get(values)
        if into is None:
            merged[values] = total
            continue
        summed = _Totals(
            windows=into.windows + total.windows,
            counters={k: into.counters[k] + total.counters[k] for k in _COUNTERS},
            input_tokens=into.input_tokens + total.input_tokens,
            output_tokens=into.output_tokens + total.output_tokens,
            buckets={k: [a + b for a, b in zip(into.buckets[k], total.buckets[k], strict=True)] for k in _HISTOGRAMS},
            sums_ms={k: into.sums_ms[k] + total.sums_ms[k] for k in _HISTOGRAMS},
        )
        merged[values] = summed
    return list(merged.items())
