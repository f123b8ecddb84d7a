"""The gates an improved model must pass before it is registered and released (pure; no I/O).

A candidate (base + adapter) is compared with its parent (the base alone) on numbers measured in the same run, on the
same machine, with the same settings:

- the held-out feedback task: the chosen score must improve by at least ``min_gain`` (for ``nll``, the mean negative
  log-likelihood of the expected answers per token must fall by at least that many nats);
- general perplexity on a fixed text must not rise by more than ``max_perplexity_increase_pct``;
- the shipped multiple-choice task accuracy must not drop by more than ``max_accuracy_drop``;
- the adapter's bytes, as a share of the base's bytes, stay under ``max_adapter_fraction``.

A metric that could not be measured (no format regex, no task file) is skipped and says so; it never passes silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from slmops.improve.spec import ImproveGates

__all__ = ["GateOutcome", "judge"]


@dataclass(frozen=True)
class GateOutcome:
    name: str
    status: str  # pass | fail | skipped
    parent: float | None
    candidate: float | None
    limit: str
    reason: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def _task_gate(gates: ImproveGates, parent: Mapping[str, float], candidate: Mapping[str, float]) -> GateOutcome:
    key = f"task_{gates.task_metric}"
    name = f"held-out task ({gates.task_metric})"
    before, after = parent.get(key), candidate.get(key)
    if before is None or after is None:
        return GateOutcome(name, "fail", before, after, "", f"{key} was not measured; a task gate cannot be skipped")
    gain = (before - after) if gates.task_metric == "nll" else (after - before)
    unit = " nats/token" if gates.task_metric == "nll" else ""
    limit = f"gain ≥ {gates.min_gain:g}{unit}"
    ok = gain >= gates.min_gain and gain > 0
    verdict = "improves" if ok else "does not improve enough"
    return GateOutcome(
        name, "pass" if ok else "fail", before, after, limit, f"{verdict}: gain {gain:+.4f}{unit} ({limit})"
    )


def _ppl_gate(gates: ImproveGates, parent: Mapping[str, float], candidate: Mapping[str, float]) -> GateOutcome:
    before, after = parent.get("perplexity"), candidate.get("perplexity")
    limit = f"≤ +{gates.max_perplexity_increase_pct:g}%"
    if before is None or after is None or before <= 0:
        return GateOutcome("general perplexity", "fail", before, after, limit, "perplexity was not measured")
    change = (after - before) / before * 100
    ok = change <= gates.max_perplexity_increase_pct
    return GateOutcome(
        "general perplexity", "pass" if ok else "fail", before, after, limit, f"{change:+.2f}% ({limit})"
    )


def _accuracy_gate(gates: ImproveGates, parent: Mapping[str, float], candidate: Mapping[str, float]) -> GateOutcome:
    before, after = parent.get("accuracy"), candidate.get("accuracy")
    limit = f"drop ≤ {gates.max_accuracy_drop:g}"
    if before is None or after is None:
        return GateOutcome("task accuracy", "skipped", before, after, limit, "no multiple-choice tasks were given")
    drop = before - after
    ok = drop <= gates.max_accuracy_drop + 1e-12
    return GateOutcome("task accuracy", "pass" if ok else "fail", before, after, limit, f"drop {drop:+.3f} ({limit})")


def _size_gate(gates: ImproveGates, base_bytes: int, adapter_bytes: int) -> GateOutcome:
    fraction = adapter_bytes / base_bytes if base_bytes else float("inf")
    if gates.max_adapter_fraction is None:
        return GateOutcome("adapter size", "skipped", None, fraction, "", "no limit set")
    limit = f"≤ {gates.max_adapter_fraction:.1%} of the base"
    ok = fraction <= gates.max_adapter_fraction
    return GateOutcome(
        "adapter size", "pass" if ok else "fail", None, fraction, limit, f"{fraction:.2%} of the base ({limit})"
    )


def judge(
    gates: ImproveGates,
    parent: Mapping[str, float],
    candidate: Mapping[str, float],
    *,
    base_bytes: int,
    adapter_bytes: int,
) -> list[GateOutcome]:
    """Every gate's outcome; the candidate may be released only when none failed."""
    return [
        _task_gate(gates, parent, candidate),
        _ppl_gate(gates, parent, candidate),
        _accuracy_gate(gates, parent, candidate),
        _size_gate(gates, base_bytes, adapter_bytes),
    ]
