"""Choosing a variant for a device: a pure function of the variants' metrics, the device and a policy.

Three objectives, as operators phrase them:

- ``best_quality``: the lowest perplexity among variants that fit in ``max_memory_fraction`` of the device's RAM
  and decode at least ``min_decode_tokens_per_s``;
- ``smallest_within``: the smallest such variant whose perplexity is within ``max_perplexity_increase_pct`` of
  the best one that fits;
- ``fastest_within``: the variant with the highest decode speed measured for the device's class among those whose
  perplexity is within ``max_perplexity_increase_pct`` of the best one that fits (a variant whose speed was not
  measured counts as the slowest). This is how a second runtime wins a class where it is measured faster.

Runtimes. Each candidate says which runtime serves it (``llama.cpp`` for GGUF, ``onnxruntime-genai`` for an ONNX
Runtime GenAI directory; None for a format no runtime serves). A device runs only what it has installed
(``Capabilities.runtimes``, passed as ``runtimes``); a candidate whose runtime it lacks is rejected with a reason
before anything else, so a variant of a second runtime is chosen only by a device that has it, and it is the one
chosen whenever it is the only runtime a device has. A caller that does not pass ``runtimes`` gets
:data:`DEFAULT_RUNTIMES` (llama.cpp), what an agent that does not report its runtimes runs.

Every variant that was not chosen gets a reason. Ties break on size, then digest, so the choice is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_RUNTIMES",
    "Choice",
    "Objective",
    "Rejection",
    "VariantCandidate",
    "VariantPolicy",
    "choose_variant",
]

Objective = Literal["best_quality", "smallest_within", "fastest_within"]
DEFAULT_RUNTIMES: tuple[str, ...] = ("llama.cpp",)


@dataclass(frozen=True)
class VariantCandidate:
    digest: str
    label: str  # "gemma3-270m@v3 (q8_0)", for explanations
    size_bytes: int
    memory_bytes: int  # measured peak RSS when known, else the manifest's estimate at the runtime context
    perplexity: float | None = None  # lower is better; None when not evaluated
    accuracy: float | None = None  # higher is better; breaks perplexity ties
    decode_tokens_per_s: float | None = None  # measured for the device's class when known
    # An adapter version runs over its base: then size_bytes and memory_bytes are the pair's, and these say how
    # much of them is the base's (for explanations).
    base_label: str | None = None
    base_memory_bytes: int = 0
    runtime: str | None = "llama.cpp"  # what serves it; None: no runtime serves its format


@dataclass(frozen=True)
class VariantPolicy:
    objective: Objective = "best_quality"
    max_memory_fraction: float = 0.5
    min_decode_tokens_per_s: float | None = None
    max_perplexity_increase_pct: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.max_memory_fraction <= 1:
            raise ValueError(f"max_memory_fraction must be in (0, 1], got {self.max_memory_fraction}")
        if self.max_perplexity_increase_pct < 0:
            raise ValueError("max_perplexity_increase_pct must be >= 0")


@dataclass(frozen=True)
class Rejection:
    digest: str
    label: str
    reason: str


@dataclass(frozen=True)
class Choice:
    chosen: VariantCandidate | None
    rejected: list[Rejection] = field(default_factory=list)
    explanation: str = ""


def _gib(count: float) -> str:
    return f"{count / (1 << 30):.2f} GiB"


def _quality_key(c: VariantCandidate) -> tuple[float, float, int, str]:
    ppl = c.perplexity if c.perplexity is not None and math.isfinite(c.perplexity) else math.inf
    acc = -(c.accuracy if c.accuracy is not None and math.isfinite(c.accuracy) else -math.inf)
    return (ppl, acc, c.size_bytes, c.digest)


def choose_variant(
    candidates: list[VariantCandidate],
    memory_bytes: int,
    policy: VariantPolicy,
    runtimes: Collection[str] | None = None,
) -> Choice:
    """Pick one of ``candidates`` for a device with ``memory_bytes`` of RAM and the ``runtimes`` it has installed
    (default :data:`DEFAULT_RUNTIMES`), or none, and say why."""
    budget = memory_bytes * policy.max_memory_fraction
    installed = tuple(DEFAULT_RUNTIMES if runtimes is None else runtimes)
    rejected: list[Rejection] = []
    feasible: list[VariantCandidate] = []
    for c in sorted(candidates, key=lambda c: c.digest):
        if c.runtime is None or c.runtime not in installed:
            needs = "no runtime serves its format" if c.runtime is None else f"needs the runtime {c.runtime}"
            has = ", ".join(installed) or "none"
            rejected.append(Rejection(c.digest, c.label, f"cannot run here: {needs}; the device has {has}"))
        elif c.memory_bytes > budget:
            pair = (
                f" (its base {c.base_label} {_gib(c.base_memory_bytes)} + the adapter "
                f"{_gib(c.memory_bytes - c.base_memory_bytes)})"
                if c.base_label is not None
                else ""
            )
            rejected.append(
                Rejection(
                    c.digest,
                    c.label,
                    f"does not fit: needs {_gib(c.memory_bytes)}{pair}, more than {policy.max_memory_fraction:.0%} "
                    f"of {_gib(memory_bytes)} RAM ({_gib(budget)})",
                )
            )
        elif policy.min_decode_tokens_per_s is not None and (
            c.decode_tokens_per_s is None or c.decode_tokens_per_s < policy.min_decode_tokens_per_s
        ):
            speed = "not measured" if c.decode_tokens_per_s is None else f"{c.decode_tokens_per_s:.1f} tok/s"
            rejected.append(
                Rejection(
                    c.digest, c.label, f"too slow: decode {speed}, policy needs {policy.min_decode_tokens_per_s:g}"
                )
            )
        else:
            feasible.append(c)
    if not feasible:
        why = "no variant fits" if candidates else "no variants to choose from"
        return Choice(None, rejected, f"{why} ({_gib(budget)} memory budget)")
    best = min(feasible, key=_quality_key)
    if policy.objective == "fastest_within":
        near = _near(feasible, best, policy)
        chosen = min(near, key=lambda c: (-_speed(c), _quality_key(c)))
        threshold = _threshold(best, policy)
        for c in feasible:
            if c is chosen:
                continue
            if c in near:
                reason = f"slower: decode {_speed_text(c)} vs {_speed_text(chosen)}"
            else:
                reason = (
                    f"quality too far from the best: perplexity {_ppl(c)} > {threshold:.3f} "
                    f"({policy.max_perplexity_increase_pct:g}% above {_ppl(best)})"
                )
            rejected.append(Rejection(c.digest, c.label, reason))
        explanation = (
            f"fastest within {policy.max_perplexity_increase_pct:g}% of the best perplexity ({_ppl(best)}): "
            f"{_describe(chosen)}"
        )
    elif policy.objective == "best_quality":
        chosen = best
        for c in feasible:
            if c is not chosen:
                rejected.append(Rejection(c.digest, c.label, _worse(c, chosen)))
        explanation = f"best quality that fits: {_describe(chosen)}"
    else:
        if best.perplexity is None:
            threshold = math.inf
            near = [c for c in feasible if c.perplexity is None]
        else:
            threshold = best.perplexity * (1 + policy.max_perplexity_increase_pct / 100)
            near = [c for c in feasible if c.perplexity is not None and c.perplexity <= threshold]
        chosen = min(near, key=lambda c: (c.size_bytes, _quality_key(c)))
        for c in feasible:
            if c is chosen:
                continue
            if c in near:
                reason = f"larger: {c.size_bytes:,} bytes vs {chosen.size_bytes:,}"
            else:
                reason = (
                    f"quality too far from the best: perplexity {_ppl(c)} > {threshold:.3f} "
                    f"({policy.max_perplexity_increase_pct:g}% above {_ppl(best)})"
                )
            rejected.append(Rejection(c.digest, c.label, reason))
        explanation = (
            f"smallest within {policy.max_perplexity_increase_pct:g}% of the best perplexity ({_ppl(best)}): "
            f"{_describe(chosen)}"
        )
    return Choice(chosen, rejected, explanation)


def _threshold(best: VariantCandidate, policy: VariantPolicy) -> float:
    if best.perplexity is None:
        return math.inf
    return best.perplexity * (1 + policy.max_perplexity_increase_pct / 100)


def _near(feasible: list[VariantCandidate], best: VariantCandidate, policy: VariantPolicy) -> list[VariantCandidate]:
    """The feasible variants whose perplexity is within the policy's margin of the best (all unevaluated ones when
    the best is unevaluated)."""
    if best.perplexity is None:
        return [c for c in feasible if c.perplexity is None]
    threshold = _threshold(best, policy)
    return [c for c in feasible if c.perplexity is not None and c.perplexity <= threshold]


def _speed(c: VariantCandidate) -> float:
    speed = c.decode_tokens_per_s
    return speed if speed is not None and math.isfinite(speed) else -math.inf


def _speed_text(c: VariantCandidate) -> str:
    return "not measured" if c.decode_tokens_per_s is None else f"{c.decode_tokens_per_s:.1f} tok/s"


def _ppl(c: VariantCandidate) -> str:
    return "unknown" if c.perplexity is None else f"{c.perplexity:.3f}"


def _describe(c: VariantCandidate) -> str:
    parts = [c.label, f"perplexity {_ppl(c)}", f"{c.size_bytes:,} bytes", f"needs {_gib(c.memory_bytes)}"]
    if c.decode_tokens_per_s is not None:
        parts.append(f"{c.decode_tokens_per_s:.1f} tok/s")
    if c.runtime is not None and c.runtime not in DEFAULT_RUNTIMES:
        parts.append(f"on {c.runtime}")
    return ", ".join(parts)


def _worse(c: VariantCandidate, chosen: VariantCandidate) -> str:
    if c.perplexity is None and chosen.perplexity is not None:
        return f"not evaluated (no perplexity in its manifest); {chosen.label} was"
    if c.perplexity is not None and chosen.perplexity is not None and c.perplexity != chosen.perplexity:
        return f"lower quality: perplexity {_ppl(c)} vs {_ppl(chosen)}"
    return f"tie on quality, loses on accuracy/size/digest to {chosen.label}"
