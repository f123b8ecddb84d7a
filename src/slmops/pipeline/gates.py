"""The gates one candidate variant must pass on one device class (pure; no I/O).

Offline, from the evaluation run on this machine (before any agent starts):

- ``perplexity``: the variant's perplexity on the evaluation text rises at most ``max_perplexity_increase_pct``
  above the baseline's (the current stable version), measured with the same token ids;
- ``task accuracy``: the multiple-choice accuracy drops at most ``max_accuracy_drop`` below the baseline's;
- ``memory estimate``: the estimated run memory at the evaluation context fits in ``ram_share`` of the class's RAM.

From the variant's test-matrix run on the class (a real agent under the class's limits):

- ``test matrix``: enrolled, downloaded, verified, probed and served every prompt;
- ``memory``: its peak memory stays within ``ram_share`` of the class's RAM;
- ``decode tokens/s``: at least ``min_decode_tokens_per_s``.

A gate without a limit, or a metric that was not measured because its inputs are absent (no tasks), is ``skipped``
and says why. A variant failing a quality gate (perplexity, accuracy) is not run in the matrix, and its matrix gates
say so; one failing only the memory estimate still runs, so the report shows what the OS cap did with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from slmops.pipeline.matrix import MatrixRun
from slmops.pipeline.spec import ClassGates, DeviceClassSpec

__all__ = ["QUALITY_GATES", "ClassGate", "matrix_gates", "offline_gates"]

QUALITY_GATES = ("perplexity", "task accuracy")

MIB = 1 << 20


@dataclass(frozen=True)
class ClassGate:
    device_class: str
    variant: str
    name: str
    status: str  # pass | fail | skipped
    value: float | None
    limit: str
    reason: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_json(self) -> dict[str, object]:
        return {
            "class": self.device_class,
            "variant": self.variant,
            "name": self.name,
            "status": self.status,
            "value": self.value,
            "limit": self.limit,
            "reason": self.reason,
        }


def offline_gates(
    gates: ClassGates,
    device_class: DeviceClassSpec,
    variant: str,
    baseline: Mapping[str, float],
    candidate: Mapping[str, float],
) -> list[ClassGate]:
    """The gates decided by the evaluation alone, for ``variant`` on ``device_class``."""
    cls = device_class.name

    def gate(name: str, ok: bool | None, value: float | None, limit: str, reason: str) -> ClassGate:
        status = "skipped" if ok is None else ("pass" if ok else "fail")
        return ClassGate(cls, variant, name, status, value, limit, reason)

    out: list[ClassGate] = []
    before, after = baseline.get("perplexity"), candidate.get("perplexity")
    if gates.max_perplexity_increase_pct is None:
        out.append(gate("perplexity", None, after, "", "no limit set"))
    elif before is None or after is None or before <= 0:
        out.append(gate("perplexity", False, after, "", "perplexity was not measured for the baseline or variant"))
    else:
        change = (after - before) / before * 100
        limit = f"≤ +{gates.max_perplexity_increase_pct:g}% over the baseline ({before:.4g})"
        ok = change <= gates.max_perplexity_increase_pct
        out.append(gate("perplexity", ok, after, limit, f"{after:.4g}, {change:+.2f}% vs the baseline ({limit})"))
    before, after = baseline.get("accuracy"), candidate.get("accuracy")
    if gates.max_accuracy_drop is None:
        out.append(gate("task accuracy", None, after, "", "no limit set"))
    elif before is None or after is None:
        out.append(gate("task accuracy", None, after, "", "no multiple-choice tasks were evaluated"))
    else:
        drop = before - after
        limit = f"drop ≤ {gates.max_accuracy_drop:g} below the baseline ({before:.3f})"
        ok = drop <= gates.max_accuracy_drop + 1e-12
        out.append(gate("task accuracy", ok, after, limit, f"{after:.3f}, drop {drop:+.3f} ({limit})"))
    estimate = candidate.get("estimated_memory_bytes")
    if gates.ram_share is None:
        out.append(gate("memory estimate", None, estimate, "", "no RAM share set"))
    elif estimate is None:
        out.append(gate("memory estimate", None, None, "", "the evaluation estimated no memory"))
    else:
        budget = gates.ram_share * device_class.memory_bytes
        limit = f"≤ {gates.ram_share:.0%} of {device_class.memory_bytes / MIB:.0f} MiB"
        ok = estimate <= budget
        verdict = "fits" if ok else "does not fit"
        out.append(gate("memory estimate", ok, estimate, limit, f"{verdict}: {estimate / MIB:.1f} MiB ({limit})"))
    return out


def matrix_gates(
    gates: ClassGates, device_class: DeviceClassSpec, variant: str, run: MatrixRun | None, why_not_run: str = ""
) -> list[ClassGate]:
    """The gates decided by the variant's matrix run on the class (``None``: it was not run, ``why_not_run``)."""
    cls = device_class.name
    names = ("test matrix", "memory", "decode tokens/s")
    if run is None:
        return [ClassGate(cls, variant, n, "skipped", None, "", why_not_run or "not run") for n in names]
    if not run.ok:
        first = ClassGate(cls, variant, names[0], "fail", None, "serves every prompt", run.reason)
        rest = [ClassGate(cls, variant, n, "fail", None, "", "not measured: the matrix run failed") for n in names[1:]]
        return [first, *rest]
    out = [ClassGate(cls, variant, names[0], "pass", float(run.prompts), "serves every prompt", run.reason)]
    peak = run.peak_memory_bytes
    if gates.ram_share is None or peak is None:
        why = "no RAM share set" if gates.ram_share is None else "memory was not measured"
        out.append(ClassGate(cls, variant, "memory", "skipped", peak, "", why))
    else:
        budget = gates.ram_share * device_class.memory_bytes
        limit = f"≤ {gates.ram_share:.0%} of {device_class.memory_bytes / MIB:.0f} MiB"
        ok = peak <= budget
        reason = f"peak {peak / MIB:.1f} MiB ({run.peak_memory_source}; {limit})"
        out.append(ClassGate(cls, variant, "memory", "pass" if ok else "fail", float(peak), limit, reason))
    speed = run.tokens_per_s
    if gates.min_decode_tokens_per_s is None:
        out.append(ClassGate(cls, variant, names[2], "skipped", speed, "", "no minimum set"))
    elif speed is None:
        out.append(ClassGate(cls, variant, names[2], "fail", None, "", "no tokens were generated"))
    else:
        limit = f"≥ {gates.min_decode_tokens_per_s:g} tokens/s"
        ok = speed >= gates.min_decode_tokens_per_s
        reason = f"{speed:.1f} tokens/s through the local API ({limit})"
        out.append(ClassGate(cls, variant, names[2], "pass" if ok else "fail", speed, limit, reason))
    return out
