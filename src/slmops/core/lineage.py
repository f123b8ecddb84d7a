"""The derivation tree of model versions: each version under the parent it was made from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slmops.core.manifest import Manifest, SignedManifest

__all__ = ["HEADLINE_METRICS", "LineageNode", "build_lineage", "step_summary"]

HEADLINE_METRICS = ("perplexity", "accuracy", "decode_tokens_per_s", "peak_rss_bytes")


def step_summary(manifest: Manifest) -> str:
    """The recipe step that made a version, e.g. ``quantize(type=Q8_0)``; empty for an imported version."""
    recipe = manifest.lineage.recipe
    if recipe is None or not recipe.steps:
        return ""
    parts = []
    for step in recipe.steps:
        params = ", ".join(f"{k}={v}" for k, v in sorted(step.params.items()))
        parts.append(f"{step.pass_name}({params})" if params else step.pass_name)
    return " → ".join(parts)


@dataclass
class LineageNode:
    envelope: SignedManifest
    children: list[LineageNode] = field(default_factory=list)

    @property
    def manifest(self) -> Manifest:
        return self.envelope.manifest

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.name,
            "version": m.version,
            "digest": self.envelope.digest,
            "variant": m.variant,
            "format": m.format,
            "quantization": m.facts.quantization,
            "size_bytes": m.total_size,
            "recipe": m.lineage.recipe.model_dump(mode="json", by_alias=True) if m.lineage.recipe else None,
            "step": step_summary(m),
            "metrics": {k: v for k, v in m.metrics.items() if k in HEADLINE_METRICS},
            "children": [c.to_json() for c in self.children],
        }


def build_lineage(envelopes: list[SignedManifest]) -> list[LineageNode]:
    """Roots (versions whose parents are not among ``envelopes``) with their descendants, oldest first.

    A version with several parents (a merge or a distillation) is shown under its first parent present.
    """
    nodes = {e.digest: LineageNode(e) for e in envelopes}
    roots: list[LineageNode] = []
    for envelope in sorted(envelopes, key=lambda e: (e.manifest.created_at, e.manifest.name, _number(e))):
        node = nodes[envelope.digest]
        parent = next((nodes[p] for p in envelope.manifest.lineage.parents if p in nodes), None)
        (parent.children if parent is not None else roots).append(node)
    return roots


def _number(envelope: SignedManifest) -> int:
    return int(envelope.manifest.version[1:])
