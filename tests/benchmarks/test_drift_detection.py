"""The drift-detection benchmark end to end at toy size: one seed, a short stable run, one shift case."""

from __future__ import annotations

from benchmarks.drift_detection import SHIFT_AT, ShiftCase, markdown, run_benchmark

from tests.telemetry.synthetic import Shift


def test_a_tiny_benchmark_measures_delay_and_false_alarms_and_renders_them() -> None:
    # Prepare: a large shift, so one seed finds it
    case = ShiftCase("prompts twice as long", "prompt_tokens", Shift(SHIFT_AT, prompt_scale=2.0))

    # Execute
    result = run_benchmark(seeds=1, stable_steps=60, devices_per_class=2, cases=[case], command="test")

    # Assert
    stable, shifted = result.runs
    assert (stable.case, stable.hours, stable.evaluated_class_hours) == ("stable", 60, 2 * 12)
    assert shifted.case == case.label and shifted.delay is not None and shifted.delay <= 2
    assert shifted.hours == SHIFT_AT + shifted.delay + 4  # stops 3 hours after the detection
    assert shifted.began_error is not None and len(shifted.facts_ms) == shifted.hours
    table = markdown(result)
    assert "| prompts twice as long | 1 | 1 |" in table
    assert "False alarms, stable runs (1 runs x 60 hours x 2 classes, 24 class-hours" in table
    assert "Command: `test`" in table
