"""Drift detection on seeded synthetic series (hourly steps of ~300 requests, a daily cycle and step noise).

Stated bounds: a prompts-30%-longer or inputs-0.3-nats-more-surprising shift is found by the change-point search
within 3 steps and by the rolling verdict (last 3 steps against the first 2 days) within 2 steps, with the shift's
start placed at most 2 steps early; an unshifted 1,000-step series (41 days) raises at most 2 false alarms in
either way over all six signals.
"""

from __future__ import annotations

import pytest

from slmops.telemetry.changepoint import cusum_alarms
from slmops.telemetry.drift import (
    SIGNALS,
    DriftConfig,
    DriftPoint,
    ReferenceSpec,
    Signal,
    compare,
    select_reference,
    shift_start,
)
from tests.telemetry.synthetic import Shift, series, step_of

REFERENCE = ReferenceSpec(first_s=2 * 86400)
CURRENT_STEPS = 3
SHIFT_AT = 100
SEEDS = range(11, 17)


def _rolling_levels(reference: list[DriftPoint], points: list[DriftPoint], end: int, signals: list[Signal]) -> set[str]:
    current = points[end - CURRENT_STEPS + 1 : end + 1]
    return {v.level for v in compare(reference, current, DriftConfig(), signals)}


def test_an_unshifted_long_series_raises_few_false_alarms() -> None:
    # Prepare
    points = series(1000, seed=7)
    reference = select_reference(points, REFERENCE)
    monitored = points[len(reference) :]
    config = DriftConfig()

    # Execute
    cusum = 0
    for signal in SIGNALS:
        estimate = shift_start(reference, monitored, signal, config)
        cusum += len(
            cusum_alarms(
                estimate.window_psi,
                target=estimate.null_mean,
                scale=estimate.null_scale,
                k=config.cusum_k,
                h=config.cusum_h,
            )
        )
    rolling = 0
    for end in range(len(reference) + CURRENT_STEPS - 1, len(points)):
        rolling += sum(
            1 for v in compare(reference, points[end - CURRENT_STEPS + 1 : end + 1]) if v.level in ("warn", "alert")
        )

    # Assert
    assert len(reference) == 48 and len(monitored) == 952
    assert cusum <= 2, f"{cusum} change-point false alarms over {len(monitored)} steps x {len(SIGNALS)} signals"
    assert rolling <= 2, f"{rolling} rolling false alarms over {len(monitored)} steps x {len(SIGNALS)} signals"


@pytest.mark.parametrize(
    ("shift", "signal"),
    [
        (Shift(at=SHIFT_AT, prompt_scale=1.3), "prompt_tokens"),
        (Shift(at=SHIFT_AT, nll_shift=0.3), "prompt_nll"),
    ],
    ids=["prompts-30pct-longer", "nll-plus-0.3"],
)
def test_a_shift_is_detected_within_three_steps_and_dated(shift: Shift, signal: Signal) -> None:
    for seed in SEEDS:
        # Prepare
        points = series(160, seed=seed, shift=shift)
        reference = select_reference(points, REFERENCE)

        # Execute
        estimate = shift_start(reference, points[len(reference) :], signal)
        rolling_delay = next(
            (
                end - SHIFT_AT
                for end in range(SHIFT_AT, len(points))
                if _rolling_levels(reference, points, end, [signal]) & {"warn", "alert"}
            ),
            None,
        )

        # Assert
        detected, began = step_of(estimate.detected), step_of(estimate.began)
        assert detected is not None and began is not None, f"seed {seed}: no change point found"
        assert SHIFT_AT <= detected <= SHIFT_AT + 3, f"seed {seed}: detected at step {detected}"
        assert SHIFT_AT - 2 <= began <= SHIFT_AT, f"seed {seed}: shift dated to step {began}"
        assert rolling_delay is not None and rolling_delay <= 2, f"seed {seed}: rolling delay {rolling_delay}"


def test_a_shift_on_one_signal_leaves_the_others_quiet() -> None:
    points = series(160, seed=3, shift=Shift(at=SHIFT_AT, nll_shift=0.3))
    reference = select_reference(points, REFERENCE)
    verdicts = {v.signal: v for v in compare(reference, points[-CURRENT_STEPS:])}
    assert verdicts["prompt_nll"].level in ("warn", "alert")
    assert verdicts["prompt_nll"].numbers["current_mean"] - verdicts["prompt_nll"].numbers["reference_mean"] > 0.2
    assert all(verdicts[s].level == "ok" for s in SIGNALS if s != "prompt_nll"), verdicts
