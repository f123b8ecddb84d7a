"""Releases: the rollout policy (stages, soak, gates) and the judgement of one stage. Pure: no I/O, no clock.

A release moves a blueprint from one model version to another through stages (default 1% -> 10% -> 50% -> 100%).
The controller (``slmops.control.rollouts``) gathers, per device class, the :class:`ClassEvidence` of the current
stage -- canary telemetry on the new version since the stage began, baseline telemetry on the old version since the
release began, how many canaries are online and how many reported -- and asks :func:`evaluate_stage` what to do:

- **halt** as soon as any class fails a critical gate (critical gates fail at once, see :mod:`slmops.core.gates`),
  whatever the soak time, or, once the stage has soaked and a class has all its data, fails a non-critical gate:
  the controller then rolls the release back. Non-critical gates are not judged before the soak ends, because
  looking at growing data at every tick would multiply their false alarms.
- **hold** while the stage has soaked for less than ``soak_s``, or any class is still waiting for data: too few
  reporting canaries, or too few samples for a gate. No data never passes.
- **promote** when every judged class passes; on the last stage that completes the release.

Offline canaries neither block a stage forever nor count as healthy: a class needs
``min(min_reporting_devices, canaries online)`` reporting canaries, so a canary that went offline stops being
waited for; only canaries that reported telemetry are judged; and a class whose canaries are all offline (and none
reported) is *not judged* -- it is listed as such in the stage's evaluation and its canaries are judged in the next
stage they report in. A stage where no class could be judged holds.

A gate compares canaries with baseline devices of the *same class*. A class without any baseline (every device of
the class is a canary, e.g. a class of one) has only its non-comparative gates (crashes, rollbacks) applied and says
so in its reason.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slmops.core.gates import (
    GateConfig,
    GateResult,
    judge_count_zero,
    judge_error_rate,
    judge_latency,
    judge_max_rate,
)

__all__ = [
    "DEFAULT_GATES",
    "DEFAULT_STAGES",
    "ClassEvidence",
    "ClassVerdict",
    "GateSpec",
    "GroupTotals",
    "Metric",
    "RolloutPolicy",
    "StageEvaluation",
    "evaluate_stage",
]

Metric = Literal["latency", "ttft", "per_token", "errors", "crashes", "rollbacks"]
LATENCY_METRICS: tuple[Metric, ...] = ("latency", "ttft", "per_token")
DEFAULT_STAGES: tuple[float, ...] = (0.01, 0.10, 0.50, 1.0)


class GateSpec(BaseModel):
    """One gate as written in a blueprint's ``spec.rollout.gates`` or a release request.

    ``metric`` decides the test: ``latency`` / ``ttft`` / ``per_token`` (seconds per generated token, i.e. the
    inverse of tokens/s) use Mann-Whitney against the baseline and the ``quantile`` ratio ``max_ratio``;
    ``errors`` uses Fisher's exact test with ``max_increase`` / ``max_ratio``; ``crashes`` must be zero when
    ``critical`` (else compared with the baseline's rate per device-window); ``rollbacks`` is the share of canaries
    that rolled the version back on the device, judged against ``max_rate`` with an exact binomial test.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    metric: Metric
    min_samples: int = Field(default=50, ge=1)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    max_ratio: float | None = Field(default=None, ge=1)
    max_increase: float | None = Field(default=None, ge=0, lt=1)
    max_rate: float | None = Field(default=None, ge=0, lt=1)
    critical: bool = False
    quantile: float = Field(default=0.95, gt=0, lt=1)

    @model_validator(mode="after")
    def _rate_for_rollbacks(self) -> GateSpec:
        if self.metric == "rollbacks" and self.max_rate is None:
            raise ValueError("a rollbacks gate needs max_rate (the largest tolerated share of canaries, e.g. 0.05)")
        return self

    def config(self) -> GateConfig:
        if self.metric in LATENCY_METRICS:
            kind: Literal["latency", "error_rate", "count_zero", "max_rate"] = "latency"
        elif self.metric == "errors":
            kind = "error_rate"
        elif self.metric == "crashes":
            kind = "count_zero"
        else:
            kind = "max_rate"
        return GateConfig(
            name=self.name,
            kind=kind,
            min_samples=self.min_samples,
            alpha=self.alpha,
            max_ratio=self.max_ratio,
            max_increase=self.max_increase,
            max_rate=self.max_rate,
            critical=self.critical,
            quantile=self.quantile,
        )


DEFAULT_GATES: tuple[GateSpec, ...] = (
    GateSpec(name="crashes", metric="crashes", min_samples=5, critical=True),
    GateSpec(name="rollbacks", metric="rollbacks", min_samples=1, max_rate=0.05, critical=True),
    GateSpec(name="error-rate", metric="errors", min_samples=200, max_increase=0.01, max_ratio=1.5, critical=True),
    GateSpec(name="p95-latency", metric="latency", min_samples=100, max_ratio=1.25),
    GateSpec(name="tokens-per-s", metric="per_token", min_samples=100, max_ratio=1.25),
)


class RolloutPolicy(BaseModel):
    """How a release moves: stage fractions, soak per stage, reporting canaries needed per class, and gates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: tuple[float, ...] = DEFAULT_STAGES
    soak_s: float = Field(default=600.0, ge=0, le=30 * 86400)
    min_reporting_devices: int = Field(default=3, ge=1)
    min_per_class: int = Field(default=1, ge=1)
    gates: tuple[GateSpec, ...] = DEFAULT_GATES

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("give at least one stage, e.g. [0.01, 0.1, 0.5, 1.0]")
        for fraction in value:
            if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
                raise ValueError(f"a stage is a fraction of each device class in (0, 1], e.g. 0.01; got {fraction}")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(f"stages must grow strictly, e.g. [0.01, 0.1, 0.5, 1.0]; got {list(value)}")
        if value[-1] != 1.0:
            raise ValueError(f"the last stage must be 1.0 (the whole fleet); got {value[-1]}")
        return value

    @field_validator("gates")
    @classmethod
    def _unique_names(cls, value: tuple[GateSpec, ...]) -> tuple[GateSpec, ...]:
        names = [g.name for g in value]
        if len(names) != len(set(names)):
            raise ValueError(f"gate names must be unique; got {names}")
        return value


@dataclass(frozen=True)
class GroupTotals:
    """Telemetry of one group (canaries or baseline) of one class. Latency samples are in milliseconds."""

    devices: int = 0
    windows: int = 0
    requests: int = 0
    errors: int = 0
    crashes: int = 0
    samples_ms: Mapping[str, Sequence[float]] = field(default_factory=dict)  # latency / ttft / per_token


@dataclass(frozen=True)
class ClassEvidence:
    """What the controller knows about one device class in the current stage."""

    device_class: str
    devices: int  # devices of the class the release applies to
    members: int  # canaries: devices of the class in the stage's cohort
    online_members: int  # canaries heard from recently
    switched: int  # canaries whose active version is the new one
    reporting: int  # canaries that sent telemetry on the new version in this stage
    rolled_back: int  # canaries that failed the new version on the device: rolled back or failed its probe (release)
    canary: GroupTotals = field(default_factory=GroupTotals)
    baseline: GroupTotals = field(default_factory=GroupTotals)


ClassStatus = Literal["pass", "fail", "wait", "not judged"]


@dataclass(frozen=True)
class ClassVerdict:
    device_class: str
    status: ClassStatus
    reason: str
    gates: tuple[GateResult, ...] = ()


@dataclass(frozen=True)
class StageEvaluation:
    decision: Literal["promote", "hold", "halt"]
    reason: str
    classes: tuple[ClassVerdict, ...]

    def numbers(self) -> dict[str, object]:
        """The evaluation as plain JSON values, for the release's events."""
        return {
            "decision": self.decision,
            "reason": self.reason,
            "classes": [
                {
                    "device_class": c.device_class,
                    "status": c.status,
                    "reason": c.reason,
                    "gates": [
                        {
                            "gate": g.gate,
                            "verdict": g.verdict,
                            "reason": g.reason,
                            "numbers": {k: _finite(v) for k, v in g.numbers.items()},
                        }
                        for g in c.gates
                    ],
                }
                for c in self.classes
            ],
        }


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _seconds(samples_ms: Sequence[float]) -> list[float]:
    return [v / 1000.0 for v in samples_ms]


def _judge(spec: GateSpec, ev: ClassEvidence, has_baseline: bool) -> GateResult:
    config = spec.config()
    c, b = ev.canary, ev.baseline
    if spec.metric == "rollbacks":
        # Both counts cover the whole release: canaries running the new version now, and those that failed it.
        attempted = ev.switched + ev.rolled_back
        return judge_max_rate(ev.rolled_back, attempted, config)
    if spec.metric == "crashes":
        return judge_count_zero(
            c.crashes, c.windows, config, baseline_count=b.crashes if has_baseline else 0, baseline_exposure=b.windows
        )
    if not has_baseline:
        return GateResult("pass", "not compared: no baseline device of this class runs the old version", {}, spec.name)
    if spec.metric == "errors":
        return judge_error_rate(c.errors, c.requests, b.errors, b.requests, config)
    return judge_latency(
        _seconds(c.samples_ms.get(spec.metric, ())), _seconds(b.samples_ms.get(spec.metric, ())), config
    )


def _judge_class(policy: RolloutPolicy, ev: ClassEvidence, soaked: bool) -> ClassVerdict:
    if ev.members == 0:
        return ClassVerdict(ev.device_class, "not judged", "no canary in this class")
    # A baseline exists when the class has devices outside the cohort, or old-version requests were already
    # measured (at 100%, from earlier stages); a canary's own idle windows from before it switched are not one.
    has_baseline = ev.devices > ev.members or ev.baseline.requests > 0
    results = tuple(_judge(spec, ev, has_baseline) for spec in policy.gates)
    critical = {spec.name for spec in policy.gates if spec.critical}
    failed = [r for r in results if r.verdict == "fail" and r.gate in critical]
    if failed:
        return ClassVerdict(ev.device_class, "fail", "; ".join(f"{r.gate}: {r.reason}" for r in failed), results)
    # A canary that rolled the version back never reports on it: it is not waited for, and when every canary of
    # the class has rolled it back (too few for the rollbacks gate's test to be significant), the class fails.
    able = ev.members - min(ev.rolled_back, ev.members)
    if able == 0:
        reason = f"every one of the {ev.members} canaries rolled the new version back; none can report on it"
        return ClassVerdict(ev.device_class, "fail", reason, results)
    if ev.online_members == 0 and ev.reporting == 0:
        reason = f"not judged: all {ev.members} canaries are offline and none reported"
        return ClassVerdict(ev.device_class, "not judged", reason, results)
    needed = max(1, min(policy.min_reporting_devices, max(ev.online_members, ev.reporting), able))
    if ev.reporting < needed:
        reason = (
            f"waiting: {ev.reporting} of {needed} canaries reported on the new version "
            f"({ev.switched} switched, {ev.online_members} of {ev.members} online)"
        )
        return ClassVerdict(ev.device_class, "wait", reason, results)
    waiting = [r for r in results if r.verdict == "wait"]
    if waiting:
        return ClassVerdict(ev.device_class, "wait", "; ".join(f"{r.gate}: {r.reason}" for r in waiting), results)
    if not soaked:
        # Non-critical gates are looked at once, when the stage has soaked: judging them at every tick on growing
        # data would raise their false-alarm rate far above alpha.
        return ClassVerdict(
            ev.device_class, "wait", "enough data; non-critical gates are judged after the soak", results
        )
    failed = [r for r in results if r.verdict == "fail"]
    if failed:
        return ClassVerdict(ev.device_class, "fail", "; ".join(f"{r.gate}: {r.reason}" for r in failed), results)
    suffix = "" if has_baseline else " (no baseline in this class: crash and rollback gates only)"
    return ClassVerdict(
        ev.device_class, "pass", f"{ev.reporting} canaries reported; every gate passed{suffix}", results
    )


def evaluate_stage(
    policy: RolloutPolicy, stage_index: int, soaked_s: float, classes: Sequence[ClassEvidence]
) -> StageEvaluation:
    """The decision for the current stage; see the module docstring."""
    soaked = soaked_s >= policy.soak_s
    verdicts = tuple(_judge_class(policy, ev, soaked) for ev in sorted(classes, key=lambda e: e.device_class))
    stage = f"stage {stage_index + 1} ({policy.stages[stage_index]:.0%})"
    failed = [v for v in verdicts if v.status == "fail"]
    if failed:
        reason = f"{stage} failed in " + "; ".join(f"class {v.device_class}: {v.reason}" for v in failed)
        return StageEvaluation("halt", reason, verdicts)
    if soaked_s < policy.soak_s:
        return StageEvaluation("hold", f"{stage} soaking: {soaked_s:.0f} of {policy.soak_s:.0f} s", verdicts)
    waiting = [v for v in verdicts if v.status == "wait"]
    if waiting:
        reason = f"{stage} waiting in " + "; ".join(f"class {v.device_class}: {v.reason}" for v in waiting)
        return StageEvaluation("hold", reason, verdicts)
    judged = [v for v in verdicts if v.status == "pass"]
    if not judged:
        return StageEvaluation("hold", f"{stage}: no class could be judged yet (no canary reported)", verdicts)
    skipped = [v.device_class for v in verdicts if v.status == "not judged"]
    note = f"; not judged (offline): {', '.join(skipped)}" if skipped else ""
    return StageEvaluation("promote", f"{stage} passed in {len(judged)} classes{note}", verdicts)
