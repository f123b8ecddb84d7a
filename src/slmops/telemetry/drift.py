"""Drift of one (model version, device class): distribution summaries compared against a reference. Pure.

Agents summarize what they served in each telemetry window with a :class:`DriftSummary` -- counts only: prompt and
completion token-count histograms, the finish-reason mix, empty outputs, and a histogram of the served model's own
mean negative log-likelihood of each prompt (how surprising the inputs are to it). The control plane merges the
windows of a (version, class) into a :class:`DriftPoint` per time step (:func:`drift_series`), picks a reference
(:class:`ReferenceSpec`: the version's first windows or first days, or a pinned range) and compares, per signal:

- **PSI** (population stability index) over the buckets, ``sum((c - r) * ln(c / r))`` over the bucket shares,
  each share floored at ``psi_floor`` so an empty bucket does not make it infinite. PSI is an effect size: it does
  not grow with the sample. Rule of thumb: < 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a large one.
- **a two-sample test**: chi-square on the 2 x buckets table of counts (``scipy.stats.chi2_contingency``, buckets
  empty in both sets dropped) for histograms and the finish-reason mix; Fisher's exact test on (empty, non-empty)
  for the empty-output rate. Windows of one fleet are not independent samples (the same users, the same hours),
  so p-values are optimistic; that is why a verdict needs both: significant **and** a PSI above the threshold.

Verdicts: ``insufficient`` (either set has fewer than ``min_samples``), ``alert`` (p < alpha and PSI >=
``psi_alert``), ``warn`` (p < alpha and PSI >= ``psi_warn``), else ``ok``. When the shift began is estimated with a
CUSUM over the per-window PSI against the reference (:mod:`slmops.telemetry.changepoint`), its null taken from the
reference windows themselves (each against the others). scipy comes with the ``server`` extra.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops.core.wire import (
    FINISH_REASONS,
    NLL_BUCKETS,
    TOKEN_BUCKETS,
    DriftSummary,
    FinishReason,
    Histogram,
    TelemetryWindow,
)
from slmops.errors import ConfigError
from slmops.telemetry._stats import chi_square_p, fisher_p
from slmops.telemetry.aggregate import histogram_from_ms, merge_histograms
from slmops.telemetry.changepoint import first_alarm, null_estimate

__all__ = [
    "FINISH_REASONS",
    "NLL_BUCKETS",
    "SIGNALS",
    "TOKEN_BUCKETS",
    "DriftConfig",
    "DriftLevel",
    "DriftPoint",
    "DriftReport",
    "DriftSummary",
    "DriftVerdict",
    "FinishReason",
    "ReferenceSpec",
    "RequestSummary",
    "ShiftEstimate",
    "Signal",
    "compare",
    "drift_report",
    "drift_series",
    "merge_summaries",
    "psi",
    "select_reference",
    "shift_start",
    "summarize",
]

Signal = Literal["prompt_tokens", "completion_tokens", "finish_reason", "empty_output", "prompt_nll", "latency"]
SIGNALS: tuple[Signal, ...] = get_args(Signal)
DriftLevel = Literal["ok", "warn", "alert", "insufficient"]


@dataclass(frozen=True)
class RequestSummary:
    """One served request as the agent sees it; folded into a :class:`DriftSummary` by :func:`summarize`."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    prompt_nll: float | None = None  # mean NLL of the prompt tokens, nats per token; None when not computed
    empty: bool | None = None  # None: empty when no completion token was generated


def summarize(requests: Iterable[RequestSummary]) -> DriftSummary:
    """The summary of a window's requests; an unknown finish reason counts as ``other``."""
    items = list(requests)
    reasons: dict[FinishReason, int] = {}
    for item in items:
        reason: FinishReason = next((r for r in FINISH_REASONS if r == item.finish_reason), "other")
        reasons[reason] = reasons.get(reason, 0) + 1
    empties = sum(1 for i in items if (i.completion_tokens == 0 if i.empty is None else i.empty))
    return DriftSummary(
        requests=len(items),
        prompt_tokens=histogram_from_ms((i.prompt_tokens for i in items), TOKEN_BUCKETS),
        completion_tokens=histogram_from_ms((i.completion_tokens for i in items), TOKEN_BUCKETS),
        finish_reasons=reasons,
        empty_outputs=empties,
        prompt_nll=histogram_from_ms((i.prompt_nll for i in items if i.prompt_nll is not None), NLL_BUCKETS),
    )


def merge_summaries(a: DriftSummary, b: DriftSummary) -> DriftSummary:
    """The sum of two summaries (associative and commutative); the buckets must be the same."""
    reasons = dict(a.finish_reasons)
    for reason, count in b.finish_reasons.items():
        reasons[reason] = reasons.get(reason, 0) + count
    return DriftSummary(
        requests=a.requests + b.requests,
        prompt_tokens=merge_histograms(a.prompt_tokens, b.prompt_tokens),
        completion_tokens=merge_histograms(a.completion_tokens, b.completion_tokens),
        finish_reasons=reasons,
        empty_outputs=a.empty_outputs + b.empty_outputs,
        prompt_nll=merge_histograms(a.prompt_nll, b.prompt_nll),
    )


@dataclass(frozen=True)
class DriftPoint:
    """One time step of a (version, class) series: the merged windows that started in it."""

    start: datetime
    latency_ms: Histogram = field(default_factory=Histogram)
    summary: DriftSummary | None = None  # None: no window in the step carried a summary


def _start(window: TelemetryWindow) -> datetime:
    moment = datetime.fromisoformat(window.window_start)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def drift_series(windows: Iterable[tuple[TelemetryWindow, DriftSummary | None]], *, step_s: float) -> list[DriftPoint]:
    """Windows of one (version, class), merged per ``step_s`` (aligned to the epoch), oldest first."""
    if not step_s > 0:
        raise ConfigError(f"step_s must be > 0 seconds (e.g. 3600); got {step_s!r}")
    steps: dict[int, tuple[Histogram, DriftSummary | None]] = {}
    for window, summary in windows:
        key = math.floor(_start(window).timestamp() / step_s)
        if key not in steps:
            steps[key] = (window.latency_ms, summary)
            continue
        latency, merged = steps[key]
        if summary is not None:
            merged = summary if merged is None else merge_summaries(merged, summary)
        steps[key] = (merge_histograms(latency, window.latency_ms), merged)
    return [
        DriftPoint(start=datetime.fromtimestamp(key * step_s, UTC), latency_ms=latency, summary=summary)
        for key, (latency, summary) in sorted(steps.items())
    ]


class ReferenceSpec(BaseModel):
    """Which windows are the reference: the version's first ``first_windows`` steps, its first ``first_s``
    seconds, or the pinned range ``since <= start < until``. Exactly one of the three must be given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_windows: int | None = Field(default=None, ge=1)
    first_s: float | None = Field(default=None, gt=0)
    since: datetime | None = None
    until: datetime | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ReferenceSpec:
        pinned = self.since is not None or self.until is not None
        kinds = (self.first_windows is not None) + (self.first_s is not None) + pinned
        if kinds != 1:
            raise ValueError("give exactly one of first_windows, first_s, or since and until")
        if pinned and (self.since is None or self.until is None or not self.since < self.until):
            raise ValueError(f"a pinned reference needs since < until; got since={self.since}, until={self.until}")
        return self


def select_reference(points: Sequence[DriftPoint], spec: ReferenceSpec) -> list[DriftPoint]:
    """The reference steps of a series (any order in, oldest first out)."""
    ordered = sorted(points, key=lambda p: p.start)
    if spec.first_windows is not None:
        return ordered[: spec.first_windows]
    if spec.first_s is not None:
        if not ordered:
            return []
        end = ordered[0].start + timedelta(seconds=spec.first_s)
        return [p for p in ordered if p.start < end]
    assert spec.since is not None and spec.until is not None  # checked by the model
    return [p for p in ordered if spec.since <= p.start < spec.until]


class DriftConfig(BaseModel):
    """Thresholds of the drift verdicts and of the change-point estimate (CUSUM ``k`` and ``h`` in units of the
    reference's per-window PSI spread, floored at ``cusum_scale_floor`` PSI). ``k=1, h=6`` rather than the
    textbook ``0.5, 5``: per-window PSI has a longer right tail than a normal, and the seeded synthetic series of
    ``tests/telemetry/test_drift_detection.py`` gave too many false alarms with the textbook values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    psi_warn: float = Field(default=0.1, gt=0)
    psi_alert: float = Field(default=0.25, gt=0)
    alpha: float = Field(default=0.01, gt=0, lt=1)
    min_samples: int = Field(default=200, ge=1)  # per set (reference, current), per signal
    psi_floor: float = Field(default=1e-4, gt=0, lt=1)
    min_window_samples: int = Field(default=30, ge=1)  # a step with fewer is skipped by the change-point search
    cusum_k: float = Field(default=1.0, ge=0)
    cusum_h: float = Field(default=6.0, gt=0)
    cusum_scale_floor: float = Field(default=0.025, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> DriftConfig:
        if self.psi_alert < self.psi_warn:
            raise ValueError(f"psi_alert ({self.psi_alert}) must be >= psi_warn ({self.psi_warn})")
        return self


def psi(reference: Sequence[float], current: Sequence[float], *, floor: float = 1e-4) -> float:
    """Population stability index of two count (or share) vectors over the same buckets; >= 0, symmetric, 0 for
    equal shares. Shares below ``floor`` count as ``floor``."""
    if len(reference) != len(current):
        raise ValueError(f"need the same buckets; got {len(reference)} and {len(current)}")
    n_ref, n_cur = math.fsum(reference), math.fsum(current)
    if not (n_ref > 0 and n_cur > 0) or any(v < 0 for v in (*reference, *current)):
        raise ValueError("need non-negative counts with a positive total on both sides")
    total = 0.0
    for r, c in zip(reference, current, strict=True):
        p_ref, p_cur = max(r / n_ref, floor), max(c / n_cur, floor)
        total += (p_cur - p_ref) * math.log(p_cur / p_ref)
    return total


@dataclass(frozen=True)
class _Dist:
    counts: list[int]
    sum: float | None = None  # of the measured values, for a mean; None for categories

    @property
    def n(self) -> int:
        return sum(self.counts)


def _dist(point: DriftPoint, signal: Signal) -> _Dist | None:
    if signal == "latency":
        return _Dist(list(point.latency_ms.counts), point.latency_ms.sum)
    s = point.summary
    if s is None:
        return None
    if signal == "finish_reason":
        return _Dist([s.finish_reasons.get(r, 0) for r in FINISH_REASONS])
    if signal == "empty_output":
        return _Dist([s.empty_outputs, s.requests - s.empty_outputs])
    hist: Histogram = getattr(s, signal)
    return _Dist(list(hist.counts), hist.sum)


def _total(points: Iterable[DriftPoint], signal: Signal) -> _Dist | None:
    result: _Dist | None = None
    for point in points:
        d = _dist(point, signal)
        if d is None:
            continue
        if result is None:
            result = d
            continue
        if len(d.counts) != len(result.counts):
            raise ConfigError(
                f"{signal}: windows use different buckets ({len(result.counts)} and {len(d.counts)}); agents and "
                "server must use the same bucket bounds"
            )
        total = None if d.sum is None or result.sum is None else d.sum + result.sum
        result = _Dist([a + b for a, b in zip(result.counts, d.counts, strict=True)], total)
    return result


@dataclass(frozen=True)
class DriftVerdict:
    """One signal's comparison: the level, the PSI and p-value, and the numbers behind them."""

    signal: Signal
    level: DriftLevel
    reason: str
    psi: float | None = None
    p_value: float | None = None
    test: str = ""  # "chi2" or "fisher"
    reference_n: int = 0
    current_n: int = 0
    numbers: dict[str, float] = field(default_factory=dict)


def _judge(signal: Signal, ref: _Dist | None, cur: _Dist | None, config: DriftConfig) -> DriftVerdict:
    n_ref, n_cur = (ref.n if ref else 0), (cur.n if cur else 0)
    if ref is not None and cur is not None and len(ref.counts) != len(cur.counts):
        raise ConfigError(
            f"{signal}: reference and current windows use different buckets ({len(ref.counts)} and "
            f"{len(cur.counts)}); agents and server must use the same bucket bounds"
        )
    if ref is None or cur is None or n_ref < config.min_samples or n_cur < config.min_samples:
        reason = f"need {config.min_samples} samples per set; have reference {n_ref}, current {n_cur}"
        return DriftVerdict(signal, "insufficient", reason, reference_n=n_ref, current_n=n_cur)
    value = psi(ref.counts, cur.counts, floor=config.psi_floor)
    if signal == "empty_output":
        test, p_value = "fisher", fisher_p(ref.counts, cur.counts)
        numbers = {"reference_rate": ref.counts[0] / n_ref, "current_rate": cur.counts[0] / n_cur}
    else:
        test, p_value = "chi2", chi_square_p(ref.counts, cur.counts)
        numbers = {}
        if ref.sum is not None and cur.sum is not None:
            numbers = {"reference_mean": ref.sum / n_ref, "current_mean": cur.sum / n_cur}
    significant = p_value < config.alpha
    level: DriftLevel = "ok"
    if significant and value >= config.psi_alert:
        level = "alert"
    elif significant and value >= config.psi_warn:
        level = "warn"
    reason = (
        f"PSI {value:.3g} (warn {config.psi_warn:g}, alert {config.psi_alert:g}); {test} p={p_value:.3g} "
        f"(alpha {config.alpha:g}); reference n={n_ref}, current n={n_cur}"
    )
    return DriftVerdict(signal, level, reason, value, p_value, test, n_ref, n_cur, numbers)


def compare(
    reference: Sequence[DriftPoint],
    current: Sequence[DriftPoint],
    config: DriftConfig | None = None,
    signals: Sequence[Signal] = SIGNALS,
) -> list[DriftVerdict]:
    """Verdicts per signal of the current steps against the reference steps."""
    config = config or DriftConfig()
    return [_judge(s, _total(reference, s), _total(current, s), config) for s in signals]


@dataclass(frozen=True)
class ShiftEstimate:
    """When a signal's shift began (the first step of the CUSUM run that crossed) and when it was detected."""

    signal: Signal
    began: datetime | None
    detected: datetime | None
    window_psi: list[float | None]  # per monitored step, against the reference; None: too few samples
    null_mean: float
    null_scale: float


def shift_start(
    reference: Sequence[DriftPoint], monitored: Sequence[DriftPoint], signal: Signal, config: DriftConfig | None = None
) -> ShiftEstimate:
    """CUSUM over the per-step PSI of ``monitored`` against the whole reference; the null is the reference's own
    leave-one-out PSI (each reference step against the rest)."""
    config = config or DriftConfig()
    ref = _total(reference, signal)
    null: list[float] = []
    values: list[float | None] = []
    if ref is not None and ref.n > 0:
        for point in reference:
            d = _dist(point, signal)
            rest = [a - b for a, b in zip(ref.counts, d.counts, strict=True)] if d else []
            if d is not None and d.n >= config.min_window_samples and sum(rest) > 0:
                null.append(psi(rest, d.counts, floor=config.psi_floor))
        for point in monitored:
            d = _dist(point, signal)
            ok = d is not None and d.n >= config.min_window_samples
            values.append(psi(ref.counts, d.counts, floor=config.psi_floor) if ok and d else None)
    else:
        values = [None] * len(monitored)
    mean, scale = null_estimate(null, scale_floor=config.cusum_scale_floor)
    alarm = first_alarm(values, target=mean, scale=scale, k=config.cusum_k, h=config.cusum_h)
    return ShiftEstimate(
        signal=signal,
        began=monitored[alarm.began].start if alarm else None,
        detected=monitored[alarm.detected].start if alarm else None,
        window_psi=values,
        null_mean=mean,
        null_scale=scale,
    )


@dataclass(frozen=True)
class DriftReport:
    """A (version, class)'s verdicts over its last ``current_windows`` steps, and when each shift began."""

    reference_since: datetime | None
    reference_until: datetime | None  # start of the last reference step
    current_since: datetime | None
    verdicts: list[DriftVerdict]
    shifts: list[ShiftEstimate]


def drift_report(
    points: Sequence[DriftPoint],
    spec: ReferenceSpec,
    *,
    current_windows: int,
    config: DriftConfig | None = None,
    signals: Sequence[Signal] = SIGNALS,
) -> DriftReport:
    """Verdicts of the last ``current_windows`` steps after the reference, and a shift estimate per signal over
    every step after the reference."""
    if current_windows < 1:
        raise ConfigError(f"current_windows must be at least 1; got {current_windows}")
    config = config or DriftConfig()
    ordered = sorted(points, key=lambda p: p.start)
    reference = select_reference(ordered, spec)
    after = [p for p in ordered if reference and p.start > reference[-1].start]
    current = after[-current_windows:]
    return DriftReport(
        reference_since=reference[0].start if reference else None,
        reference_until=reference[-1].start if reference else None,
        current_since=current[0].start if current else None,
        verdicts=compare(reference, current, config, signals),
        shifts=[shift_start(reference, after, s, config) for s in signals],
    )
