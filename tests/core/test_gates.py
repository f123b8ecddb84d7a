from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats  # type: ignore[import-untyped, unused-ignore]

from slmops.core.gates import GateConfig, GateResult, decide, judge_count_zero, judge_error_rate, judge_latency
from slmops.errors import ConfigError

TRIALS = 300
ALPHA = 0.05
N = 50  # the configured sample size per group


def _upper_tolerance(alpha: float, trials: int) -> float:
    """Largest false-alarm share a level-alpha test shows in `trials` independent trials, except 1 time in 1000.

    Under the null each trial alarms with probability <= alpha, so the count is at most Binomial(trials, alpha);
    its 99.9% quantile (28 of 300 at alpha 0.05, i.e. 0.093) bounds the share for a correct test.
    """
    return float(stats.binom.ppf(0.999, trials, alpha)) / trials


def _lognormal(rng: np.random.Generator, scale: float = 1.0) -> list[float]:
    """N latency samples in seconds: lognormal with median `scale` and sigma 0.5 (p95/median about 2.3)."""
    return [scale * x for x in rng.lognormal(0.0, 0.5, N).tolist()]


def _rate(trial: Callable[[np.random.Generator], GateResult], seed: int) -> float:
    rng = np.random.default_rng(seed)
    return sum(trial(rng).verdict == "fail" for _ in range(TRIALS)) / TRIALS


LATENCY = GateConfig("p95 latency", "latency", min_samples=N, alpha=ALPHA, max_ratio=1.2)
LATENCY_TEST_ONLY = GateConfig("latency, no effect guard", "latency", min_samples=N, alpha=ALPHA)
ERRORS = GateConfig("error rate", "error_rate", min_samples=500, alpha=ALPHA)


@pytest.mark.parametrize("config", [LATENCY_TEST_ONLY, LATENCY], ids=["test-only", "with-p95-guard"])
def test_latency_false_alarm_rate_on_identical_distributions_is_at_most_alpha(config: GateConfig) -> None:
    def trial(rng: np.random.Generator) -> GateResult:
        return judge_latency(_lognormal(rng), _lognormal(rng), config)

    rate = _rate(trial, seed=1)

    assert rate <= _upper_tolerance(ALPHA, TRIALS)


def test_latency_test_is_near_its_nominal_level() -> None:
    # Mann-Whitney on continuous data has size exactly alpha: far fewer alarms mean a broken test (e.g. the wrong side)
    def trial(rng: np.random.Generator) -> GateResult:
        return judge_latency(_lognormal(rng), _lognormal(rng), LATENCY_TEST_ONLY)

    rate = _rate(trial, seed=2)

    assert float(stats.binom.ppf(0.001, TRIALS, ALPHA)) / TRIALS <= rate <= _upper_tolerance(ALPHA, TRIALS)


def test_a_2x_latency_regression_is_caught_at_the_configured_sample_size() -> None:
    def trial(rng: np.random.Generator) -> GateResult:
        return judge_latency(_lognormal(rng, 2.0), _lognormal(rng), LATENCY)

    assert _rate(trial, seed=3) >= 0.95


def test_faster_canaries_never_fail() -> None:
    def trial(rng: np.random.Generator) -> GateResult:
        return judge_latency(_lognormal(rng, 0.5), _lognormal(rng), LATENCY_TEST_ONLY)

    assert _rate(trial, seed=4) == 0.0


@pytest.mark.parametrize("base_rate", [0.002, 0.01, 0.05])
def test_error_rate_false_alarm_rate_on_identical_rates_is_at_most_alpha(base_rate: float) -> None:
    def trial(rng: np.random.Generator) -> GateResult:
        c, b = int(rng.binomial(1000, base_rate)), int(rng.binomial(1000, base_rate))
        return judge_error_rate(c, 1000, b, 1000, ERRORS)

    assert _rate(trial, seed=5) <= _upper_tolerance(ALPHA, TRIALS)


def test_a_quadrupled_error_rate_is_caught() -> None:
    config = GateConfig("error rate", "error_rate", min_samples=500, alpha=ALPHA, max_increase=0.005)

    def trial(rng: np.random.Generator) -> GateResult:
        return judge_error_rate(int(rng.binomial(1000, 0.04)), 1000, int(rng.binomial(1000, 0.01)), 1000, config)

    assert _rate(trial, seed=6) >= 0.95


def test_a_significant_but_small_error_increase_passes() -> None:
    config = GateConfig("error rate", "error_rate", min_samples=500, max_increase=0.01)

    result = judge_error_rate(1500, 100_000, 1000, 100_000, config)  # 1.5% vs 1.0%: significant, +0.5 points

    assert result.verdict == "pass"
    assert result.numbers["p_value"] < 1e-6
    assert result.numbers["increase"] == pytest.approx(0.005)


@given(st.integers(0, 2 * N), st.integers(0, 2 * N))
def test_latency_below_min_samples_waits(n_canary: int, n_baseline: int) -> None:
    canary, baseline = [10.0] * n_canary, [1.0] * n_baseline  # a huge regression, yet too few samples

    result = judge_latency(canary, baseline, LATENCY)

    assert (result.verdict == "wait") == (min(n_canary, n_baseline) < N)


@given(st.integers(0, 1000), st.integers(0, 1000))
def test_error_rate_below_min_samples_waits(c_requests: int, b_requests: int) -> None:
    result = judge_error_rate(c_requests, c_requests, 0, b_requests, ERRORS)  # every canary request fails

    assert (result.verdict == "wait") == (min(c_requests, b_requests) < 500)


def test_no_data_waits_and_never_passes() -> None:
    assert judge_latency([], [], LATENCY).verdict == "wait"
    assert judge_error_rate(0, 0, 0, 0, ERRORS).verdict == "wait"
    assert judge_count_zero(0, 0, GateConfig("crashes", "count_zero", critical=True)).verdict == "wait"


def test_a_critical_gate_fails_before_min_samples_on_strong_evidence() -> None:
    critical = GateConfig("p95 latency", "latency", min_samples=N, max_ratio=1.2, critical=True)
    critical_errors = GateConfig("error rate", "error_rate", min_samples=500, max_increase=0.01, critical=True)

    assert judge_latency([10.0] * 10, [1.0] * 10, critical).verdict == "fail"
    assert judge_latency([1.0] * 10, [1.0] * 10, critical).verdict == "wait"  # passing still needs the samples
    assert judge_error_rate(8, 20, 0, 100, critical_errors).verdict == "fail"
    assert judge_error_rate(0, 20, 0, 100, critical_errors).verdict == "wait"


def test_a_critical_crash_gate_fails_on_one_crash() -> None:
    crashes = GateConfig("crashes", "count_zero", min_samples=100, critical=True)

    result = judge_count_zero(1, 3, crashes)

    assert result.verdict == "fail"
    assert result.gate == "crashes"
    assert result.numbers == {"canary_count": 1.0, "canary_exposure": 3.0}
    assert judge_count_zero(0, 99, crashes).verdict == "wait"
    assert judge_count_zero(0, 100, crashes).verdict == "pass"


def test_a_non_critical_count_gate_compares_with_the_baseline() -> None:
    rollbacks = GateConfig("local rollbacks", "count_zero", min_samples=100)

    assert judge_count_zero(1, 1000, rollbacks, baseline_count=1, baseline_exposure=1000).verdict == "pass"
    assert judge_count_zero(30, 1000, rollbacks, baseline_count=1, baseline_exposure=1000).verdict == "fail"
    assert judge_count_zero(30, 1000, rollbacks).verdict == "wait"  # no baseline exposure yet


verdicts = st.lists(st.sampled_from(["pass", "fail", "wait"]), max_size=6)


@given(verdicts)
def test_decide_halts_on_any_fail_holds_on_any_wait_else_promotes(names: list[str]) -> None:
    results = [GateResult(v, "", {}) for v in names]  # type: ignore[arg-type]

    decision = decide(results)

    expected = "halt" if "fail" in names else "hold" if "wait" in names else "promote"
    assert decision == expected


def test_results_carry_the_numbers_that_led_to_them() -> None:
    result = judge_latency([2.0] * N, [1.0] * N, LATENCY)

    assert result.verdict == "fail"
    assert result.numbers["ratio"] == pytest.approx(2.0)
    assert result.numbers["canary_p95"] == pytest.approx(2.0)
    assert {"p_value", "canary_n", "baseline_n", "baseline_p95"} <= result.numbers.keys()
    assert "ratio 2" in result.reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"min_samples": 0}, "min_samples"),
        ({"max_ratio": 0.9}, "max_ratio"),
        ({"max_increase": -0.1}, "max_increase"),
        ({"quantile": 1.0}, "quantile"),
    ],
)
def test_invalid_configs_are_config_errors(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GateConfig("g", "latency", **kwargs)  # type: ignore[arg-type]


def test_a_gate_judges_only_its_own_kind() -> None:
    with pytest.raises(ConfigError, match="latency gate"):
        judge_error_rate(0, 10, 0, 10, LATENCY)


def test_impossible_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="events <= total"):
        judge_error_rate(11, 10, 0, 10, ERRORS)
