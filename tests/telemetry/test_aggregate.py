from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.core.gates import GateConfig, judge_latency
from slmops.core.wire import LATENCY_BUCKETS_MS, NLL_BUCKETS, TOKEN_BUCKETS, DriftSummary, Histogram, TelemetryWindow
from slmops.errors import ConfigError
from slmops.runtime.stats import RequestStats
from slmops.telemetry import (
    WindowCounters,
    bucket_index,
    build_window,
    histogram_from_ms,
    histogram_samples,
    merge_histograms,
    merge_windows,
    rollup,
    window_id,
    windows_from_stats,
)
from slmops.telemetry.drift import RequestSummary, summarize

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "a" * 64


def test_bucket_assignment_follows_the_wire_definition() -> None:
    # counts[i] holds samples <= bounds[i] and > bounds[i-1]; the last count everything above the last bound
    assert bucket_index(0.0) == 0
    assert bucket_index(5.0) == 0
    assert bucket_index(5.0001) == 1
    assert bucket_index(60000.0) == len(LATENCY_BUCKETS_MS) - 1
    assert bucket_index(60000.1) == len(LATENCY_BUCKETS_MS)
    h = histogram_from_ms([1, 5, 7, 100, 1e9])
    assert sum(h.counts) == 5 and h.counts[0] == 2 and h.counts[1] == 1 and h.counts[-1] == 1
    assert h.counts[LATENCY_BUCKETS_MS.index(100)] == 1
    assert h.sum == pytest.approx(1 + 5 + 7 + 100 + 1e9)


def test_a_window_is_built_from_runtime_stats_and_agent_counters() -> None:
    window = build_window(
        id="w1",
        version_digest=DIGEST,
        window_start=T0,
        window_s=60,
        requests=4,
        errors=1,
        prompt_tokens=40,
        completion_tokens=33,  # 11 per successful request
        latency_s=(0.120, 0.240, 0.060),
        time_to_first_token_s=(0.020, 0.040, 0.010, 0.5),
        counters=WindowCounters(crashes=1, restarts=2, rollbacks=1),
        memory_rss_bytes=123,
    )
    assert window.window_start == "2026-01-01T12:00:00Z" and window.window_s == 60
    assert (window.requests, window.errors, window.crashes, window.restarts, window.rollbacks) == (4, 1, 1, 2, 1)
    assert (window.prompt_tokens, window.completion_tokens, window.memory_rss_bytes) == (40, 33, 123)
    assert sum(window.latency_ms.counts) == 3 and window.latency_ms.sum == pytest.approx(420)
    assert sum(window.ttft_ms.counts) == 4
    # per token: (latency - ttft) / (11 - 1) -> 10 ms, 20 ms, 5 ms
    assert sum(window.per_token_ms.counts) == 3 and window.per_token_ms.sum == pytest.approx(35)
    assert window.decode_tokens_per_s == pytest.approx(1000 / (35 / 3))
    assert TelemetryWindow.model_validate_json(window.model_dump_json()) == window


def test_an_idle_window_has_empty_histograms_and_no_speed() -> None:
    window = build_window(id="w", version_digest=None, window_start=T0, window_s=60)
    assert window.requests == 0 and sum(window.latency_ms.counts) == 0 and window.decode_tokens_per_s is None


def test_window_ids_are_stable_per_device_version_and_window() -> None:
    a = window_id("dev-1", DIGEST, "2026-01-01T12:00:00Z")
    assert a == window_id("dev-1", DIGEST, "2026-01-01T12:00:00Z")
    assert a != window_id("dev-2", DIGEST, "2026-01-01T12:00:00Z")
    assert a != window_id("dev-1", None, "2026-01-01T12:00:00Z")
    assert a != window_id("dev-1", DIGEST, "2026-01-01T12:01:00Z")
    assert len(a) <= 64


def test_histograms_with_other_buckets_do_not_merge() -> None:
    with pytest.raises(ConfigError, match="different buckets"):
        merge_histograms(Histogram(), Histogram(bounds=[1.0], counts=[0, 0]))


samples_ms = st.lists(st.floats(min_value=0, max_value=100_000, allow_nan=False), max_size=20)


@st.composite
def windows(draw: st.DrawFn) -> TelemetryWindow:
    lat = draw(samples_ms)
    return TelemetryWindow(
        id=f"w{draw(st.integers(0, 10**6))}",
        version_digest=DIGEST,
        window_start=(T0 + timedelta(minutes=draw(st.integers(0, 100)))).strftime("%Y-%m-%dT%H:%M:%SZ"),
        window_s=60,
        requests=draw(st.integers(0, 1000)),
        errors=draw(st.integers(0, 10)),
        crashes=draw(st.integers(0, 3)),
        restarts=draw(st.integers(0, 3)),
        rollbacks=draw(st.integers(0, 3)),
        prompt_tokens=draw(st.integers(0, 10**6)),
        completion_tokens=draw(st.integers(0, 10**6)),
        latency_ms=histogram_from_ms(lat),
        ttft_ms=histogram_from_ms(draw(samples_ms)),
        memory_rss_bytes=draw(st.none() | st.integers(0, 10**10)),
        drift=draw(st.none() | drift_summaries()),
    )


@st.composite
def drift_summaries(draw: st.DrawFn) -> DriftSummary:
    requests = st.builds(
        RequestSummary,
        prompt_tokens=st.integers(0, 5000),
        completion_tokens=st.integers(0, 600),
        finish_reason=st.sampled_from(["stop", "length", "error", "weird"]),
        prompt_nll=st.none() | st.floats(0, 12, allow_nan=False),
    )
    return summarize(draw(st.lists(requests, max_size=20)))


def _drift_key(d: DriftSummary | None) -> tuple[object, ...] | None:
    if d is None:
        return None
    return (
        d.requests,
        tuple(d.prompt_tokens.counts),
        tuple(d.completion_tokens.counts),
        tuple(sorted(d.finish_reasons.items())),
        d.empty_outputs,
        tuple(d.prompt_nll.counts),
        round(d.prompt_nll.sum, 6),
    )


def _key(w: TelemetryWindow) -> tuple[object, ...]:
    """Everything merge promises to keep exactly (float sums rounded)."""
    return (
        w.version_digest,
        w.window_start,
        round(w.window_s, 6),
        w.requests,
        w.errors,
        w.crashes,
        w.restarts,
        w.rollbacks,
        w.prompt_tokens,
        w.completion_tokens,
        tuple(w.latency_ms.counts),
        round(w.latency_ms.sum, 3),
        tuple(w.ttft_ms.counts),
        round(w.ttft_ms.sum, 3),
        tuple(w.per_token_ms.counts),
        w.memory_rss_bytes,
        _drift_key(w.drift),
    )


@settings(max_examples=60, deadline=None)
@given(windows(), windows(), windows())
def test_merge_is_associative_and_commutative(a: TelemetryWindow, b: TelemetryWindow, c: TelemetryWindow) -> None:
    assert _key(merge_windows(a, b)) == _key(merge_windows(b, a))
    assert _key(merge_windows(merge_windows(a, b), c)) == _key(merge_windows(a, merge_windows(b, c)))
    merged = merge_windows(a, b)
    assert merged.requests == a.requests + b.requests
    assert sum(merged.latency_ms.counts) == sum(a.latency_ms.counts) + sum(b.latency_ms.counts)
    drifts = [w.drift for w in (a, b) if w.drift is not None]
    assert (merged.drift is None) == (not drifts)
    if merged.drift is not None:
        assert merged.drift.requests == sum(d.requests for d in drifts)


def test_a_window_summarizes_its_requests_for_drift() -> None:
    summaries = [
        RequestSummary(prompt_tokens=10, completion_tokens=5, finish_reason="stop", prompt_nll=2.6),
        RequestSummary(prompt_tokens=300, completion_tokens=64, finish_reason="length", prompt_nll=None),
        RequestSummary(prompt_tokens=3, completion_tokens=0, finish_reason="stop", prompt_nll=7.5),
        RequestSummary(prompt_tokens=8, completion_tokens=0, finish_reason="error"),
    ]
    window = build_window(
        id="w", version_digest=DIGEST, window_start=T0, window_s=60, requests=4, errors=1, summaries=summaries
    )
    drift = window.drift
    assert drift is not None
    assert drift.requests == 4 and drift.empty_outputs == 2
    assert drift.finish_reasons == {"stop": 2, "length": 1, "error": 1}
    assert drift.prompt_tokens.counts[bucket_index(300, TOKEN_BUCKETS)] == 1
    assert drift.prompt_tokens.sum == 321 and drift.completion_tokens.sum == 69
    assert sum(drift.prompt_nll.counts) == 2 and drift.prompt_nll.sum == pytest.approx(10.1)
    assert drift.prompt_nll.counts[bucket_index(2.6, NLL_BUCKETS)] == 1
    assert build_window(id="w", version_digest=DIGEST, window_start=T0, window_s=60).drift is None


def test_windows_from_runtime_stats_carry_the_drift_summary_per_version() -> None:
    stats = RequestStats()
    stats.record("m@1", ok=True, prompt_tokens=12, completion_tokens=4, finish_reason="length", prompt_nll=3.1)
    stats.record("m@1", ok=False, prompt_tokens=7)
    stats.record("m@2", ok=True, prompt_tokens=20, completion_tokens=1, empty=True)
    other = "sha256:" + "b" * 64
    windows = windows_from_stats(
        device_key="dev",
        window_start=T0,
        window_s=60,
        models=stats.take().models,
        digest_of={"m@1": DIGEST, "m@2": other},
        counters={},
        serving=DIGEST,
    )
    by_digest = {w.version_digest: w.drift for w in windows}
    first, second = by_digest[DIGEST], by_digest[other]
    assert first is not None and second is not None
    assert first.requests == 2 and first.finish_reasons == {"length": 1, "error": 1} and first.empty_outputs == 1
    assert sum(first.prompt_nll.counts) == 1 and first.prompt_nll.sum == pytest.approx(3.1)
    assert second.requests == 1 and second.empty_outputs == 1 and second.finish_reasons == {"stop": 1}
    idle = windows_from_stats(
        device_key="dev", window_start=T0, window_s=60, models={}, digest_of={}, counters={}, serving=DIGEST
    )
    assert [w.drift.requests if w.drift else None for w in idle] == [0]


def test_windows_of_different_versions_do_not_merge() -> None:
    a = build_window(id="a", version_digest=DIGEST, window_start=T0, window_s=60)
    b = build_window(id="b", version_digest=None, window_start=T0, window_s=60)
    with pytest.raises(ConfigError, match="roll up per version"):
        merge_windows(a, b)


def test_rollup_sums_per_version_and_device_class() -> None:
    def w(i: int, digest: str, requests: int, lat: list[float]) -> TelemetryWindow:
        return TelemetryWindow(
            id=f"w{i}",
            version_digest=digest,
            window_start="2026-01-01T12:00:00Z",
            window_s=60,
            requests=requests,
            errors=1,
            crashes=i % 2,
            latency_ms=histogram_from_ms(lat),
        )

    other = "sha256:" + "b" * 64
    result = rollup(
        [
            ("dev-1", "small", w(1, DIGEST, 10, [10, 20])),
            ("dev-1", "small", w(2, DIGEST, 5, [30])),
            ("dev-2", "small", w(3, DIGEST, 1, [])),
            ("dev-3", "large", w(4, DIGEST, 7, [1000])),
            ("dev-3", "large", w(5, other, 3, [1])),
        ]
    )
    small = result[(DIGEST, "small")]
    assert (small.windows, small.devices, small.requests, small.errors, small.crashes) == (3, 2, 16, 3, 2)
    assert sum(small.latency_ms.counts) == 3 and small.latency_ms.sum == 60
    large = result[(DIGEST, "large")]
    assert (large.windows, large.devices, large.requests) == (1, 1, 7)
    assert result[(other, "large")].requests == 3
    assert set(result) == {(DIGEST, "small"), (DIGEST, "large"), (other, "large")}


@given(st.lists(st.integers(0, 50), min_size=len(LATENCY_BUCKETS_MS) + 1, max_size=len(LATENCY_BUCKETS_MS) + 1))
def test_histogram_samples_preserve_counts_and_buckets(counts: list[int]) -> None:
    histogram = Histogram(counts=counts)
    samples = histogram_samples(histogram)
    assert len(samples) == sum(counts)
    assert histogram_from_ms(samples).counts == counts  # each representative falls in its own bucket


def test_histogram_samples_feed_the_latency_gate() -> None:
    pytest.importorskip("scipy")
    baseline = histogram_from_ms([40.0] * 200 + [80.0] * 50)
    slow = histogram_from_ms([90.0] * 200 + [180.0] * 50)
    gate = GateConfig(name="p95", kind="latency", min_samples=50, max_ratio=1.2)
    assert judge_latency(histogram_samples(slow), histogram_samples(baseline), gate).verdict == "fail"
    assert judge_latency(histogram_samples(baseline), histogram_samples(baseline), gate).verdict == "pass"
