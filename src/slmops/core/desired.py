"""Desired state per device: a pure function of the applied blueprints, the device and the registry's variants.

The control plane fetches the inputs (blueprints with their revisions, the device record, and for each blueprint's
model reference the resolved version plus every version derived from it) and calls :func:`desired_state`. The
result carries a ``generation``, a hash of everything else in it, which is also the HTTP ETag: it changes exactly
when the state a device should reach changes, so a quiet fleet polls with ``If-None-Match`` and gets ``304``.

How one blueprint wins: every blueprint whose selector matches the device is ranked by (priority descending, name
ascending); the first one decides. Its variant is either pinned (a variant name, version label or digest among the
candidates) or chosen by :func:`slmops.core.selection.choose_variant` for the device's memory, where each version's
memory need is its measured ``peak_rss_bytes`` metric when present, else its estimated need at the blueprint's
context (the smallest estimated context at least as large; the largest estimate when the context exceeds all of
them), else its load memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from slmops.core.blueprint import Blueprint, precedence
from slmops.core.candidates import candidate_from_manifest, estimated_memory_bytes, version_label
from slmops.core.manifest import Manifest, SignedManifest, canonical_json
from slmops.core.selection import choose_variant
from slmops.core.wire import Capabilities, DesiredModel, DesiredState

__all__ = [
    "AppliedBlueprint",
    "DeviceFacts",
    "ModelCandidates",
    "desired_state",
    "generation_of",
    "memory_needed",
    "ranked_matches",
]


@dataclass(frozen=True)
class AppliedBlueprint:
    blueprint: Blueprint
    revision: int

    @property
    def label(self) -> str:
        return f"{self.blueprint.name}@{self.revision}"


@dataclass(frozen=True)
class DeviceFacts:
    device_id: str
    labels: Mapping[str, str]
    capabilities: Capabilities | None
    device_class: str


@dataclass(frozen=True)
class ModelCandidates:
    """The registry's answer for one model reference: the versions a blueprint may choose from."""

    versions: tuple[SignedManifest, ...] = ()
    problem: str = ""  # why there are none, e.g. the reference does not resolve
    base_digest: str | None = None


@dataclass(frozen=True)
class _Decision:
    model: DesiredModel | None
    reason: str
    rejected: list[str] = field(default_factory=list)


def memory_needed(manifest: Manifest, context_tokens: int) -> int:
    """Bytes a version needs: measured peak RSS, else the estimate at the context, else the load estimate."""
    peak = manifest.metrics.get("peak_rss_bytes")
    return int(peak) if peak is not None and peak > 0 else estimated_memory_bytes(manifest, context_tokens)


def ranked_matches(device: DeviceFacts, blueprints: Sequence[AppliedBlueprint]) -> list[AppliedBlueprint]:
    """The blueprints whose selector matches the device, the winner first."""
    labels = dict(device.labels)
    matched = [
        b for b in blueprints if b.blueprint.spec.selector.matches(labels, device.capabilities, device.device_class)
    ]
    return sorted(matched, key=lambda b: precedence(b.blueprint))


def _desired_model(envelope: SignedManifest) -> DesiredModel:
    m = envelope.manifest
    return DesiredModel(name=m.name, version=m.version, digest=envelope.digest, variant=m.variant, envelope=envelope)


def _pinned(pin: str, model_name: str, versions: Sequence[SignedManifest]) -> SignedManifest | None:
    hits = [e for e in versions if pin in (e.digest, e.manifest.variant, e.manifest.version)]
    if not hits:
        return None
    # Prefer the blueprint's own model name, then the newest version.
    return max(hits, key=lambda e: (e.manifest.name == model_name, int(e.manifest.version[1:]), e.digest))


def _decide(device: DeviceFacts, applied: AppliedBlueprint, found: ModelCandidates) -> _Decision:
    spec = applied.blueprint.spec
    if not found.versions:
        return _Decision(None, found.problem or f"no versions of {spec.model.reference} in the registry")
    if spec.variant.pin is not None:
        envelope = _pinned(spec.variant.pin, spec.model.name, found.versions)
        if envelope is None:
            known = ", ".join(sorted({version_label(e.manifest) for e in found.versions}))
            return _Decision(None, f"pinned variant '{spec.variant.pin}' is not among {known}")
        return _Decision(_desired_model(envelope), f"pinned variant {version_label(envelope.manifest)}")
    candidates = [candidate_from_manifest(e, None, spec.runtime.context_tokens) for e in found.versions]
    memory = device.capabilities.memory_bytes if device.capabilities is not None else 0
    choice = choose_variant(candidates, memory, spec.variant.effective_policy())
    if choice.chosen is None:
        return _Decision(None, choice.explanation)
    by_digest = {e.digest: e for e in found.versions}
    return _Decision(_desired_model(by_digest[choice.chosen.digest]), choice.explanation)


def generation_of(state: DesiredState) -> str:
    """A stable hash of everything in ``state`` except its generation."""
    value = state.model_dump(mode="json", by_alias=True)
    value["generation"] = ""
    return hashlib.sha256(canonical_json(value)).hexdigest()[:32]


def desired_state(
    device: DeviceFacts,
    blueprints: Sequence[AppliedBlueprint],
    candidates: Mapping[str, ModelCandidates],
) -> DesiredState:
    """What ``device`` should run. ``candidates`` maps each blueprint's ``spec.model.reference`` to its versions."""
    ranked = ranked_matches(device, blueprints)
    if not ranked:
        state = DesiredState(device_id=device.device_id, generation="", reason="no blueprint matches this device")
        return state.model_copy(update={"generation": generation_of(state)})
    winner = ranked[0]
    spec = winner.blueprint.spec
    found = candidates.get(spec.model.reference, ModelCandidates(problem=f"{spec.model.reference} was not looked up"))
    decision = _decide(device, winner, found)
    reason = f"blueprint {winner.label} (priority {spec.priority})"
    if len(ranked) > 1:
        reason += " wins over " + ", ".join(f"{b.label} (priority {b.blueprint.spec.priority})" for b in ranked[1:])
    reason += f": {decision.reason}"
    state = DesiredState(
        device_id=device.device_id,
        generation="",
        model=decision.model,
        runtime=spec.runtime,
        adaptations=spec.adaptations,
        blueprint=winner.label,
        reason=reason,
    )
    return state.model_copy(update={"generation": generation_of(state)})
