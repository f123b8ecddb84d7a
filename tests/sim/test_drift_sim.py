"""The simulator's drift option: windows of the shifted class change distribution after the shift time, the other
classes' do not, and the server-side comparison (slmops.telemetry.drift) finds the shift within a few windows."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from slmops.core.wire import DriftSummary
from slmops.errors import BlueprintError
from slmops.sim.agent import SimAgent
from slmops.sim.fleet import FleetSpec, parse_fleet
from slmops.sim.runtime import SimulatedRuntime
from slmops.telemetry.drift import DriftConfig, DriftPoint, Signal, compare, merge_summaries, shift_start, summarize

WINDOW_S = 60.0
SHIFT_WINDOW = 12  # the first window that starts at or after after_s
# Windows after the shift's first window by which shift_start alarms, for the factors below (20 devices x 20
# requests per step): it alarmed in that very first window for both signals when this was written.
DETECTED_WITHIN = 1
DIGEST = "sha256:" + "ab" * 32

FLEET = f"""
seed: 11
devices:
  - {{profile: pi-2gb, count: 20}}
  - {{profile: till-8gb, count: 20}}
  - {{profile: workstation-16gb, count: 20}}
runtime:
  requests_per_window: 20
  telemetry_window_s: {WINDOW_S}
  traffic: {{prompt_tokens_median: 120, prompt_nll_mean: 3.2, prompt_nll_sd: 0.5, prompt_nll_sample_rate: 0.25}}
  drift:
    - {{profile: pi-2gb, after_s: {SHIFT_WINDOW * WINDOW_S}, signal: prompt_tokens, factor: 2.0}}
    - {{profile: till-8gb, version: "sha256:abab", after_s: {SHIFT_WINDOW * WINDOW_S}, signal: prompt_nll, factor: 1.3}}
"""
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _runtime(spec: FleetSpec) -> SimulatedRuntime:
    return SimulatedRuntime(
        seed=spec.seed,
        overrides=spec.runtime.overrides,
        traffic=spec.runtime.traffic,
        drift=spec.runtime.drift,
    )


def _series(spec: FleetSpec, profile: str, windows: int) -> list[DriftPoint]:
    """One step per telemetry window: the merged drift summaries of every device of ``profile``."""
    runtime, device_profile = _runtime(spec), spec.all_profiles()[profile]
    [group] = [g for g in spec.devices if g.profile == profile]
    points = []
    for window in range(windows):
        merged: DriftSummary | None = None
        for n in range(1, group.count + 1):
            name = f"{profile}-{n}"
            sample = runtime.sample(device_profile, name, DIGEST, window, spec.runtime.requests_per_window)
            summary = summarize(runtime.summaries(device_profile, name, DIGEST, window, sample, window * WINDOW_S))
            merged = summary if merged is None else merge_summaries(merged, summary)
        points.append(DriftPoint(start=T0 + timedelta(seconds=window * WINDOW_S), summary=merged))
    return points


def _level(points: list[DriftPoint], signal: Signal) -> tuple[str, str]:
    """The verdict of the windows before the shift (first half against second) and of those after it."""
    before, after = points[:SHIFT_WINDOW], points[SHIFT_WINDOW:]
    half = SHIFT_WINDOW // 2
    [stable] = compare(before[:half], before[half:], signals=[signal])
    [shifted] = compare(before, after, signals=[signal])
    return stable.level, shifted.level


def test_only_the_shifted_class_and_signal_drift_after_the_shift_time() -> None:
    spec = parse_fleet(FLEET)
    series = {p: _series(spec, p, 2 * SHIFT_WINDOW) for p in ("pi-2gb", "till-8gb", "workstation-16gb")}

    assert _level(series["pi-2gb"], "prompt_tokens") == ("ok", "alert")
    assert _level(series["till-8gb"], "prompt_nll") == ("ok", "alert")
    assert _level(series["pi-2gb"], "prompt_nll")[1] == "ok"
    assert _level(series["till-8gb"], "prompt_tokens")[1] == "ok"
    for signal in ("prompt_tokens", "prompt_nll", "completion_tokens", "finish_reason", "empty_output"):
        assert _level(series["workstation-16gb"], signal) == ("ok", "ok"), signal
    pi_means = [p.summary.prompt_tokens.sum / p.summary.requests for p in series["pi-2gb"] if p.summary]
    before = sum(pi_means[:SHIFT_WINDOW]) / SHIFT_WINDOW
    after = sum(pi_means[SHIFT_WINDOW:]) / SHIFT_WINDOW
    assert after / before == pytest.approx(2.0, rel=0.1)  # the median doubled, so the mean does too


@pytest.mark.parametrize(("profile", "signal"), [("pi-2gb", "prompt_tokens"), ("till-8gb", "prompt_nll")])
def test_the_shift_is_detected_within_the_stated_number_of_windows(profile: str, signal: Signal) -> None:
    spec = parse_fleet(FLEET)
    points = _series(spec, profile, 2 * SHIFT_WINDOW)
    reference, monitored = points[:8], points[8:]  # the first 8 windows are the reference

    estimate = shift_start(reference, monitored, signal, DriftConfig())

    shift_at = points[SHIFT_WINDOW].start
    assert estimate.detected is not None and estimate.began is not None
    assert shift_at <= estimate.detected <= shift_at + timedelta(seconds=DETECTED_WITHIN * WINDOW_S)
    assert shift_at - timedelta(seconds=WINDOW_S) <= estimate.began <= shift_at  # a noisy window may start the run


def test_unshifted_classes_raise_no_alarm() -> None:
    spec = parse_fleet(FLEET)
    for profile, signal in (("workstation-16gb", "prompt_tokens"), ("workstation-16gb", "prompt_nll")):
        points = _series(spec, profile, 2 * SHIFT_WINDOW)
        assert shift_start(points[:8], points[8:], signal).detected is None


def test_simulated_windows_are_deterministic_under_the_seed() -> None:
    first = _series(parse_fleet(FLEET), "pi-2gb", 3)
    again = _series(parse_fleet(FLEET), "pi-2gb", 3)
    other = _series(parse_fleet(FLEET.replace("seed: 11", "seed: 12")), "pi-2gb", 3)
    assert first == again and first != other


def test_a_simulated_agent_window_carries_the_shifted_summary_after_the_shift_time() -> None:
    spec = parse_fleet(FLEET)
    profile = spec.all_profiles()["pi-2gb"]
    agent = SimAgent("pi-2gb-1", profile, {}, _runtime(spec), spec.seed, 5.0, requests_per_window=400)
    agent.active_digest = DIGEST

    agent.close_window(force=True)  # the fleet just started
    agent.fleet_started = time.monotonic() - SHIFT_WINDOW * WINDOW_S - 5  # as if 12 minutes had passed
    agent.window_started = time.monotonic()
    agent.close_window(force=True)

    early, late = (w.drift for w in agent.windows)
    assert early is not None and late is not None and early.requests == late.requests == 400
    assert agent.windows[0].prompt_tokens == early.prompt_tokens.sum
    assert late.prompt_tokens.sum / early.prompt_tokens.sum == pytest.approx(2.0, rel=0.15)
    assert sum(early.prompt_nll.counts) == pytest.approx(100, abs=30)  # prompt_nll_sample_rate 0.25
    [verdict] = compare([DriftPoint(T0, summary=early)], [DriftPoint(T0, summary=late)], signals=["prompt_tokens"])
    assert verdict.level == "alert"


def test_a_drift_option_on_an_unknown_profile_is_refused() -> None:
    with pytest.raises(BlueprintError, match="unknown profile 'phone'"):
        parse_fleet(FLEET.replace("profile: pi-2gb, after_s", "profile: phone, after_s"))
    with pytest.raises(BlueprintError, match="signal"):
        parse_fleet(FLEET.replace("signal: prompt_tokens", "signal: latency"))
