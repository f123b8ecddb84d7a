from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from slmops.core.wire import Histogram, TelemetryWindow
from slmops.errors import ConfigError
from slmops.telemetry.aggregate import histogram_from_ms
from slmops.telemetry.changepoint import cusum_alarms, first_alarm, null_estimate
from slmops.telemetry.drift import (
    FINISH_REASONS,
    NLL_BUCKETS,
    TOKEN_BUCKETS,
    DriftConfig,
    DriftPoint,
    DriftSummary,
    ReferenceSpec,
    RequestSummary,
    compare,
    drift_report,
    drift_series,
    merge_summaries,
    psi,
    select_reference,
    shift_start,
    summarize,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)
counts = st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=30).filter(lambda c: sum(c) > 0)


@given(counts)
def test_psi_of_identical_distributions_is_zero(c: list[int]) -> None:
    assert psi(c, c) == 0.0
    assert psi(c, [3 * v for v in c]) == pytest.approx(0.0, abs=1e-12)  # shares, not counts


@given(st.data())
def test_psi_is_non_negative_and_symmetric(data: st.DataObject) -> None:
    a = data.draw(counts)
    b = data.draw(st.lists(st.integers(0, 10_000), min_size=len(a), max_size=len(a)).filter(lambda c: sum(c) > 0))
    value = psi(a, b)
    assert value >= 0.0 and math.isfinite(value)
    assert value == pytest.approx(psi(b, a))


def test_psi_matches_the_formula_and_floors_empty_buckets() -> None:
    ref, cur = [50, 50, 0], [25, 75, 0]
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert psi(ref, cur) == pytest.approx(expected)
    # a bucket empty on one side only counts as the floor, not as zero (which would be infinite)
    assert psi([100, 0], [99, 1], floor=1e-4) == pytest.approx(
        (0.99 - 1.0) * math.log(0.99) + (0.01 - 1e-4) * math.log(0.01 / 1e-4)
    )
    with pytest.raises(ValueError, match="same buckets"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="positive total"):
        psi([0, 0], [1, 2])


requests = st.builds(
    RequestSummary,
    prompt_tokens=st.integers(1, 40_000),
    completion_tokens=st.integers(0, 4_000),
    finish_reason=st.sampled_from([*FINISH_REASONS, "weird"]),
    prompt_nll=st.none() | st.floats(0, 20),
)


@settings(deadline=None)
@given(st.lists(requests, max_size=40), st.lists(requests, max_size=40))
def test_merging_summaries_equals_summarizing_everything(a: list[RequestSummary], b: list[RequestSummary]) -> None:
    merged = merge_summaries(summarize(a), summarize(b))
    whole = summarize(a + b)
    assert merged.requests == whole.requests == len(a) + len(b)
    assert merged.prompt_tokens.counts == whole.prompt_tokens.counts
    assert merged.completion_tokens.counts == whole.completion_tokens.counts
    assert merged.prompt_nll.counts == whole.prompt_nll.counts
    assert merged.prompt_nll.sum == pytest.approx(whole.prompt_nll.sum)
    assert {k: v for k, v in merged.finish_reasons.items() if v} == whole.finish_reasons
    assert merged.empty_outputs == whole.empty_outputs


def test_summarize_counts_only_numbers() -> None:
    summary = summarize(
        [
            RequestSummary(10, 0, "stop", 2.0),
            RequestSummary(300, 512, "length", 3.0),
            RequestSummary(5, 7, "function_call", None),
            RequestSummary(5, 7, "stop", None, empty=True),  # e.g. whitespace only
        ]
    )
    assert summary.requests == 4 and summary.empty_outputs == 2
    assert summary.finish_reasons == {"stop": 2, "length": 1, "other": 1}
    assert summary.prompt_tokens.bounds == list(TOKEN_BUCKETS) and sum(summary.prompt_tokens.counts) == 4
    assert summary.prompt_nll.bounds == list(NLL_BUCKETS) and sum(summary.prompt_nll.counts) == 2
    assert summary.prompt_nll.sum == pytest.approx(5.0)  # sum / count is the window's mean prompt NLL
    assert DriftSummary.model_validate_json(summary.model_dump_json()) == summary
    with pytest.raises(ValidationError, match="cannot exceed"):
        DriftSummary(requests=1, empty_outputs=2)
    with pytest.raises(ValidationError, match="extra"):
        DriftSummary.model_validate({"prompt_text": "hello"})


def _window(i: int, start: datetime, latency_ms: list[float]) -> TelemetryWindow:
    return TelemetryWindow(
        id=f"w{i}",
        window_start=start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        window_s=300,
        latency_ms=histogram_from_ms(latency_ms),
    )


def test_series_merges_the_windows_of_each_step() -> None:
    s1 = summarize([RequestSummary(10, 5)])
    s2 = summarize([RequestSummary(20, 5), RequestSummary(30, 0)])
    windows = [
        (_window(1, T0 + timedelta(minutes=5), [10.0]), s1),
        (_window(2, T0 + timedelta(minutes=50), [20.0, 30.0]), s2),
        (_window(3, T0 + timedelta(minutes=20), [40.0]), None),
        (_window(4, T0 + timedelta(hours=1, minutes=1), [50.0]), None),
    ]
    points = drift_series(reversed(windows), step_s=3600)
    assert [p.start for p in points] == [T0, T0 + timedelta(hours=1)]
    first, second = points
    assert sum(first.latency_ms.counts) == 4 and first.latency_ms.sum == pytest.approx(100.0)
    assert first.summary is not None and first.summary.requests == 3 and first.summary.empty_outputs == 1
    assert second.summary is None
    with pytest.raises(ConfigError, match="step_s"):
        drift_series([], step_s=0)


def _points(n: int) -> list[DriftPoint]:
    return [DriftPoint(start=T0 + timedelta(hours=i)) for i in range(n)]


def test_reference_selection() -> None:
    points = _points(10)
    assert select_reference(list(reversed(points)), ReferenceSpec(first_windows=3)) == points[:3]
    assert select_reference(points, ReferenceSpec(first_s=2.5 * 3600)) == points[:3]
    pinned = ReferenceSpec(since=T0 + timedelta(hours=4), until=T0 + timedelta(hours=6))
    assert select_reference(points, pinned) == points[4:6]
    assert select_reference([], ReferenceSpec(first_s=60)) == []
    for bad in ({}, {"first_windows": 2, "first_s": 60}, {"since": T0}, {"since": T0, "until": T0}):
        with pytest.raises(ValidationError):
            ReferenceSpec.model_validate(bad)


def _point(i: int, prompts: list[int], nll: float = 2.5, empty: int = 0) -> DriftPoint:
    reqs = [RequestSummary(p, 0 if k < empty else 40, "stop", nll) for k, p in enumerate(prompts)]
    return DriftPoint(
        start=T0 + timedelta(hours=i), latency_ms=histogram_from_ms([100.0] * len(prompts)), summary=summarize(reqs)
    )


def test_compare_levels_need_both_significance_and_size() -> None:
    config = DriftConfig(min_samples=100)
    ref = [_point(0, [20] * 300 + [100] * 300)]
    same = [_point(1, [20] * 310 + [100] * 290)]
    moved = [_point(2, [20] * 200 + [100] * 400)]
    far = [_point(3, [100] * 300 + [1000] * 300, nll=6.0)]
    tiny = [_point(4, [20] * 20)]

    by = {v.signal: v for v in compare(ref, same, config)}
    assert by["prompt_tokens"].level == "ok" and by["prompt_tokens"].test == "chi2"
    assert by["latency"].level == "ok" and by["latency"].psi == 0.0
    assert by["empty_output"].test == "fisher" and by["empty_output"].numbers["current_rate"] == 0.0

    moved_v = compare(ref, moved, config, ["prompt_tokens"])[0]
    assert moved_v.level == "warn" and 0.1 <= (moved_v.psi or 0) < 0.25 and (moved_v.p_value or 1) < 1e-6
    far_by = {v.signal: v for v in compare(ref, far, config)}
    assert far_by["prompt_tokens"].level == "alert" and far_by["prompt_nll"].level == "alert"
    assert far_by["prompt_nll"].numbers["current_mean"] == pytest.approx(6.0)
    assert "PSI" in far_by["prompt_nll"].reason and "reference n=600" in far_by["prompt_nll"].reason

    few = compare(ref, tiny, config, ["prompt_tokens"])[0]
    assert few.level == "insufficient" and few.psi is None and few.current_n == 20
    assert compare(ref, [DriftPoint(start=T0)], config, ["finish_reason"])[0].level == "insufficient"


def test_empty_output_rate_shift_is_judged_by_fisher() -> None:
    config = DriftConfig(min_samples=100, psi_warn=0.02, psi_alert=0.05)
    ref = [_point(0, [20] * 1000, empty=10)]
    cur = [_point(1, [20] * 1000, empty=60)]
    verdict = compare(ref, cur, config, ["empty_output"])[0]
    assert verdict.numbers == {"reference_rate": 0.01, "current_rate": 0.06}
    assert verdict.level == "alert" and verdict.test == "fisher" and (verdict.p_value or 1) < 1e-8


def test_windows_with_other_buckets_are_refused() -> None:
    odd = DriftPoint(start=T0, latency_ms=Histogram(bounds=[1.0], counts=[1, 2]))
    with pytest.raises(ConfigError, match="different buckets"):
        compare([_point(0, [20])], [odd], signals=["latency"])
    with pytest.raises(ConfigError, match="different buckets"):
        compare([_point(0, [20]), odd], [_point(1, [20])], signals=["latency"])


def test_config_checks_its_thresholds() -> None:
    with pytest.raises(ValidationError, match="psi_alert"):
        DriftConfig(psi_warn=0.3, psi_alert=0.2)
    with pytest.raises(ValidationError):
        DriftConfig(alpha=1.5)


def test_cusum_finds_the_start_of_the_run_that_crossed() -> None:
    values: list[float | None] = [0.0, 0.1, -0.2, None, 0.0, 3.0, 3.0, None, 3.0, 0.0]
    alarm = first_alarm(values, target=0.0, scale=1.0, k=0.5, h=5.0)
    assert alarm is not None and (alarm.began, alarm.detected) == (5, 8)  # 2.5 + 2.5 + 2.5 > 5
    assert alarm.statistic == pytest.approx(7.5)
    assert first_alarm([0.4] * 100, target=0.0, scale=1.0, k=0.5, h=5.0) is None
    assert len(cusum_alarms([10.0] * 4, target=0.0, scale=1.0, k=0.5, h=5.0)) == 4  # restarts after each
    assert null_estimate([], scale_floor=0.1) == (0.0, 0.1)
    assert null_estimate([1.0, 1.0, 1.0], scale_floor=0.1) == (1.0, 0.1)
    mean, scale = null_estimate([1.0, 3.0], scale_floor=0.1)
    assert mean == 2.0 and scale == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError):
        cusum_alarms([1.0], target=0.0, scale=0.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.none() | st.floats(-10, 10), max_size=60), st.floats(0, 2), st.floats(0.1, 10))
def test_cusum_alarms_are_ordered_and_inside_the_series(values: list[float | None], k: float, h: float) -> None:
    alarms = cusum_alarms(values, target=0.0, scale=1.0, k=k, h=h)
    previous = -1
    for alarm in alarms:
        assert previous < alarm.began <= alarm.detected < len(values)
        assert values[alarm.detected] is not None and alarm.statistic > h
        previous = alarm.detected


def test_shift_start_and_report_on_a_step_change() -> None:
    base = [20] * 200 + [100] * 200
    points = [_point(i, base) for i in range(12)] + [_point(12 + i, [100] * 300 + [20] * 100) for i in range(4)]
    reference = select_reference(points, ReferenceSpec(first_windows=8))
    estimate = shift_start(reference, points[8:], "prompt_tokens")
    assert estimate.began == T0 + timedelta(hours=12) and estimate.detected == T0 + timedelta(hours=12)
    assert estimate.window_psi[:4] == [0.0, 0.0, 0.0, 0.0]
    assert estimate.null_mean == 0.0 and estimate.null_scale == DriftConfig().cusum_scale_floor
    quiet = shift_start(reference, points[8:], "latency")
    assert quiet.began is None and quiet.detected is None

    report = drift_report(points, ReferenceSpec(first_windows=8), current_windows=2, config=DriftConfig(min_samples=50))
    assert report.reference_since == T0 and report.reference_until == T0 + timedelta(hours=7)
    assert report.current_since == T0 + timedelta(hours=14)
    levels = {v.signal: v.level for v in report.verdicts}
    assert levels["prompt_tokens"] == "alert" and levels["latency"] == "ok"
    assert {s.signal: s.began for s in report.shifts}["prompt_tokens"] == T0 + timedelta(hours=12)
    with pytest.raises(ConfigError, match="current_windows"):
        drift_report(points, ReferenceSpec(first_windows=8), current_windows=0)
