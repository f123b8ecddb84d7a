"""Seeded synthetic drift series: hourly steps of one (version, class), with a daily cycle and step-to-step noise
in the inputs (real traffic is never stationary), and an optional shift from step ``shift_at`` on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from slmops.telemetry.aggregate import histogram_from_ms
from slmops.telemetry.drift import DriftPoint, RequestSummary, summarize

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEP_S = 3600.0
MAX_TOKENS = 512


@dataclass(frozen=True)
class Shift:
    at: int  # first shifted step
    prompt_scale: float = 1.0  # prompts this many times longer
    nll_shift: float = 0.0  # nats per token more surprising


def series(steps: int, seed: int, shift: Shift | None = None, requests_per_step: int = 300) -> list[DriftPoint]:
    rng = np.random.default_rng(seed)
    points = []
    for t in range(steps):
        n = int(rng.poisson(requests_per_step))
        cycle = 0.08 * math.sin(2 * math.pi * t / 24) + rng.normal(0, 0.03)
        shifted = shift is not None and t >= shift.at
        scale = shift.prompt_scale if shift is not None and shifted else 1.0
        nll_shift = shift.nll_shift if shift is not None and shifted else 0.0
        prompt = np.maximum(1, rng.lognormal(math.log(120) + cycle + math.log(scale), 0.8, n)).astype(int)
        completion = np.minimum(MAX_TOKENS, rng.lognormal(math.log(80), 0.7, n)).astype(int)
        completion = np.where(rng.random(n) < 0.01, 0, completion)
        nll = rng.normal(2.8 + 0.6 * cycle + nll_shift, 0.6, n)
        latency_s = 0.0005 * prompt + 0.02 * completion + rng.exponential(0.05, n)
        requests = [
            RequestSummary(int(p), int(c), "length" if c >= MAX_TOKENS else "stop", float(x))
            for p, c, x in zip(prompt, completion, nll, strict=True)
        ]
        points.append(
            DriftPoint(
                start=T0 + timedelta(seconds=t * STEP_S),
                latency_ms=histogram_from_ms(latency_s * 1000),
                summary=summarize(requests),
            )
        )
    return points


def step_of(moment: datetime | None) -> int | None:
    return None if moment is None else round((moment - T0).total_seconds() / STEP_S)
