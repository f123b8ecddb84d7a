"""The scale benchmark end to end at toy size: a PostgreSQL schema, two replicas behind haproxy, two generators."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.scale import markdown, run_scale
from sqlalchemy import create_engine, text

from tests.conftest import POSTGRES_URL
from tests.lb_servers import HAPROXY


@pytest.mark.skipif(not POSTGRES_URL, reason="set SLMOPS_TEST_POSTGRES_URL to run")
@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_a_tiny_fleet_is_stepped_then_sustained_through_haproxy_and_its_cost_per_device_reported(
    tmp_path: Path,
) -> None:
    assert POSTGRES_URL is not None
    # Execute: 300 devices; one capacity step, then 4 s of the sustained rate its capacity allows.
    result = run_scale(
        POSTGRES_URL,
        300,
        rates=(60,),
        step_s=2.0,
        warmup_s=0.5,
        idle_s=1.0,
        sustain_s=4.0,
        workdir=tmp_path / "work",
        progress=False,
    )

    # Assert: the step within the limit; the interval follows from its capacity (2 x 300 requests at 60% of it,
    # rounded up to a whole minute); every sustained request answered from the quiet fleet (304 polls, 200 beats).
    assert sum(result.classes.values()) == 300
    (step,) = result.capacity_steps
    assert step.within_limit and step.offered_rps == 60 and step.errors == 0, step
    assert result.capacity_rps > 0 and result.interval_s == 60
    sustained = result.sustained
    assert sustained is not None and sustained.errors == 0, sustained
    assert sustained.requests == 40 and sustained.statuses == {"GET 304": 20, "POST 200": 20}, sustained
    assert sustained.cpu_s["replicas"] > 0 and sustained.cpu_s["generators"] > 0, sustained.cpu_s
    assert result.db_rows["devices"] == 300 and result.db_bytes_after >= result.db_bytes_before > 0
    assert {"replicas", "postgres", "haproxy"} <= set(result.idle_cores)

    text_ = markdown(result)
    assert "ms of CPU per device per interval" in text_ and "devices per core with an interval of 60 s" in text_

    # The benchmark's schema is gone afterwards.
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.connect() as connection:
            left = connection.execute(
                text("SELECT count(*) FROM pg_namespace WHERE nspname = :s"), {"s": result.schema}
            ).scalar_one()
    finally:
        engine.dispose()
    assert left == 0
