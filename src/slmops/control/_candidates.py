"""The registry versions a blueprint's model reference can become: the version it resolves to and every version
derived from it (its variants, their variants, ...), plus what adapters need: the base of every adapter version
among them, and the other adapter versions of the same model (a site's adapter may have been trained for another
base; the reason it was dropped names that base)."""

from __future__ import annotations

from collections.abc import Sequence

from slmops.core.adapters import adapter_base
from slmops.core.desired import AppliedBlueprint, ModelCandidates
from slmops.core.manifest import SignedManifest
from slmops.errors import NotFoundError
from slmops.registry import Registry

__all__ = ["CandidateCache", "version_family"]


def version_family(registry: Registry, base: SignedManifest) -> list[SignedManifest]:
    """``base`` first, then every version derived from it, each once."""
    collected: dict[str, SignedManifest] = {base.digest: base}
    frontier = [base.digest]
    while frontier:
        for child in registry.children(frontier.pop()):
            if child.digest not in collected:
                collected[child.digest] = child
                frontier.append(child.digest)
    return list(collected.values())


class CandidateCache:
    """Registry look-ups for blueprint model references, memoised for as long as the cache is kept."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._found: dict[str, ModelCandidates] = {}

    def get(self, reference: str) -> ModelCandidates:
        if reference not in self._found:
            self._found[reference] = self._lookup(reference)
        return self._found[reference]

    def _lookup(self, reference: str) -> ModelCandidates:
        try:
            base = self.registry.resolve(reference)
        except NotFoundError as exc:
            return ModelCandidates(problem=f"{reference} does not resolve: {exc}")
        family = version_family(self.registry, base)
        try:
            named = self.registry.versions(base.manifest.name)
        except NotFoundError:
            named = []
        in_family = {e.digest for e in family}
        adapters = [e for e in family if adapter_base(e.manifest) is not None]
        adapters += [e for e in named if adapter_base(e.manifest) is not None and e.digest not in in_family]
        bases: dict[str, SignedManifest] = {}
        for envelope in adapters:
            digest = adapter_base(envelope.manifest)
            if digest is not None and digest not in bases:
                try:
                    bases[digest] = self.registry.resolve(digest)
                except NotFoundError:
                    continue
        return ModelCandidates(versions=tuple(family), base_digest=base.digest, bases=bases, adapters=tuple(adapters))

    def for_blueprints(self, blueprints: Sequence[AppliedBlueprint]) -> dict[str, ModelCandidates]:
        return {b.blueprint.spec.model.reference: self.get(b.blueprint.spec.model.reference) for b in blueprints}
