"""The way back: curated feedback → a LoRA adapter → gates → registry → a staged release (``slmops improve``)."""

from __future__ import annotations

from slmops.improve.gates import GateOutcome, judge
from slmops.improve.pipeline import ImproveReport, StepRecord, run_improve
from slmops.improve.spec import ImproveSpec, load_improve_spec, parse_improve

__all__ = [
    "GateOutcome",
    "ImproveReport",
    "ImproveSpec",
    "StepRecord",
    "judge",
    "load_improve_spec",
    "parse_improve",
    "run_improve",
]
