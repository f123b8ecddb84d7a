"""The control plane's ``GET /metrics``: HTTP traffic per route template and fleet gauges, in Prometheus text.

Each app gets its own :class:`~prometheus_client.CollectorRegistry`. Requests are counted by an ASGI wrapper with
the matched route's path template (never the raw path). Fleet gauges are computed at scrape time from one device
listing, cached for a few seconds; labels are bounded (state, class, version), never per device.
"""

from __future__ import annotations

import hmac
import time
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Annotated

from fastapi import FastAPI, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops.control._deps import bearer
from slmops.control.auth import require_role
from slmops.control.credentials import authenticate
from slmops.control.devices import list_devices
from slmops.control.plane import ControlPlane
from slmops.errors import AuthenticationError

__all__ = ["FleetCollector", "RequestMetrics", "install_metrics"]

_UNMATCHED = "unmatched"


class RequestMetrics:
    """ASGI wrapper counting requests and their latency per route template, method and status class."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
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
            template = _template(scope)
            method = str(scope.get("method", "")).upper()
            self.requests.labels(template, method, f"{status // 100}xx").inc()
            self.latency.labels(template, method).observe(time.perf_counter() - start)


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
    """Fleet gauges read from the database once per scrape (cached ``ttl_s`` seconds)."""

    def __init__(self, app: FastAPI, ttl_s: float = 5.0) -> None:
        self._app = app
        self._ttl_s = ttl_s
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterable[Metric]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] >= self._ttl_s:
            plane: ControlPlane | None = getattr(self._app.state, "plane", None)
            self._cached = (now, self._read(plane) if plane is not None else [])
        return list(self._cached[1])

    @staticmethod
    def _read(plane: ControlPlane) -> list[Metric]:
        by_state: Tally[tuple[str, ...]] = Tally()
        online: Tally[str] = Tally()
        by_health: Tally[tuple[str, ...]] = Tally()
        by_version: Tally[tuple[str, ...]] = Tally()
        for device in list_devices(plane):
            by_state[(device.state, device.device_class)] += 1
            online[device.device_class] += int(device.online)
            by_health[(device.device_class, device.health or "unknown", device.phase or "unknown")] += 1
            by_version[(device.device_class, device.active_version or "none")] += 1
        families: list[Metric] = [
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
        return families


def _gauge(name: str, documentation: str, labels: list[str], counts: Tally[tuple[str, ...]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, count in sorted(counts.items()):
        family.add_metric(list(values), count)
    return family


def install_metrics(app: FastAPI, scrape_token: str | None, cache_s: float = 5.0) -> CollectorRegistry:
    """Wrap ``app`` with request metrics and add ``GET /metrics`` (viewer token or ``scrape_token``)."""
    registry = CollectorRegistry()
    registry.register(FleetCollector(app, cache_s))
    app.add_middleware(RequestMetrics, registry=registry)

    @app.get("/metrics", include_in_schema=False)
    def metrics(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
    ) -> Response:
        secret = credentials.credentials if credentials is not None else ""
        if not secret:
            raise AuthenticationError("no credential; send 'Authorization: Bearer <token>' (viewer or scrape token)")
        if not (scrape_token and hmac.compare_digest(secret.encode(), scrape_token.encode())):
            require_role(authenticate(request.app.state.plane, secret), "viewer")
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry
