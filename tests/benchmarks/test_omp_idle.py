"""The OpenMP idle-cost benchmark end to end on a tiny generated GGUF: one child per policy, its section written."""

from __future__ import annotations

from pathlib import Path

from benchmarks.omp_idle import POLICIES, markdown, measure

from tests.tiny_gguf import write_tiny_gguf


def test_each_policy_is_measured_in_its_own_process_and_reported(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)

    results = measure(model, threads=2, idle_s=0.5)

    assert list(results) == list(POLICIES)
    for r in results.values():
        assert r["decode_tokens_per_s"] > 0 and 0 <= r["idle_cpu_pct"] <= 400
    assert results["passive"]["idle_cpu_pct"] < 50  # sleeping threads: an idle process costs next to nothing
    text = markdown(results, 2, 0.5, "python -m benchmarks.omp_idle --threads 2")
    assert "| unset (bounded: the runtime's default) |" in text and "| active |" in text and "| passive |" in text
