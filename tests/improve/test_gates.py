"""The improve gates: a candidate passes only when the task improves and nothing else regresses beyond its limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmops.errors import BlueprintError
from slmops.improve.gates import judge
from slmops.improve.spec import ImproveGates, parse_improve

PARENT = {"task_format": 0.1, "task_exact": 0.0, "task_nll": 2.0, "perplexity": 20.0, "accuracy": 0.5}


def _status(outcomes: list, name: str) -> str:
    return next(o.status for o in outcomes if o.name.startswith(name))


def test_a_better_candidate_passes_every_gate() -> None:
    candidate = {**PARENT, "task_format": 0.9, "task_nll": 0.5, "perplexity": 20.5, "accuracy": 0.5}
    outcomes = judge(
        ImproveGates(task_metric="format", min_gain=0.3), PARENT, candidate, base_bytes=100, adapter_bytes=3
    )
    assert [o.status for o in outcomes] == ["pass", "pass", "pass", "pass"]


def test_each_regression_fails_its_own_gate() -> None:
    gates = ImproveGates(task_metric="nll", min_gain=0.1, max_perplexity_increase_pct=5, max_accuracy_drop=0.02)
    worse = {**PARENT, "task_nll": 1.95, "perplexity": 21.5, "accuracy": 0.45}
    outcomes = judge(gates, PARENT, worse, base_bytes=100, adapter_bytes=10)
    assert _status(outcomes, "held-out") == "fail"  # gain 0.05 < 0.1
    assert _status(outcomes, "general perplexity") == "fail"  # +7.5%
    assert _status(outcomes, "task accuracy") == "fail"  # drop 0.05
    assert _status(outcomes, "adapter size") == "fail"  # 10% > 5%


def test_an_unmeasured_task_score_fails_rather_than_passing_silently() -> None:
    parent = {k: v for k, v in PARENT.items() if k != "task_format"}
    outcomes = judge(ImproveGates(task_metric="format"), parent, parent, base_bytes=100, adapter_bytes=1)
    assert _status(outcomes, "held-out") == "fail"
    no_tasks = {k: v for k, v in PARENT.items() if k != "accuracy"}
    assert (
        _status(judge(ImproveGates(), no_tasks, no_tasks, base_bytes=1, adapter_bytes=0), "task accuracy") == "skipped"
    )


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.5))
def test_the_task_gate_passes_exactly_when_the_gain_reaches_the_minimum(
    before: float, after: float, gain: float
) -> None:
    outcomes = judge(
        ImproveGates(task_metric="exact", min_gain=gain),
        {**PARENT, "task_exact": before},
        {**PARENT, "task_exact": after},
        base_bytes=100,
        adapter_bytes=1,
    )
    assert (_status(outcomes, "held-out") == "pass") == (after - before >= gain and after > before)


def test_the_recipe_is_strict_and_names_the_field() -> None:
    spec = parse_improve({"name": "shop", "model": "gemma3-270m@v1", "dataset": "shop@latest", "lora": {"rank": 4}})
    assert spec.variant == "lora-shop" and spec.gates.task_metric == "nll"
    with pytest.raises(BlueprintError, match=r"gates\.min_gian"):
        parse_improve({"name": "shop", "model": "m", "dataset": "d", "gates": {"min_gian": 1}})
    with pytest.raises(BlueprintError, match="dataset"):
        parse_improve({"name": "shop", "model": "m", "dataset": "d", "lora": {"dataset": "x.jsonl"}})
    with pytest.raises(BlueprintError, match="regular expression"):
        parse_improve({"name": "shop", "model": "m", "dataset": "d", "evaluation": {"format_regex": "("}})
