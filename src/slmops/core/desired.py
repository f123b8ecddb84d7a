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

Adapters (:mod:`slmops.core.adapters`): an adapter version runs over its base, so its desired model carries the
base's signed manifest too (``DesiredModel.base``) and its memory need is the pair's. Automatic variant choice
considers an adapter version only when the blueprint's (or release's) reference resolves to it; otherwise adapters
come in by a pin or by the device's site (:mod:`slmops.core.sites`): the site's allowed adapter, trained for the
version chosen for the device, becomes the desired model when the pair fits the device's memory budget.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from slmops.core.adaptation import LocalAdaptation, SiteAdaptation
from slmops.core.adapters import adapter_base
from slmops.core.blueprint import Blueprint, precedence
from slmops.core.candidates import candidate_from_manifest, estimated_memory_bytes, pair_candidate, version_label
from slmops.core.manifest import Manifest, SignedManifest, canonical_json
from slmops.core.selection import VariantCandidate, choose_variant
from slmops.core.sites import SITE_LABEL, AdapterOption, chosen_adapter, resolve
from slmops.core.wire import Capabilities, DesiredModel, DesiredState

__all__ = [
    "AppliedBlueprint",
    "DeviceFacts",
    "ModelCandidates",
    "adapter_options",
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
    # the base of every adapter version among ``versions`` and ``adapters``, by digest
    bases: Mapping[str, SignedManifest] = field(default_factory=dict)
    # adapter versions a site may choose from: those among ``versions`` and the other adapters of the same model
    adapters: tuple[SignedManifest, ...] = ()

    def base_of(self, envelope: SignedManifest) -> SignedManifest | None:
        digest = adapter_base(envelope.manifest)
        if digest is None:
            return None
        return self.bases.get(digest) or next((e for e in self.versions if e.digest == digest), None)


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


def _desired_model(envelope: SignedManifest, base: SignedManifest | None = None) -> DesiredModel:
    m = envelope.manifest
    return DesiredModel(
        name=m.name, version=m.version, digest=envelope.digest, variant=m.variant, envelope=envelope, base=base
    )


def _model_or_problem(envelope: SignedManifest, found: ModelCandidates) -> tuple[DesiredModel | None, str]:
    """The desired model of ``envelope`` (with its base when it is an adapter), or why it cannot be one."""
    if adapter_base(envelope.manifest) is None:
        return _desired_model(envelope), ""
    base = found.base_of(envelope)
    if base is None:
        return None, (
            f"adapter {version_label(envelope.manifest)} was trained for {adapter_base(envelope.manifest)}, "
            "which is not in the registry"
        )
    return _desired_model(envelope, base), ""


def _candidate(envelope: SignedManifest, found: ModelCandidates, context_tokens: int) -> VariantCandidate | None:
    if adapter_base(envelope.manifest) is None:
        return candidate_from_manifest(envelope, None, context_tokens)
    base = found.base_of(envelope)
    return pair_candidate(envelope, base, None, context_tokens) if base is not None else None


def adapter_options(found: ModelCandidates) -> list[AdapterOption]:
    """The adapter versions of ``found`` as site choices (those whose base is known)."""
    options: dict[str, AdapterOption] = {}
    for envelope in (*found.versions, *found.adapters):
        base = found.base_of(envelope)
        name = envelope.manifest.variant
        if base is None or name is None or envelope.digest in options:
            continue
        options[envelope.digest] = AdapterOption(
            name=name,
            digest=envelope.digest,
            label=version_label(envelope.manifest),
            base_digest=base.digest,
            base_label=version_label(base.manifest),
            number=int(envelope.manifest.version[1:]) if envelope.manifest.version[1:].isdigit() else 0,
        )
    return sorted(options.values(), key=lambda o: o.digest)


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
        model, problem = _model_or_problem(envelope, found)
        return _Decision(model, problem or f"pinned variant {version_label(envelope.manifest)}")
    # Adapters take part in the automatic choice only when the reference itself names one.
    choosable = [e for e in found.versions if adapter_base(e.manifest) is None or e.digest == found.base_digest]
    candidates = [c for c in (_candidate(e, found, spec.runtime.context_tokens) for e in choosable) if c is not None]
    memory = device.capabilities.memory_bytes if device.capabilities is not None else 0
    runtimes = device.capabilities.runtimes if device.capabilities is not None else None
    choice = choose_variant(candidates, memory, spec.variant.effective_policy(), runtimes=runtimes)
    if choice.chosen is None:
        if not candidates and choosable:
            return _Decision(None, _model_or_problem(choosable[0], found)[1])
        pairs = {c.digest for c in candidates if c.base_label is not None}
        why = [f"{r.label} {r.reason}" for r in choice.rejected if r.digest in pairs]
        return _Decision(None, "; ".join([choice.explanation, *why]))
    by_digest = {e.digest: e for e in found.versions}
    model, problem = _model_or_problem(by_digest[choice.chosen.digest], found)
    return _Decision(model, problem or choice.explanation)


def _local(
    device: DeviceFacts,
    applied: AppliedBlueprint,
    found: ModelCandidates,
    model: DesiredModel | None,
    sites: Mapping[str, SiteAdaptation],
) -> tuple[LocalAdaptation, DesiredModel | None]:
    """The device's site adaptation within its blueprint's limits, and the desired model with the site's adapter."""
    spec = applied.blueprint.spec
    site = device.labels.get(SITE_LABEL)
    asked = sites.get(site) if site is not None else None
    # The version the site's adapter must be trained for: the chosen one, or the base of a chosen adapter.
    under = (model.base or model.envelope) if model is not None else None
    options = adapter_options(found)
    local = resolve(
        spec.local,
        site,
        asked,
        options,
        base_digest=under.digest if under is not None else None,
        base_label=version_label(under.manifest) if under is not None else "",
    )
    option = chosen_adapter(local.adapter, options, under.digest if under is not None else None)
    if option is None or under is None:
        return local, model
    adapter = next(e for e in (*found.versions, *found.adapters) if e.digest == option.digest)
    pair = pair_candidate(adapter, under, None, spec.runtime.context_tokens)
    memory = device.capabilities.memory_bytes if device.capabilities is not None else 0
    policy = spec.variant.effective_policy()
    runtimes = device.capabilities.runtimes if device.capabilities is not None else None
    check = choose_variant([pair], memory, policy, runtimes=runtimes)
    if check.chosen is None:
        reason = check.rejected[0].reason if check.rejected else check.explanation
        dropped = [*local.dropped, f"adapter {option.name}: {reason}"]
        return local.model_copy(update={"adapter": None, "dropped": dropped}), model
    return local, _desired_model(adapter, under)


def generation_of(state: DesiredState) -> str:
    """A stable hash of everything in ``state`` except its generation."""
    value = state.model_dump(mode="json", by_alias=True)
    value["generation"] = ""
    return hashlib.sha256(canonical_json(value)).hexdigest()[:32]


def desired_state(
    device: DeviceFacts,
    blueprints: Sequence[AppliedBlueprint],
    candidates: Mapping[str, ModelCandidates],
    sites: Mapping[str, SiteAdaptation] | None = None,
) -> DesiredState:
    """What ``device`` should run. ``candidates`` maps each blueprint's ``spec.model.reference`` to its versions;
    ``sites`` maps a site name (the device label ``site``) to what that site set."""
    ranked = ranked_matches(device, blueprints)
    if not ranked:
        state = DesiredState(device_id=device.device_id, generation="", reason="no blueprint matches this device")
        return state.model_copy(update={"generation": generation_of(state)})
    winner = ranked[0]
    spec = winner.blueprint.spec
    found = candidates.get(spec.model.reference, ModelCandidates(problem=f"{spec.model.reference} was not looked up"))
    decision = _decide(device, winner, found)
    local, model = _local(device, winner, found, decision.model, sites or {})
    reason = f"blueprint {winner.label} (priority {spec.priority})"
    if len(ranked) > 1:
        reason += " wins over " + ", ".join(f"{b.label} (priority {b.blueprint.spec.priority})" for b in ranked[1:])
    reason += f": {decision.reason}"
    if model is not decision.model and model is not None:
        reason += f"; site {local.site} adds adapter {local.adapter} ({version_label(model.envelope.manifest)})"
    state = DesiredState(
        device_id=device.device_id,
        generation="",
        model=model,
        runtime=spec.runtime,
        adaptations=spec.adaptations,
        feedback=spec.feedback,
        privacy=spec.privacy,
        local=local,
        blueprint=winner.label,
        reason=reason,
    )
    return state.model_copy(update={"generation": generation_of(state)})
