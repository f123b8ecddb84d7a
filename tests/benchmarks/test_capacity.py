"""The capacity benchmark end to end at toy size: a real `slmops server`, a bare app, a load generator process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from benchmarks.capacity import markdown, run_capacity, run_wrk, write_markdown


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


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_a_tiny_wrk_run_compares_both_endpoints_with_bare_and_nests_its_table(tmp_path: Path) -> None:
    # Execute: 20 devices, one round of 1-second runs.
    result = run_wrk(20, 1.0, connections=2, rounds=1, workdir=tmp_path / "work")

    # Assert: four runs; ours answered 304 to every poll and 200 to every heartbeat, with the devices' credentials.
    runs = {(r.endpoint, r.server): r for r in result.runs}
    assert sorted(runs) == [("heartbeat", "bare"), ("heartbeat", "control"), ("poll", "bare"), ("poll", "control")]
    assert set(runs["poll", "control"].statuses) == {"304"} and set(runs["heartbeat", "control"].statuses) == {"200"}
    assert all(r.errors == 0 and r.requests > 0 and r.rps > 0 and r.p50_ms <= r.p99_ms for r in result.runs)
    assert result.ratio("poll") > 0 and result.ratio("heartbeat") > 0
    assert (tmp_path / "work" / "wrk-fleet.txt").read_text().count("\n") == 20

    # The wrk table goes inside the capacity section and keeps the open-loop tables around it.
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n<!-- capacity:begin -->\nopen-loop tables\n<!-- capacity:end -->\n")
    write_markdown(None, result, target)
    write_markdown(None, result, target)
    text = target.read_text()
    assert text.count("<!-- capacity-wrk:begin -->") == 1 and "open-loop tables" in text
    assert text.index("capacity-wrk:end") < text.index("capacity:end") and "% of bare**" in text
