"""The rollout policy and the judgement of one stage (pure)."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from slmops.core.blueprint import parse_blueprint
from slmops.core.gates import GateConfig, judge_max_rate
from slmops.core.rollout import (
    ClassEvidence,
    GateSpec,
    GroupTotals,
    RolloutPolicy,
    evaluate_stage,
)

POLICY = RolloutPolicy(
    stages=(0.1, 0.5, 1.0),
    soak_s=60,
    min_reporting_devices=2,
    gates=(
        GateSpec(name="crashes", metric="crashes", min_samples=2, critical=True),
        GateSpec(name="rollbacks", metric="rollbacks", min_samples=1, max_rate=0.1, critical=True),
        GateSpec(name="errors", metric="errors", min_samples=100, max_increase=0.02, critical=True),
        GateSpec(name="latency", metric="latency", min_samples=50, max_ratio=1.3),
    ),
)


def _group(devices: int, requests: int, errors: int, latency_ms: float, seed: int) -> GroupTotals:
    rng = random.Random(seed)
    return GroupTotals(
        devices=devices,
        windows=devices * 2,
        requests=requests,
        errors=errors,
        samples_ms={"latency": [rng.lognormvariate(0, 0.3) * latency_ms for _ in range(requests)]},
    )


def _class(name: str, *, error_rate: float = 0.001, latency_ms: float = 200.0, **counts: int) -> ClassEvidence:
    values = {"devices": 50, "members": 5, "online_members": 5, "switched": 5, "reporting": 5, "rolled_back": 0}
    values.update(counts)
    return ClassEvidence(
        device_class=name,
        canary=_group(values["reporting"], 200 if values["reporting"] else 0, int(200 * error_rate), latency_ms, 1),
        baseline=_group(45, 2000, 2, 200.0, 2),
        **values,
    )


def test_a_healthy_stage_promotes_after_its_soak_and_holds_before() -> None:
    classes = [_class("a"), _class("b")]
    assert evaluate_stage(POLICY, 0, soaked_s=30, classes=classes).decision == "hold"
    result = evaluate_stage(POLICY, 0, soaked_s=61, classes=classes)
    assert result.decision == "promote" and "passed in 2 classes" in result.reason
    gates = {g.gate: g for g in result.classes[0].gates}
    assert gates["errors"].verdict == "pass" and gates["latency"].numbers["p_value"] > 0.05


def test_one_bad_class_halts_at_once_whatever_the_soak() -> None:
    result = evaluate_stage(POLICY, 0, soaked_s=1, classes=[_class("a"), _class("b", error_rate=0.2)])
    assert result.decision == "halt"
    assert "class b" in result.reason and "errors" in result.reason and "class a" not in result.reason
    assert [c.status for c in result.classes] == ["wait", "fail"]  # "a" waits for its soak
    numbers = result.numbers()
    assert numbers["classes"][1]["gates"][2]["numbers"]["canary_rate"] == pytest.approx(0.2)  # type: ignore[index]


def test_non_critical_gates_are_judged_once_the_stage_has_soaked() -> None:
    slow = [_class("a"), _class("b", latency_ms=400.0)]
    before = evaluate_stage(POLICY, 0, soaked_s=10, classes=slow)
    assert before.decision == "hold" and "soaking" in before.reason
    after = evaluate_stage(POLICY, 0, soaked_s=60, classes=slow)
    assert after.decision == "halt" and "class b" in after.reason and "latency" in after.reason


def test_no_data_waits_and_never_passes() -> None:
    result = evaluate_stage(POLICY, 0, soaked_s=600, classes=[_class("a", reporting=0, switched=0)])
    assert result.decision == "hold" and "0 of 2 canaries reported" in result.reason


def test_offline_canaries_are_not_waited_for_and_not_counted() -> None:
    offline = _class("b", online_members=0, reporting=0, switched=0)
    result = evaluate_stage(POLICY, 0, soaked_s=600, classes=[_class("a"), offline])
    assert result.decision == "promote" and "not judged (offline): b" in result.reason
    assert result.classes[1].status == "not judged"
    # One canary of the class still online: it must report; the offline ones are not waited for.
    partly = _class("b", online_members=1, reporting=0, switched=1)
    assert evaluate_stage(POLICY, 0, soaked_s=600, classes=[_class("a"), partly]).decision == "hold"
    reported = _class("b", online_members=1, reporting=1, switched=1)
    assert evaluate_stage(POLICY, 0, soaked_s=600, classes=[_class("a"), reported]).decision == "promote"
    everyone_offline = [_class("a", online_members=0, reporting=0)]
    assert evaluate_stage(POLICY, 0, soaked_s=600, classes=everyone_offline).decision == "hold"


def test_a_class_without_baseline_is_judged_by_crashes_and_rollbacks_only() -> None:
    lone = ClassEvidence(
        device_class="solo",
        devices=1,
        members=1,
        online_members=1,
        switched=1,
        reporting=1,
        rolled_back=0,
        canary=GroupTotals(devices=1, windows=3, requests=0),
    )
    result = evaluate_stage(POLICY, 0, soaked_s=600, classes=[lone])
    assert result.decision == "promote" and "no baseline" in result.classes[0].reason
    crashed = ClassEvidence(**{**lone.__dict__, "canary": GroupTotals(devices=1, windows=3, crashes=1)})
    assert evaluate_stage(POLICY, 0, soaked_s=0, classes=[crashed]).decision == "halt"


def test_rollbacks_are_judged_against_their_rate_limit() -> None:
    config = GateConfig(name="rollbacks", kind="max_rate", max_rate=0.05, min_samples=1, critical=True)
    assert judge_max_rate(1, 10, config).verdict == "pass"  # p = 0.40: one in ten is no evidence
    failed = judge_max_rate(3, 10, config)
    assert failed.verdict == "fail" and failed.numbers["p_value"] < 0.05
    assert judge_max_rate(0, 0, config).verdict == "wait"
    many = evaluate_stage(POLICY, 0, soaked_s=0, classes=[_class("a", rolled_back=4, switched=2, reporting=2)])
    assert many.decision == "halt" and "rollbacks" in many.reason
    # A few failures across a big stage are judged against every canary that tried it, not only those that have
    # reported in this stage so far.
    few = _class("a", devices=3000, members=1500, online_members=1500, switched=1400, reporting=8, rolled_back=4)
    assert {g.gate: g.verdict for g in evaluate_stage(POLICY, 2, 0, [few]).classes[0].gates}["rollbacks"] == "pass"


def test_canaries_that_rolled_back_are_not_waited_for_and_all_of_them_fail_the_class() -> None:
    loose = RolloutPolicy.model_validate(
        {
            **POLICY.model_dump(),
            "gates": [{"name": "rollbacks", "metric": "rollbacks", "min_samples": 1, "max_rate": 0.2}],
        }
    )
    # One canary that rolled back at once: 1 of 1 is no significant evidence at a 20% limit, but it will never
    # report on the new version, so waiting for it would hold the release for ever.
    lone = _class("k", members=1, online_members=1, switched=0, reporting=0, rolled_back=1)
    result = evaluate_stage(loose, 0, soaked_s=0, classes=[lone])
    assert result.decision == "halt" and "rolled the new version back" in result.reason
    # Two canaries, one rolled back, the other reported: the class is judged on the one that can report.
    pair = _class("k", members=2, online_members=2, switched=1, reporting=1, rolled_back=1)
    assert evaluate_stage(loose, 0, soaked_s=600, classes=[pair]).classes[0].status == "pass"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"stages": [0.5, 0.1, 1.0]}, "grow strictly"),
        ({"stages": [0.1, 0.5]}, "last stage must be 1.0"),
        ({"stages": [0, 1.0]}, "fraction of each device class"),
        ({"gates": [{"name": "r", "metric": "rollbacks"}]}, "needs max_rate"),
        ({"gates": [{"name": "x", "metric": "errors"}, {"name": "x", "metric": "latency"}]}, "unique"),
        ({"soak": 5}, "Extra inputs"),
    ],
)
def test_bad_policies_say_what_is_wrong(value: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RolloutPolicy.model_validate(value)


def test_a_blueprint_carries_its_rollout_policy_and_old_blueprints_keep_their_digest() -> None:
    plain = "apiVersion: slmops/v1\nkind: Blueprint\nmetadata: {name: a}\nspec:\n  model: {name: m, ref: v1}\n"
    blueprint = parse_blueprint(plain)
    assert "rollout" not in blueprint.to_json_value()["spec"]
    with_policy = parse_blueprint(plain + "  rollout: {stages: [0.2, 1.0], soak_s: 30}\n")
    assert with_policy.spec.rollout is not None and with_policy.spec.rollout.stages == (0.2, 1.0)
    assert with_policy.digest != blueprint.digest
