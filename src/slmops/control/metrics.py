"""The control plane's ``GET /metrics``: HTTP traffic per route template and fleet metrics, in Prometheus text.

Each app gets its own :class:`~prometheus_client.CollectorRegistry`. Requests are counted by an ASGI wrapper with
the matched route's path template (never the raw path). Everything else is read from the database at scrape time,
cached ``metrics_cache_s`` seconds; labels are bounded (state, class, version, active releases), never per device:
beyond :data:`MAX_DEVICE_CLASSES` device classes and :data:`MAX_VERSIONS` active versions, the least common ones
are counted under ``other``.

=========================================  =========  ==================================================
metric                                     type       labels
=========================================  =========  ==================================================
``slmops_http_requests_total``             counter    ``route, method, status`` (``2xx``...)
``slmops_http_request_duration_seconds``   histogram  ``route, method``
``slmops_devices``                         gauge      ``state, device_class``
``slmops_devices_online``                  gauge      ``device_class``
``slmops_devices_health``                  gauge      ``device_class, health, phase``
``slmops_devices_active_version``          gauge      ``device_class, version``
=========================================  =========  ==================================================

Releases, gates and the controller: :mod:`slmops.control.metrics_releases`; telemetry roll-ups per (version, class):
:mod:`slmops.control.metrics_telemetry`. With ``SLMOPS_METRICS=false`` there is no ``/metrics`` and no request
counting (the wrapper passes requests straight through).
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import FastAPI, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops.control._deps import bearer
from slmops.control.auth import require_role
from slmops.control.credentials import authenticate
from slmops.control.db import DeviceRow
from slmops.control.metrics_releases import controller_metrics, release_metrics
from slmops.control.metrics_telemetry import TelemetryRollup, VersionLabels
from slmops.control.plane import ControlPlane
from slmops.control.repository import iso
from slmops.errors import AuthenticationError, NotFoundError

__all__ = [
    "MAX_DEVICE_CLASSES",
    "MAX_VERSIONS",
    "OTHER",
    "FleetCollector",
    "RequestMetrics",
    "install_metrics",
    "online_cutoff",
]

_UNMATCHED = "unmatched"
OTHER = "other"  # the label value of device classes and versions beyond the limits below
MAX_DEVICE_CLASSES = 100  # device classes with their own series; the rest are counted under OTHER
MAX_VERSIONS = 200  # active model versions with their own series (as the telemetry roll-ups' max_series)
_MAX_CACHED = 4096  # (route, depth, method, status) keys: bounded by the routes, but never unbounded
_STATUS = {code: f"{code // 100}xx" for code in range(100, 600)}


def metrics_enabled(app: Any) -> bool:
    """Whether ``app``'s settings turn metrics on (``SLMOPS_METRICS``; on when the app has no plane yet)."""
    plane = getattr(getattr(app, "state", None), "plane", None)
    return bool(getattr(getattr(plane, "settings", None), "metrics", True))


class RequestMetrics:
    """ASGI wrapper counting requests and their latency per route template, method and status class.

    ``enabled=None`` reads ``settings.metrics`` of the app's plane at the first request; when off, requests pass
    straight through. The labelled children are kept in a dict, so a request costs one lookup, not two
    ``labels()`` calls with their locks and the template's string work.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, enabled: bool | None = None) -> None:
        self.app = app
        self.enabled = enabled
        self.requests = Counter(
            "slmops_http_requests",
            "HTTP requests served, by route template, method and status class.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "slmops_http_request_duration_seconds",
            "HTTP request latency, by route template and method.",
            ["route", "method"],
            registry=registry,
        )
        self._children: dict[tuple[int, int, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.enabled is None:
            self.enabled = metrics_enabled(scope.get("app"))
        if not self.enabled:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            elapsed = time.perf_counter() - start
            method = scope.get("method", "")
            # The template depends only on the route and how deep the path is (see _template): cache per both.
            key = (id(scope.get("route")), str(scope.get("path", "")).count("/"), method, status)
            children = self._children.get(key)
            if children is None:
                template, upper = _template(scope), str(method).upper()
                children = (
                    self.requests.labels(template, upper, _STATUS.get(status, f"{status // 100}xx")),
                    self.latency.labels(template, upper),
                )
                if len(self._children) < _MAX_CACHED:
                    self._children[key] = children
            children[0].inc()
            children[1].observe(elapsed)


def _template(scope: Scope) -> str:
    """The matched route's path template with its router's prefix (``/api/v1/devices/{device_id}``)."""
    path_format = getattr(scope.get("route"), "path_format", None)
    if not isinstance(path_format, str) or not path_format.startswith("/"):
        return _UNMATCHED
    # An included router's route knows its template without the prefix; the prefix is the path's leading segments
    # (templates here have no multi-segment ``:path`` parameters, so one template segment is one path segment).
    segments = str(scope.get("path", "")).split("/")
    depth = path_format.count("/")
    prefix = "/".join(segments[: len(segments) - depth]) if depth < len(segments) else ""
    return prefix + path_format


class FleetCollector(Collector):
    """Everything read from the database at a scrape (cached ``ttl_s`` seconds): devices, releases, gates, the
    controller and its lease (:mod:`.metrics_releases`), and the telemetry roll-ups (:mod:`.metrics_telemetry`)."""

    def __init__(self, app: FastAPI, ttl_s: float = 5.0, rollup: TelemetryRollup | None = None) -> None:
        self._app = app
        self._ttl_s = ttl_s
        self._cached: tuple[float, list[Metric]] | None = None
        self._lock = threading.Lock()
        self._labels: VersionLabels | None = None
        self.rollup = rollup or TelemetryRollup()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self._ttl_s:
                plane: ControlPlane | None = getattr(self._app.state, "plane", None)
                self._cached = (now, self._read(plane) if plane is not None else [])
            return list(self._cached[1])

    def _read(self, plane: ControlPlane) -> list[Metric]:
        if self._labels is None:
            self._labels = VersionLabels(plane)
        labels = self._labels
        self.rollup.refresh(plane)
        return [
            *_device_families(plane, labels),
            *release_metrics(plane, labels),
            *controller_metrics(plane, getattr(self._app.state, "controller", None)),
            *self.rollup.families(labels),
        ]


def _device_families(plane: ControlPlane, labels: VersionLabels) -> list[Metric]:
    by_state: Tally[tuple[str, ...]] = Tally()
    online: Tally[str] = Tally()
    by_health: Tally[tuple[str, ...]] = Tally()
    by_version: Tally[tuple[str, ...]] = Tally()
    columns = (DeviceRow.state, DeviceRow.device_class, DeviceRow.last_seen, DeviceRow.health, DeviceRow.phase)
    with Session(plane.engine) as session:
        rows = session.execute(select(*columns, DeviceRow.active_digest)).all()
    cutoff = online_cutoff(plane)
    classes = _bounded(Tally(row[1] for row in rows), MAX_DEVICE_CLASSES)
    versions = _bounded(Tally(row[5] or "" for row in rows), MAX_VERSIONS)
    for state, device_class, last_seen, health, phase, digest in rows:
        cls = device_class if device_class in classes else OTHER
        by_state[(state, cls)] += 1
        online[cls] += int(last_seen is not None and last_seen >= cutoff)
        by_health[(cls, health or "unknown", phase or "unknown")] += 1
        by_version[(cls, labels(digest) if (digest or "") in versions else OTHER)] += 1
    return [
        _gauge("slmops_devices", "Devices, by state and device class.", ["state", "device_class"], by_state),
        _gauge(
            "slmops_devices_online",
            "Devices heard from within the offline TTL, by device class.",
            ["device_class"],
            Tally({(cls,): n for cls, n in online.items()}),
        ),
        _gauge(
            "slmops_devices_health",
            "Devices by device class, reported health and phase.",
            ["device_class", "health", "phase"],
            by_health,
        ),
        _gauge(
            "slmops_devices_active_version",
            "Devices by device class and active model version.",
            ["device_class", "version"],
            by_version,
        ),
    ]


def online_cutoff(plane: ControlPlane) -> str:
    """The oldest ``last_seen`` of a device that :func:`~slmops.control.devices.is_online` calls online, as the
    tables store it (RFC 3339 UTC, second precision, sorts as text): one string comparison per device instead of
    parsing 10,000 timestamps at each scrape."""
    ttl_s = plane.settings.device_offline_after_s + plane.settings.device_offline_grace_s
    moment = plane.clock() - timedelta(seconds=ttl_s)
    if moment.microsecond:  # last_seen has whole seconds: the first one at or after the moment
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return iso(moment)


def _bounded(counts: Tally[str], limit: int) -> set[str]:
    """The ``limit`` most common values (ties broken by value, so a scrape is deterministic); others become OTHER.

    Device classes and active digests come from what devices report: a misbehaving device must not be able to
    add series without end."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {value for value, _ in ranked[:limit]}


def _gauge(name: str, documentation: str, labels: list[str], counts: Tally[tuple[str, ...]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, count in sorted(counts.items()):
        family.add_metric(list(values), count)
    return family


def install_metrics(
    app: FastAPI, scrape_token: str | None, cache_s: float = 5.0, *, enabled: bool | None = None
) -> CollectorRegistry:
    """Wrap ``app`` with request metrics and add ``GET /metrics`` (viewer token or ``scrape_token``).

    ``enabled`` None: follow ``settings.metrics`` of the app's plane (read at the first request, since the plane
    may only be opened when the app starts); False: the wrapper passes requests through and ``/metrics`` is 404.
    """
    registry = CollectorRegistry()
    registry.register(FleetCollector(app, cache_s))
    app.add_middleware(RequestMetrics, registry=registry, enabled=enabled)

    @app.get("/metrics", include_in_schema=False)
    def metrics(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
    ) -> Response:
        if not (enabled if enabled is not None else metrics_enabled(request.app)):
            raise NotFoundError("metrics are turned off on this server (SLMOPS_METRICS=false); turn them on to scrape")
        secret = credentials.credentials if credentials is not None else ""
        if not secret:
            raise AuthenticationError("no credential; send 'Authorization: Bearer <token>' (viewer or scrape token)")
        if not (scrape_token and hmac.compare_digest(secret.encode(), scrape_token.encode())):
            require_role(authenticate(request.app.state.plane, secret), "viewer")
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry
