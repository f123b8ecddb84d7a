"""Telemetry aggregation, pure: windows from runtime counters, merging windows, roll-ups, samples for the gates.

Everything here is a function of values (no clock, no I/O): the agent passes the window's start and length, the
control plane passes the stored windows. Histograms use :data:`~slmops.core.wire.LATENCY_BUCKETS_MS`; a window
carries counts only, never text.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from slmops.core.wire import LATENCY_BUCKETS_MS, DriftSummary, Histogram, TelemetryWindow
from slmops.errors import ConfigError

if TYPE_CHECKING:
    from slmops.telemetry.drift import RequestSummary

__all__ = [
    "ModelCounters",
    "Rollup",
    "WindowCounters",
    "bucket_index",
    "build_window",
    "histogram_from_ms",
    "histogram_samples",
    "merge_histograms",
    "merge_windows",
    "rfc3339",
    "rollup",
    "window_id",
    "windows_from_stats",
]


@dataclass(frozen=True)
class WindowCounters:
    """What the agent itself counted for one version in the window (the runtime does not see these)."""

    crashes: int = 0
    restarts: int = 0
    rollbacks: int = 0


def bucket_index(value_ms: float, bounds: Sequence[float] = LATENCY_BUCKETS_MS) -> int:
    """The bucket of a sample: the first ``i`` with ``value <= bounds[i]``; ``len(bounds)`` above the last bound."""
    return bisect.bisect_left(bounds, value_ms)


def histogram_from_ms(samples_ms: Iterable[float], bounds: Sequence[float] = LATENCY_BUCKETS_MS) -> Histogram:
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for value in samples_ms:
        counts[bucket_index(value, bounds)] += 1
        total += value
    return Histogram(bounds=list(bounds), counts=counts, sum=total)


def merge_histograms(a: Histogram, b: Histogram) -> Histogram:
    if list(a.bounds) != list(b.bounds) or len(a.counts) != len(b.counts):
        raise ConfigError(
            f"cannot merge histograms with different buckets ({len(a.bounds)} and {len(b.bounds)} bounds); "
            "agents and server must use the same LATENCY_BUCKETS_MS"
        )
    return Histogram(
        bounds=list(a.bounds), counts=[x + y for x, y in zip(a.counts, b.counts, strict=True)], sum=a.sum + b.sum
    )


def histogram_samples(histogram: Histogram) -> list[float]:
    """Representative values for the counted samples, for the rank tests and quantiles of ``core.gates``.

    The ``count`` samples of bucket ``(lo, hi]`` are spread evenly inside it (``lo + (hi - lo) * (j + 0.5) / count``),
    the assumption Prometheus' ``histogram_quantile`` makes: a quantile then moves smoothly with the data instead of
    jumping a whole bucket, and a uniform spread treats both groups of a rank test alike. The first bucket starts at
    0; the overflow bucket spans its lower bound to 1.5 times it. ``len(result) == sum(counts)``, and every value
    falls in its own bucket.
    """
    bounds = histogram.bounds
    values: list[float] = []
    for i, count in enumerate(histogram.counts):
        if count <= 0:
            continue
        if not bounds:
            values.extend([histogram.sum / max(1, sum(histogram.counts))] * count)
            continue
        if i >= len(bounds):
            low, high = bounds[-1], bounds[-1] * 1.5
        else:
            low, high = (bounds[i - 1] if i > 0 else 0.0), bounds[i]
        values.extend(low + (high - low) * (j + 0.5) / count for j in range(count))
    return values


def window_id(device_key: str, version_digest: str | None, window_start: str) -> str:
    """A stable id for (device, version, window): a retried or re-built window never counts twice."""
    text = f"{device_key}|{version_digest or '-'}|{window_start}"
    return "tw-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def rfc3339(moment: datetime) -> str:
    """RFC 3339 UTC with second precision (``YYYY-MM-DDTHH:MM:SSZ``), the year always four digits, so the text
    sorts as the moments do and parses back (glibc's ``%Y`` writes the year 181 as ``181``)."""
    m = moment.astimezone(UTC)
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}Z"


def build_window(
    *,
    id: str,
    version_digest: str | None,
    window_start: datetime,
    window_s: float,
    requests: int = 0,
    errors: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    latency_s: Sequence[float] = (),
    time_to_first_token_s: Sequence[float] = (),
    counters: WindowCounters | None = None,
    memory_rss_bytes: int | None = None,
    summaries: Sequence[RequestSummary] | None = None,
) -> TelemetryWindow:
    """A window from runtime counters (seconds, as ``runtime.stats`` keeps them) and the agent's own counters.

    ``summaries`` (one per request, numbers only) become the window's ``drift`` summary through
    :func:`slmops.telemetry.drift.summarize`; None leaves ``drift`` None (an agent that does not summarize).

    Per-token time and decode speed are estimated from the samples: for each request with a first-token time,
    ``(latency - ttft) / max(1, completion_tokens / requests - 1)``, a mean since per-request token counts are not
    kept. ``decode_tokens_per_s`` is ``1000 / mean per-token ms`` when there are samples.
    """
    counters = counters or WindowCounters()
    per_token_ms: list[float] = []
    ok_requests = max(0, requests - errors)
    if ok_requests and completion_tokens and latency_s and time_to_first_token_s:
        tokens_each = completion_tokens / ok_requests
        steps = max(1.0, tokens_each - 1)
        for total, first in zip(latency_s, time_to_first_token_s, strict=False):
            per_token_ms.append(max(0.0, total - first) * 1000 / steps)
    decode = None
    if per_token_ms:
        mean = sum(per_token_ms) / len(per_token_ms)
        decode = 1000 / mean if mean > 0 else None
    return TelemetryWindow(
        id=id,
        version_digest=version_digest,
        window_start=rfc3339(window_start),
        window_s=window_s,
        requests=requests,
        errors=errors,
        crashes=counters.crashes,
        restarts=counters.restarts,
        rollbacks=counters.rollbacks,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=histogram_from_ms(v * 1000 for v in latency_s),
        ttft_ms=histogram_from_ms(v * 1000 for v in time_to_first_token_s),
        per_token_ms=histogram_from_ms(per_token_ms),
        decode_tokens_per_s=decode,
        memory_rss_bytes=memory_rss_bytes,
        drift=_summarize(summaries) if summaries is not None else None,
    )


def _summarize(summaries: Sequence[RequestSummary]) -> DriftSummary:
    from slmops.telemetry.drift import summarize  # drift builds on this module's histograms

    return summarize(summaries)


def _merge_drift(a: DriftSummary | None, b: DriftSummary | None) -> DriftSummary | None:
    """The sum of two windows' drift summaries; a window without one adds nothing."""
    if a is None or b is None:
        return a if b is None else b
    from slmops.telemetry.drift import merge_summaries  # drift builds on this module's histograms

    return merge_summaries(a, b)


def _max_optional(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def merge_windows(a: TelemetryWindow, b: TelemetryWindow, *, id: str | None = None) -> TelemetryWindow:
    """The sum of two windows of the same version: counts and histograms add, memory takes the peak, the span covers
    both, drift summaries add (a window without one adds nothing). All of that is associative and commutative (ids
    aside). The decode speed is only approximately so: a mean weighted by completion tokens (the wire keeps no
    separate weight for it)."""
    if a.version_digest != b.version_digest:
        raise ConfigError(
            f"cannot merge telemetry of version {a.version_digest} with {b.version_digest}; roll up per version"
        )
    start = min(a.window_start, b.window_start)
    end = max(_end(a), _end(b))
    decode: float | None = None
    weights = [(w.decode_tokens_per_s, max(1, w.completion_tokens)) for w in (a, b) if w.decode_tokens_per_s]
    if weights:
        decode = sum(v * n for v, n in weights if v) / sum(n for _, n in weights)
    return TelemetryWindow(
        id=id or min(a.id, b.id),
        version_digest=a.version_digest,
        window_start=start,
        window_s=min(86400.0, max(end - _parse(start).timestamp(), a.window_s, b.window_s)),
        requests=a.requests + b.requests,
        errors=a.errors + b.errors,
        crashes=a.crashes + b.crashes,
        restarts=a.restarts + b.restarts,
        rollbacks=a.rollbacks + b.rollbacks,
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        latency_ms=merge_histograms(a.latency_ms, b.latency_ms),
        ttft_ms=merge_histograms(a.ttft_ms, b.ttft_ms),
        per_token_ms=merge_histograms(a.per_token_ms, b.per_token_ms),
        decode_tokens_per_s=decode,
        memory_rss_bytes=_max_optional(a.memory_rss_bytes, b.memory_rss_bytes),
        drift=_merge_drift(a.drift, b.drift),
    )


def _parse(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _end(window: TelemetryWindow) -> float:
    return _parse(window.window_start).timestamp() + window.window_s


@dataclass(frozen=True)
class Rollup:
    """The totals of one (version, device class): windows and devices counted, sums, merged histograms."""

    version_digest: str | None
    device_class: str
    windows: int = 0
    devices: int = 0
    requests: int = 0
    errors: int = 0
    crashes: int = 0
    restarts: int = 0
    rollbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: Histogram = field(default_factory=Histogram)
    ttft_ms: Histogram = field(default_factory=Histogram)
    per_token_ms: Histogram = field(default_factory=Histogram)


def rollup(windows: Iterable[tuple[str, str, TelemetryWindow]]) -> dict[tuple[str | None, str], Rollup]:
    """Totals per (version digest, device class) over ``(device_id, device_class, window)`` triples."""
    sums: dict[tuple[str | None, str], dict[str, int]] = {}
    hists: dict[tuple[str | None, str], dict[str, Histogram]] = {}
    devices: dict[tuple[str | None, str], set[str]] = {}
    count_fields = ("requests", "errors", "crashes", "restarts", "rollbacks", "prompt_tokens", "completion_tokens")
    hist_fields = ("latency_ms", "ttft_ms", "per_token_ms")
    for device_id, device_class, window in windows:
        key = (window.version_digest, device_class)
        total = sums.setdefault(key, dict.fromkeys(("windows", *count_fields), 0))
        total["windows"] += 1
        for name in count_fields:
            total[name] += int(getattr(window, name))
        merged = hists.setdefault(key, {name: Histogram() for name in hist_fields})
        for name in hist_fields:
            merged[name] = merge_histograms(merged[name], getattr(window, name))
        devices.setdefault(key, set()).add(device_id)
    return {key: _rollup(key, total, hists[key], len(devices[key])) for key, total in sums.items()}


def _rollup(
    key: tuple[str | None, str], total: Mapping[str, int], hists: Mapping[str, Histogram], devices: int
) -> Rollup:
    return Rollup(
        version_digest=key[0],
        device_class=key[1],
        devices=devices,
        windows=total["windows"],
        requests=total["requests"],
        errors=total["errors"],
        crashes=total["crashes"],
        restarts=total["restarts"],
        rollbacks=total["rollbacks"],
        prompt_tokens=total["prompt_tokens"],
        completion_tokens=total["completion_tokens"],
        latency_ms=hists["latency_ms"],
        ttft_ms=hists["ttft_ms"],
        per_token_ms=hists["per_token_ms"],
    )


class ModelCounters(Protocol):
    """What the local API counted for one model in a window (``slmops.runtime.stats.ModelStats`` has this shape)."""

    @property
    def requests(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def latency_s(self) -> Sequence[float]: ...
    @property
    def time_to_first_token_s(self) -> Sequence[float]: ...
    @property
    def summaries(self) -> Sequence[RequestSummary]: ...


def windows_from_stats(
    *,
    device_key: str,
    window_start: datetime,
    window_s: float,
    models: Mapping[str, ModelCounters],
    digest_of: Mapping[str, str],
    counters: Mapping[str | None, WindowCounters],
    serving: str | None,
    memory_rss_bytes: int | None = None,
) -> list[TelemetryWindow]:
    """One window per version seen in the window: each model the local API served (its id mapped to a version
    digest by ``digest_of``; unknown ids count under ``None``), each version with agent counters, and the version
    being served even when idle (an idle window is exposure for the crash and rollback gates). Every window carries
    a drift summary of its requests' ``summaries`` (empty for an idle window)."""
    merged: dict[str | None, list[ModelCounters]] = {}
    for model_id, stats in models.items():
        merged.setdefault(digest_of.get(model_id), []).append(stats)
    digests: list[str | None] = list(merged)
    for digest in [*counters, serving]:
        if digest not in digests and (digest is not None or digest in counters):
            digests.append(digest)
    start_key = f"{window_start.timestamp():.6f}"
    result = []
    for digest in digests:
        parts = merged.get(digest, [])
        result.append(
            build_window(
                id=window_id(device_key, digest, start_key),
                version_digest=digest,
                window_start=window_start,
                window_s=window_s,
                requests=sum(p.requests for p in parts),
                errors=sum(p.errors for p in parts),
                prompt_tokens=sum(p.prompt_tokens for p in parts),
                completion_tokens=sum(p.completion_tokens for p in parts),
                latency_s=[v for p in parts for v in p.latency_s],
                time_to_first_token_s=[v for p in parts for v in p.time_to_first_token_s],
                counters=counters.get(digest),
                memory_rss_bytes=memory_rss_bytes if digest == serving else None,
                summaries=[s for p in parts for s in p.summaries],
            )
        )
    return result
