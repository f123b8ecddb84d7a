"""Adapter versions: a LoRA adapter registered as a variant whose parent is its base version.

An adapter version is an ordinary manifest (format ``gguf``, one file in llama.cpp's GGUF LoRA adapter format,
``general.type = adapter``) whose ``facts.details`` names its base and whose ``lineage.parents[0]`` is that base::

    facts.details = {"adapter": {"type": "lora", "base": "sha256:<base manifest digest>",
                                 "rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]}}

No field is added to :class:`~slmops.core.manifest.Manifest`, so every existing digest stays what it was. A device
runs an adapter version as the pair (base, adapter): the base's files plus the adapter's, in one slot.
"""

from __future__ import annotations

from typing import Any

from slmops.core.manifest import Manifest, is_digest

__all__ = ["ADAPTER_DETAIL", "adapter_base", "adapter_details", "is_adapter"]

ADAPTER_DETAIL = "adapter"


def adapter_details(manifest: Manifest) -> dict[str, Any] | None:
    value = manifest.facts.details.get(ADAPTER_DETAIL)
    return value if isinstance(value, dict) else None


def adapter_base(manifest: Manifest) -> str | None:
    """The base version's manifest digest when ``manifest`` is an adapter version, else None."""
    details = adapter_details(manifest)
    if details is None:
        return None
    base = details.get("base")
    return base if isinstance(base, str) and is_digest(base) else None


def is_adapter(manifest: Manifest) -> bool:
    return adapter_base(manifest) is not None
