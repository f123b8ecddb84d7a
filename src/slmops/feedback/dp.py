"""Differential privacy on the aggregates a device reports: calibrated noise on a telemetry window's counts.

**What is protected.** The unit is one request: adding or removing any single request served in the window changes
the released window by at most the stated sensitivity, so whether any one request happened (and what it looked like:
its latency, its length, how it finished) is hidden to within ``epsilon``. One request changes, by at most one
each, these counts (the L1 sensitivity :data:`REQUEST_SENSITIVITY` = 11):

- ``requests``, ``errors``;
- one bucket of each of ``latency_ms``, ``ttft_ms``, ``per_token_ms``;
- in the drift summary: ``requests``, one bucket of ``prompt_tokens`` and of ``completion_tokens``, one finish
  reason, ``empty_outputs``, one bucket of ``prompt_nll`` (only sampled requests have one; the bound still counts it).

All of them are released together by one OpenDP measurement, the discrete Laplace (geometric) mechanism
(``opendp.measurements.make_laplace`` on a vector of integers under the L1 distance) with scale
``sensitivity / epsilon``; OpenDP's privacy map confirms the window costs at most ``epsilon``.

**Post-processing** (free: it only reads the noisy counts): each scalar count is clamped to >= 0; each histogram
is projected onto the non-negative vectors that add up to its noisy request count (:func:`_rescale`; clamping alone
would add about ``scale / 2`` phantom samples per empty bucket); ``errors`` and ``empty_outputs`` are capped by their
request counts, so the window passes the wire validators. Clamping small scalars (``errors`` near 0) still biases
them upward: fleet sums of such counts overstate them (see ``benchmarks/dp.py``).

Sums cannot be noised honestly without a bound on one request's value, so they are *recomputed* from the noisy
histograms: each ``Histogram.sum`` as bucket midpoints times counts (the last, open bucket at its lower bound);
``prompt_tokens`` / ``completion_tokens`` from the drift summary's token histograms (0 when a window has no drift
summary); ``decode_tokens_per_s`` from the noisy ``per_token_ms`` histogram.

**What it costs** (``python -m benchmarks.dp``): this is local DP, one noisy window per device, so a window of a few
dozen requests is mostly noise. Fleet request counts stay within a few per cent from epsilon 0.5 on; error rates,
p95 latency and token totals are far off below epsilon 5 (noise leaks into the tail and overflow buckets, and clamped
small counts only grow). Longer windows (more requests each) help in proportion.

**Exact, on purpose**: ``crashes``, ``restarts``, ``rollbacks`` (the agent process's own events, which the on-device
health gates and rollbacks rely on; they say nothing about what a request contained), ``memory_rss_bytes`` (the
process's peak memory), the window's id, version and times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from slmops.core.wire import FINISH_REASONS, DriftSummary, FinishReason, Histogram, TelemetryWindow
from slmops.errors import MissingExtraError

__all__ = ["REQUEST_SENSITIVITY", "noise_scale", "noisy_counts", "privatize_window"]

REQUEST_SENSITIVITY = 11
"""How many of a window's released counts one request can change, by at most 1 each (the L1 sensitivity)."""


def noise_scale(epsilon: float, sensitivity: int = REQUEST_SENSITIVITY) -> float:
    """The discrete Laplace scale that makes a release of L1 sensitivity ``sensitivity`` ``epsilon``-DP."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0; got {epsilon}")
    return sensitivity / epsilon


def noisy_counts(counts: Sequence[int], epsilon: float, sensitivity: int = REQUEST_SENSITIVITY) -> list[int]:
    """``counts`` plus discrete Laplace noise through OpenDP, ``epsilon``-DP for neighbours at L1 distance
    ``sensitivity``. Not clamped (see :func:`privatize_window`)."""
    if not counts:
        return []
    try:
        import opendp.prelude as dp
    except ImportError:
        raise MissingExtraError("privacy", "differential privacy on telemetry (privacy.dp)", "opendp") from None
    dp.enable_features("contrib")
    measurement = dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int), scale=noise_scale(epsilon, sensitivity)
    )
    spent = measurement.map(sensitivity)  # type: ignore[no-untyped-call]
    if spent > epsilon * (1 + 1e-9):
        raise RuntimeError(f"OpenDP's privacy map gives epsilon {spent} > {epsilon}")  # cannot happen: a guard
    noisy: list[int] = measurement([int(c) for c in counts])
    return noisy


def _histograms(window: TelemetryWindow) -> list[Histogram]:
    hists = [window.latency_ms, window.ttft_ms, window.per_token_ms]
    if window.drift is not None:
        hists += [window.drift.prompt_tokens, window.drift.completion_tokens, window.drift.prompt_nll]
    return hists


def _flatten(window: TelemetryWindow, reasons: Sequence[FinishReason]) -> list[int]:
    values = [window.requests, window.errors]
    for hist in _histograms(window):
        values += hist.counts
    if window.drift is not None:
        drift = window.drift
        values += [drift.requests, drift.empty_outputs, *(drift.finish_reasons.get(r, 0) for r in reasons)]
    return values


def _rescale(counts: list[int], total: int) -> list[int]:
    """The non-negative integer vector adding up to ``total`` nearest (Euclidean) to the noisy ``counts``: the
    projection onto the simplex, ``max(0, c - tau)`` with ``tau`` chosen so the sum is ``total``, then rounded by
    largest remainders. Unlike clamping, it does not turn the noise in empty buckets into phantom samples."""
    if total <= 0 or not counts:
        return [0] * len(counts)
    ordered = sorted(counts, reverse=True)
    tau, running = 0.0, 0.0
    for k, value in enumerate(ordered, start=1):
        running += value
        candidate = (running - total) / k
        if value - candidate > 0:
            tau = candidate
    shares = [max(0.0, c - tau) for c in counts]
    out = [math.floor(x) for x in shares]
    for i in sorted(range(len(out)), key=lambda i: out[i] - shares[i])[: total - sum(out)]:
        out[i] += 1
    return out


def _midpoint_sum(bounds: Sequence[float], counts: Sequence[int]) -> float:
    total = 0.0
    for i, count in enumerate(counts):
        if i < len(bounds):
            low = bounds[i - 1] if i > 0 else 0.0
            total += count * (low + bounds[i]) / 2
        else:
            total += count * (bounds[-1] if bounds else 0.0)
    return total


def _hist(template: Histogram, counts: list[int]) -> Histogram:
    return Histogram(bounds=list(template.bounds), counts=counts, sum=_midpoint_sum(template.bounds, counts))


def privatize_window(window: TelemetryWindow, epsilon: float) -> TelemetryWindow:
    """``window`` with ``epsilon``-DP noise on its request-derived counts (see the module docstring for what one
    request changes and what is recomputed or kept exact). The result passes the wire validators."""
    drift = window.drift
    # Every finish reason is released, present or not: which reasons occurred is itself request data.
    reasons: tuple[FinishReason, ...] = FINISH_REASONS if drift is not None else ()
    noisy = iter(noisy_counts(_flatten(window, reasons), epsilon))
    requests = max(0, next(noisy))
    errors = min(requests, max(0, next(noisy)))
    raw = [[next(noisy) for _ in h.counts] for h in _histograms(window)]
    hists = _histograms(window)
    latency, ttft, per_token = (_hist(hists[i], _rescale(raw[i], requests)) for i in range(3))
    new_drift: DriftSummary | None = None
    prompt_tokens = completion_tokens = 0
    if drift is not None:
        drift_requests = max(0, next(noisy))
        empty = min(drift_requests, max(0, next(noisy)))
        finish = _rescale([next(noisy) for _ in reasons], drift_requests)
        d_prompt = _hist(drift.prompt_tokens, _rescale(raw[3], drift_requests))
        d_completion = _hist(drift.completion_tokens, _rescale(raw[4], drift_requests))
        # Only sampled requests have a prompt NLL: no released total to rescale to, so clamping alone.
        d_nll = _hist(drift.prompt_nll, [max(0, c) for c in raw[5]])
        new_drift = DriftSummary(
            requests=drift_requests,
            prompt_tokens=d_prompt,
            completion_tokens=d_completion,
            finish_reasons={r: c for r, c in zip(reasons, finish, strict=True) if c},
            empty_outputs=empty,
            prompt_nll=d_nll,
        )
        prompt_tokens, completion_tokens = round(d_prompt.sum), round(d_completion.sum)
    per_token_n = sum(per_token.counts)
    decode = 1000.0 / (per_token.sum / per_token_n) if per_token_n and per_token.sum > 0 else None
    return window.model_copy(
        update={
            "requests": requests,
            "errors": errors,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_ms": latency,
            "ttft_ms": ttft,
            "per_token_ms": per_token,
            "decode_tokens_per_s": decode if window.decode_tokens_per_s is not None else None,
            "drift": new_drift,
        }
    )
