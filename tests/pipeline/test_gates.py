"""Per-class gates (pure) and the JUnit XML / Markdown reports they become."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from slmops.pipeline import PipelineReport, junit_xml, markdown_summary, matrix_gates, offline_gates
from slmops.pipeline.matrix import MatrixRun
from slmops.pipeline.run import ClassDecision
from slmops.pipeline.spec import ClassGates, DeviceClassSpec

MIB = 1 << 20
GATES = ClassGates(max_perplexity_increase_pct=5, max_accuracy_drop=0.02, ram_share=0.5, min_decode_tokens_per_s=10)
SMALL = DeviceClassSpec(name="x86_64-1gb", memory_mib=1024, cores=2)


def _run(**changes: object) -> MatrixRun:
    values: dict[str, object] = {
        "variant": "q4", "device_class": SMALL.name, "digest": "sha256:x", "ok": True, "reason": "served 3 prompts",
        "reached": "done", "prompts": 3, "tokens_per_s": 25.0, "peak_memory_bytes": 300 * MIB,
        "peak_memory_source": "cgroup2 peak charge",
    }  # fmt: skip
    values.update(changes)
    return MatrixRun(**values)  # type: ignore[arg-type]


def _status(gates: list[object]) -> dict[str, str]:
    return {g.name: g.status for g in gates}  # type: ignore[attr-defined]


def test_offline_gates_compare_with_the_baseline_and_the_class_ram_share() -> None:
    baseline = {"perplexity": 10.0, "accuracy": 0.60}

    good = offline_gates(
        GATES, SMALL, "q8", baseline, {"perplexity": 10.4, "accuracy": 0.59, "estimated_memory_bytes": 400 * MIB}
    )
    bad = offline_gates(
        GATES, SMALL, "q2", baseline, {"perplexity": 10.6, "accuracy": 0.50, "estimated_memory_bytes": 600 * MIB}
    )

    assert _status(good) == {"perplexity": "pass", "task accuracy": "pass", "memory estimate": "pass"}
    assert _status(bad) == {"perplexity": "fail", "task accuracy": "fail", "memory estimate": "fail"}
    assert "+6.00%" in bad[0].reason and "does not fit" in bad[2].reason


def test_an_unset_limit_or_missing_tasks_is_skipped_but_missing_perplexity_fails() -> None:
    gates = offline_gates(ClassGates(max_perplexity_increase_pct=5), SMALL, "q8", {}, {"perplexity": 3.0})

    assert _status(gates) == {"perplexity": "fail", "task accuracy": "skipped", "memory estimate": "skipped"}


def test_matrix_gates_fail_a_slow_or_too_big_variant_and_a_failed_run_fails_every_matrix_gate() -> None:
    assert _status(matrix_gates(GATES, SMALL, "q4", _run())) == {
        "test matrix": "pass", "memory": "pass", "decode tokens/s": "pass",
    }  # fmt: skip
    slow = matrix_gates(GATES, SMALL, "q4", _run(tokens_per_s=9.9, peak_memory_bytes=513 * MIB))
    assert _status(slow) == {"test matrix": "pass", "memory": "fail", "decode tokens/s": "fail"}
    assert "9.9 tokens/s" in slow[2].reason
    dead = matrix_gates(GATES, SMALL, "q4", _run(ok=False, reason="does not fit: killed at the cap", reached="enroll"))
    assert [g.status for g in dead] == ["fail", "fail", "fail"] and dead[0].reason.startswith("does not fit")
    skipped = matrix_gates(GATES, SMALL, "q4", None, "a quality gate failed")
    assert [g.status for g in skipped] == ["skipped"] * 3


def test_junit_has_a_testcase_per_class_and_gate_and_per_matrix_run_with_failures_counted() -> None:
    big = DeviceClassSpec(name="x86_64-8gb", memory_mib=8192, cores=2)
    report = PipelineReport("ci", outcome="partial")
    baseline, metrics = {"perplexity": 10.0}, {"perplexity": 10.1, "estimated_memory_bytes": 200 * MIB}
    for cls, run in (
        (SMALL, _run(ok=False, reason="killed & <capped>", reached="enroll")),
        (big, _run(device_class=big.name)),
    ):
        report.gates += offline_gates(GATES, cls, "q4", baseline, metrics) + matrix_gates(GATES, cls, "q4", run)
        report.matrix.append(run)
    report.decisions = [
        ClassDecision(SMALL.name, None, None, "b", False, "not released: killed | capped"),
        ClassDecision(big.name, "q4", "sha256:x", "b2", True, "released"),
    ]

    root = ET.fromstring(junit_xml(report))

    assert root.tag == "testsuites" and root.get("tests") == "14" and root.get("failures") == "4"
    small_suite, big_suite = list(root)
    assert small_suite.get("name") == "ci.x86_64-1gb" and small_suite.get("failures") == "4"
    assert big_suite.get("failures") == "0" and big_suite.get("skipped") == "1"
    failed = [c.get("name") for c in small_suite if c.find("failure") is not None]
    assert failed == ["q4: test matrix", "q4: memory", "q4: decode tokens/s", "matrix q4"]
    assert small_suite[-1].find("failure").get("message") == "killed & <capped>"  # type: ignore[union-attr]
    text = markdown_summary(report)
    assert "⚠️ partial" in text and "killed \\| capped" in text and "| x86_64-8gb | q4 | yes |" in text
