"""The metrics-cost benchmark end to end at toy size: two real `slmops server` processes, metrics on and off."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks._report import write_section
from benchmarks.metrics_cost import markdown, run_metrics_cost


def test_a_tiny_metrics_cost_run_measures_both_servers_and_renders_a_section(tmp_path: Path) -> None:
    # Execute: 30 devices, two one-second rounds per server in half-second slices, a scrape every half second of
    # the metrics-on server's serving time.
    result = run_metrics_cost(
        30,
        rounds=2,
        round_s=1.0,
        slice_s=0.5,
        concurrency=2,
        scrape_interval_s=0.5,
        warmup_s=0.5,
        metrics_cache_s=0.1,
        scrape_probes=2,
        wrapper_calls=2_000,
        workdir=tmp_path / "work",
    )

    # Assert: every round of both servers answered device requests (304 polls and 200 heartbeats) without errors,
    # only the metrics-on server was scraped, and the CPU per request is a measured number.
    assert [(r.mode, r.index) for r in result.rounds] == [("on", 0), ("off", 0), ("on", 1), ("off", 1)]
    for r in result.rounds:
        assert r.errors == 0 and r.requests > 0, r
        assert set(r.statuses) == {"GET 304", "POST 200"}, r.statuses
        assert r.server_cpu_s > 0 and math.isfinite(r.cpu_us_per_request), r
    # A scrape every 0.5 s of the metrics-on server's serving time, in 0.5 s slices: each of its slices scrapes.
    assert [r.scrapes for r in result.rounds] == [2, 0, 2, 0]
    assert result.scrape_samples > 100 and math.isfinite(result.paired_overhead)
    assert result.wrapper_us["on"] > result.wrapper_us["off"] > 0
    assert len(result.scrape_cpu_ms) == 2 and all(v >= 0 for v in result.scrape_cpu_ms)
    assert "--devices 30 --rounds 2" in result.command

    # The section replaces itself in place, leaving the rest of the file alone.
    section = markdown(result)
    assert "of server CPU per device request" in section and result.command in section
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nother section\n")
    write_section(section, "metrics-cost", target)
    write_section(section, "metrics-cost", target)
    text = target.read_text()
    assert text.count("<!-- metrics-cost:begin -->") == 1 and "other section" in text
