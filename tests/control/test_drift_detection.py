"""Drift detection through the control plane's own path: hourly windows of 3 devices per class (~300 requests per
class-hour, a daily cycle and step noise) stored by the telemetry ingestion service, judged by ``drift_facts`` after
every hour (the last three hours against the first two days), dated by ``drift_entry``.

Stated bounds: an unshifted fleet of two classes raises at most 2 false alarms (warn or alert, any of the six
signals) over 500 hours (904 class-hours judged); prompts 30% longer or inputs 0.3 nats per token more surprising on
one class are flagged by the 4th shifted window (at most 3 hours after the end of the shift's first hour) with the
shift's start dated at most 3 hours early and never late; the unshifted data of those runs (the other class, and the
shifted class before its shift: ~110 class-hours a run) raise at most 2 false alarms over three runs.
"""

from __future__ import annotations

import pytest
from benchmarks.drift_detection import SHIFT_AT, ShiftCase, run_one

from tests.telemetry.synthetic import Shift

SEEDS = (101, 102, 103)
MAX_DELAY_H = 3


def test_an_unshifted_fleet_raises_almost_no_drift_alarm_over_500_hours() -> None:
    result = run_one(7, None, hours=500)

    assert result.hours == 500 and result.evaluated_class_hours == 2 * (500 - 48)
    assert result.false_alarms <= 2, f"{result.false_alarms} false alarms in {result.evaluated_class_hours} class-hours"


@pytest.mark.parametrize(
    "case",
    [
        ShiftCase("prompts 30% longer", "prompt_tokens", Shift(SHIFT_AT, prompt_scale=1.3)),
        ShiftCase("prompt NLL +0.3 nats", "prompt_nll", Shift(SHIFT_AT, nll_shift=0.3)),
    ],
    ids=lambda case: case.label,
)
def test_a_shift_on_one_class_is_flagged_within_four_windows_and_dated(case: ShiftCase) -> None:
    false_alarms = 0
    for seed in SEEDS:
        result = run_one(seed, case)
        false_alarms += result.false_alarms

        assert result.delay is not None and 0 <= result.delay <= MAX_DELAY_H, f"seed {seed}: delay {result.delay}"
        assert result.began_error is not None and -3 <= result.began_error <= 0, f"seed {seed}: {result.began_error}"
    assert false_alarms <= 2, f"{false_alarms} false alarms on the unshifted data of {len(SEEDS)} runs"
