"""Choosing a variant for a device: a pure function of the variants' metrics, the device and a policy.

Two objectives, as operators phrase them:

- ``best_quality``: the lowest perplexity among variants that fit in ``max_memory_fraction`` of the device's RAM
  and decode at least ``min_decode_tokens_per_s``;
- ``smallest_within``: the smallest such variant whose perplexity is within ``max_perplexity_increase_pct`` of
  the best one that fits.

Every variant that was not chosen gets a reason. Ties break on size, then digest, so the choice is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Choice", "Rejection", "VariantCandidate", "VariantPolicy", "choose_variant"]

Objective = Literal["best_quality", "smallest_within"]


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


def choose_variant(candidates: list[VariantCandidate], memory_bytes: int, policy: VariantPolicy) -> Choice:
    """Pick one of ``candidates`` for a device with ``memory_bytes`` of RAM, or none, and say why."""
    budget = memory_bytes * policy.max_memory_fraction
    rejected: list[Rejection] = []
    feasible: list[VariantCandidate] = []
    for c in sorted(candidates, key=lambda c: c.digest):
        if c.memory_bytes > budget:
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
    if policy.objective == "best_quality":
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


def _ppl(c: VariantCandidate) -> str:
    return "unknown" if c.perplexity is None else f"{c.perplexity:.3f}"


def _describe(c: VariantCandidate) -> str:
    parts = [c.label, f"perplexity {_ppl(c)}", f"{c.size_bytes:,} bytes", f"needs {_gib(c.memory_bytes)}"]
    if c.decode_tokens_per_s is not None:
        parts.append(f"{c.decode_tokens_per_s:.1f} tok/s")
    return ", ".join(parts)


def _worse(c: VariantCandidate, chosen: VariantCandidate) -> str:
    if c.perplexity is None and chosen.perplexity is not None:
        return f"not evaluated (no perplexity in its manifest); {chosen.label} was"
    if c.perplexity is not None and chosen.perplexity is not None and c.perplexity != chosen.perplexity:
        return f"lower quality: perplexity {_ppl(c)} vs {_ppl(chosen)}"
    return f"tie on quality, loses on accuracy/size/digest to {chosen.label}"
