"""Rollout gates: canaries judged against baseline devices of the same class still on the old version.

As in Kayenta and Flagger, a gate compares two groups observed over the same time, not a canary against a fixed
number, so a busy hour or a slow network that hits both groups does not halt a release. Each judgement is a pure
function of counts and samples; the controller gathers them from telemetry.

Verdicts:

- ``"wait"``: either group has fewer than ``min_samples`` observations. No data never passes.
- ``"fail"``: the canary is worse with statistical significance (one-sided, level ``alpha``) **and** by more than
  the configured effect size, so a tiny but significant shift on a huge fleet does not halt a release, and a
  large but noisy difference on a handful of samples does not either.
- ``"pass"``: enough data, and no significant-and-large regression.

A ``critical`` gate fails at once: a crash gate on the first canary crash; a latency or error-rate gate as soon as
the evidence is significant and large, even before ``min_samples`` (the exact tests used are valid at any sample
size) -- but before ``min_samples`` only at a tenth of ``alpha``, so two errors in the first forty requests do not
halt a release. Looking again and again at growing data still raises a critical gate's false-alarm rate above
``alpha``; that is the price of halting early, which is why only critical gates do it. Passing always needs
``min_samples``.

Tests chosen:

- Latency: Mann-Whitney U (``scipy.stats.mannwhitneyu``, alternative "greater"). Latency is skewed and
  heavy-tailed, so a rank test is preferred to a t-test; it is what Kayenta's judge uses. Effect guard: the ratio
  of the canaries' and baselines' ``quantile`` (p95 by default) above ``max_ratio``. Throughput (tokens/s, where
  higher is better) is judged by passing seconds per token, ``1 / tokens_per_s``.
- Error rate: Fisher's exact test, one-sided (``scipy.stats.fisher_exact``, alternative "greater") on the 2x2
  table of (errors, successes) per group. Error rates on edge devices are small (0.1-1%) and canary groups are
  small, so expected error counts are often below 5, where the two-proportion z-test's normal approximation is
  wrong (and undefined when both groups have no errors). Fisher's test is exact and conservative: its false-alarm
  rate is at most ``alpha`` at every sample size. Barnard's exact test is more powerful, but its cost grows with
  the product of the group sizes and it takes seconds at thousands of requests, too slow for a controller loop
  over many gates. Effect guard: the rate increase above ``max_increase`` (absolute) and the rate ratio above
  ``max_ratio``, each when configured.

scipy is imported inside the functions; it comes with the ``server`` extra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

from slmops.core._scipy import scipy_stats
from slmops.errors import ConfigError

__all__ = [
    "Decision",
    "GateConfig",
    "GateKind",
    "GateResult",
    "Verdict",
    "decide",
    "judge_count_zero",
    "judge_error_rate",
    "judge_latency",
    "judge_max_rate",
]

GateKind = Literal["latency", "error_rate", "count_zero", "max_rate"]
Verdict = Literal["pass", "fail", "wait"]
Decision = Literal["promote", "hold", "halt"]


@dataclass(frozen=True)
class GateConfig:
    """One gate of a stage.

    ``min_samples`` is per group: latency samples for ``latency``, requests for ``error_rate``, exposure (requests
    or device-windows) for ``count_zero``. ``max_ratio`` is canary/baseline (p95 latency, or error rate);
    ``max_increase`` is an absolute error-rate increase (0.01 = one point). A threshold left ``None`` is not
    checked; with none set, significance alone fails the gate.
    """

    name: str
    kind: GateKind
    min_samples: int = 50
    alpha: float = 0.05
    max_ratio: float | None = None
    max_increase: float | None = None
    max_rate: float | None = None
    critical: bool = False
    quantile: float = 0.95

    def __post_init__(self) -> None:
        where = f"gate '{self.name}'"
        if self.kind not in ("latency", "error_rate", "count_zero", "max_rate"):
            raise ConfigError(f"{where}: kind must be latency, error_rate, count_zero or max_rate; got {self.kind!r}")
        if self.kind == "max_rate" and (self.max_rate is None or not (0.0 <= self.max_rate < 1.0)):
            raise ConfigError(f"{where}: a max_rate gate needs max_rate in [0, 1) (e.g. 0.05); got {self.max_rate!r}")
        if self.min_samples < 1:
            raise ConfigError(f"{where}: min_samples must be at least 1 per group; got {self.min_samples}")
        if not (0.0 < self.alpha < 1.0):
            raise ConfigError(f"{where}: alpha must be between 0 and 1 (e.g. 0.05); got {self.alpha!r}")
        if self.max_ratio is not None and not (math.isfinite(self.max_ratio) and self.max_ratio >= 1.0):
            raise ConfigError(f"{where}: max_ratio must be a finite number >= 1 (e.g. 1.2); got {self.max_ratio!r}")
        if self.max_increase is not None and not (0.0 <= self.max_increase < 1.0):
            raise ConfigError(f"{where}: max_increase must be in [0, 1) (e.g. 0.01); got {self.max_increase!r}")
        if not (0.0 < self.quantile < 1.0):
            raise ConfigError(f"{where}: quantile must be between 0 and 1 (e.g. 0.95); got {self.quantile!r}")


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict, why, and the numbers that led to it (for the rollout's events)."""

    verdict: Verdict
    reason: str
    numbers: dict[str, float] = field(default_factory=dict)
    gate: str = ""


def _stats() -> ModuleType:
    return scipy_stats("statistical rollout gates")


def _expect(config: GateConfig, kind: GateKind) -> None:
    if config.kind != kind:
        raise ConfigError(f"gate '{config.name}' is a {config.kind} gate; it cannot judge {kind} data")


def _quantile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.quantile(np.asarray(values, dtype=float), q))


def _ratio(canary: float, baseline: float) -> float:
    if baseline > 0.0:
        return canary / baseline
    return math.inf if canary > 0.0 else 1.0


def judge_latency(canary: Sequence[float], baseline: Sequence[float], config: GateConfig) -> GateResult:
    """Are the canaries slower? Mann-Whitney U (one-sided) and the p95 ratio; fail only when both say so."""
    _expect(config, "latency")
    for group, values in (("canary", canary), ("baseline", baseline)):
        if not all(math.isfinite(v) and v >= 0.0 for v in values):
            raise ValueError(f"{group} latency samples must be finite and >= 0 seconds")
    n_c, n_b = len(canary), len(baseline)
    numbers: dict[str, float] = {"canary_n": float(n_c), "baseline_n": float(n_b)}
    enough = n_c >= config.min_samples and n_b >= config.min_samples
    if not enough and not (config.critical and n_c > 0 and n_b > 0):
        return GateResult("wait", _too_few(config, n_c, n_b), numbers, config.name)
    stats = _stats()
    p_value = float(stats.mannwhitneyu(canary, baseline, alternative="greater").pvalue)
    q_c, q_b = _quantile(canary, config.quantile), _quantile(baseline, config.quantile)
    ratio = _ratio(q_c, q_b)
    label = f"p{round(config.quantile * 100):g}"
    numbers.update({"p_value": p_value, f"canary_{label}": q_c, f"baseline_{label}": q_b, "ratio": ratio})
    significant = p_value < _level(config, enough)
    large = config.max_ratio is None or ratio > config.max_ratio
    limit = "" if config.max_ratio is None else f" (limit {config.max_ratio:g})"
    summary = (
        f"canary {label} {q_c:.4g}s vs baseline {q_b:.4g}s, ratio {ratio:.3g}{limit}; Mann-Whitney p={p_value:.3g}"
    )
    if significant and large:
        return GateResult("fail", f"latency regression: {summary} < alpha {config.alpha:g}", numbers, config.name)
    if not enough:
        return GateResult("wait", _too_few(config, n_c, n_b), numbers, config.name)
    return GateResult("pass", f"no significant and large latency regression: {summary}", numbers, config.name)


EARLY_ALPHA_DIVISOR = 10.0


def _level(config: GateConfig, enough: bool) -> float:
    """The significance level of a look: ``alpha`` once ``min_samples`` are in; before that (critical gates only)
    a tenth of it, so the early, repeated looks on few samples spend little of the false-alarm budget, as
    group-sequential designs do."""
    return config.alpha if enough else config.alpha / EARLY_ALPHA_DIVISOR


def _too_few(config: GateConfig, n_c: int, n_b: int) -> str:
    return (
        f"waiting for data: need {config.min_samples} per group, have canary {n_c}, baseline {n_b}"
        " (no data never passes)"
    )


def _check_counts(group: str, events: int, total: int) -> None:
    if events < 0 or total < 0 or events > total:
        raise ValueError(f"{group}: need 0 <= events <= total; got {events} of {total}")


def _judge_proportions(
    what: str, c_events: int, c_total: int, b_events: int, b_total: int, config: GateConfig
) -> GateResult:
    numbers: dict[str, float] = {
        "canary_events": float(c_events),
        "canary_total": float(c_total),
        "baseline_events": float(b_events),
        "baseline_total": float(b_total),
    }
    enough = c_total >= config.min_samples and b_total >= config.min_samples
    if c_total == 0 or b_total == 0 or (not enough and not config.critical):
        return GateResult("wait", _too_few(config, c_total, b_total), numbers, config.name)
    rate_c, rate_b = c_events / c_total, b_events / b_total
    table = [[c_events, c_total - c_events], [b_events, b_total - b_events]]
    p_value = float(_stats().fisher_exact(table, alternative="greater").pvalue)
    increase, ratio = rate_c - rate_b, _ratio(rate_c, rate_b)
    numbers.update({"canary_rate": rate_c, "baseline_rate": rate_b, "increase": increase, "ratio": ratio})
    numbers["p_value"] = p_value
    significant = p_value < _level(config, enough)
    large = (config.max_increase is None or increase > config.max_increase) and (
        config.max_ratio is None or ratio > config.max_ratio
    )
    summary = (
        f"canary {rate_c:.3%} vs baseline {rate_b:.3%} (+{increase:.3%}, ratio {ratio:.3g}); Fisher p={p_value:.3g}"
    )
    if significant and large:
        return GateResult("fail", f"{what} regression: {summary} < alpha {config.alpha:g}", numbers, config.name)
    if not enough:
        return GateResult("wait", _too_few(config, c_total, b_total), numbers, config.name)
    return GateResult("pass", f"no significant and large {what} regression: {summary}", numbers, config.name)


def judge_error_rate(
    canary_errors: int, canary_requests: int, baseline_errors: int, baseline_requests: int, config: GateConfig
) -> GateResult:
    """Do the canaries fail more often? Fisher's exact test (one-sided) and the configured effect size."""
    _expect(config, "error_rate")
    _check_counts("canary", canary_errors, canary_requests)
    _check_counts("baseline", baseline_errors, baseline_requests)
    return _judge_proportions("error rate", canary_errors, canary_requests, baseline_errors, baseline_requests, config)


def judge_count_zero(
    canary_count: int,
    canary_exposure: int,
    config: GateConfig,
    *,
    baseline_count: int = 0,
    baseline_exposure: int = 0,
) -> GateResult:
    """Crashes or on-device rollbacks, which should not happen at all.

    A critical gate fails on the first canary occurrence, whatever the sample size. A non-critical gate passes
    with no occurrence after ``min_samples`` exposure, and with occurrences compares the canaries' rate against
    the baseline's like ``judge_error_rate`` (so a fleet that crashes now and then on the old version too is not
    halted by one crash).
    """
    _expect(config, "count_zero")
    if canary_count < 0 or canary_exposure < 0:
        raise ValueError(f"canary: counts must be >= 0; got {canary_count} in {canary_exposure}")
    numbers: dict[str, float] = {"canary_count": float(canary_count), "canary_exposure": float(canary_exposure)}
    if canary_count > 0 and config.critical:
        reason = f"critical gate: {canary_count} occurrence(s) on canaries in {canary_exposure} exposure; none allowed"
        return GateResult("fail", reason, numbers, config.name)
    if canary_count == 0:
        if canary_exposure < config.min_samples:
            reason = f"waiting for data: need {config.min_samples} exposure on canaries, have {canary_exposure}"
            return GateResult("wait", reason, numbers, config.name)
        return GateResult("pass", f"no occurrence on canaries in {canary_exposure} exposure", numbers, config.name)
    _check_counts("canary", canary_count, canary_exposure)
    _check_counts("baseline", baseline_count, baseline_exposure)
    return _judge_proportions("occurrence", canary_count, canary_exposure, baseline_count, baseline_exposure, config)


def judge_max_rate(events: int, total: int, config: GateConfig) -> GateResult:
    """Is the canaries' rate of an event (e.g. on-device rollbacks per canary) above ``max_rate``?

    An exact one-sided binomial test of H0 "rate <= max_rate" (``scipy.stats.binomtest``, alternative "greater");
    fails when significant at ``alpha`` and the observed rate is above ``max_rate``. One rollback among ten
    canaries at ``max_rate`` 0.05 is not evidence (p = 0.40); three are (p = 0.012).
    """
    _expect(config, "max_rate")
    _check_counts("canary", events, total)
    limit = config.max_rate if config.max_rate is not None else 0.0
    numbers: dict[str, float] = {"events": float(events), "total": float(total), "max_rate": limit}
    if total == 0 or (total < config.min_samples and not config.critical):
        reason = f"waiting for data: need {config.min_samples} canaries, have {total}"
        return GateResult("wait", reason, numbers, config.name)
    rate = events / total
    p_value = float(_stats().binomtest(events, total, limit, alternative="greater").pvalue) if events else 1.0
    numbers.update({"rate": rate, "p_value": p_value})
    summary = f"{events} of {total} canaries ({rate:.1%}) against a limit of {limit:.1%}; binomial p={p_value:.3g}"
    if p_value < _level(config, total >= config.min_samples) and rate > limit:
        return GateResult("fail", f"too many: {summary} < alpha {config.alpha:g}", numbers, config.name)
    if total < config.min_samples:
        reason = f"waiting for data: need {config.min_samples} canaries, have {total}"
        return GateResult("wait", reason, numbers, config.name)
    return GateResult("pass", f"within the limit: {summary}", numbers, config.name)


def decide(results: Sequence[GateResult]) -> Decision:
    """A stage's decision: any fail halts, else any wait holds, else promote.

    An empty sequence promotes (a stage configured without gates is gated by its soak time and minimum number of
    reporting devices, which the controller checks before asking).
    """
    verdicts = {r.verdict for r in results}
    if "fail" in verdicts:
        return "halt"
    if "wait" in verdicts:
        return "hold"
    return "promote"
