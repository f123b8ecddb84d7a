"""The capacity benchmark end to end at toy size: a real `slmops server`, a bare app, a load generator process."""

from __future__ import annotations

from pathlib import Path

from benchmarks.capacity import markdown, run_capacity


def test_a_tiny_capacity_run_measures_both_servers_and_renders_a_table(tmp_path: Path) -> None:
    # Execute: 50 devices, two short low-rate steps per server.
    result = run_capacity(50, 1.0, warmup_s=0.3, rates=(20, 40), workdir=tmp_path / "work")

    # Assert: every step of both servers recorded, the lowest rate served without errors and mostly 304s.
    assert sum(result.classes.values()) == 50 and len(result.classes) == 4
    for run in (result.control, result.bare):
        assert [s.offered_rps for s in run.steps] == [20, 40], run
        lowest = run.steps[0]
        assert lowest.errors == 0 and lowest.requests == 20, lowest
        assert lowest.achieved_rps > 0 and lowest.p50_ms <= lowest.p99_ms < 10_000, lowest
        assert run.capacity_rps > 0
    control = result.control.steps[0].statuses
    assert control == {"GET 304": 10, "POST 200": 10}, control
    assert result.bare.steps[0].statuses == {"GET 200": 10, "POST 200": 10}
    assert (tmp_path / "work" / "home").is_dir()

    table = markdown(result)
    assert "slmops control plane: at least" in table and "| 40 |" in table
