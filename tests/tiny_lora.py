"""A tiny, real GGUF LoRA adapter for the tiny models of :mod:`tests.tiny_gguf`, loadable by llama.cpp.

llama.cpp's adapter loader (``llama-adapter.cpp``) wants ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, the base model's ``general.architecture``, and for each adapted weight ``W`` (numpy shape
``(out, in)``) a pair ``<W>.lora_a`` of numpy shape ``(rank, in)`` and ``<W>.lora_b`` of shape ``(out, rank)``
(ggml ``{in, rank}`` and ``{rank, out}``): ``W' = W + scale * alpha / rank * B @ A``. The exporter in
``slmops.optimize.gguf_lora`` makes real ones; this writer exists so the delivery tests need no training.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmops.core.manifest import SignedManifest
    from slmops.registry import Registry

__all__ = ["register_tiny_adapter", "write_tiny_lora"]


def write_tiny_lora(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    targets: tuple[str, ...] = ("attn_q", "attn_v"),
    magnitude: float = 0.1,
) -> Path:
    """Write a random LoRA adapter over ``targets`` of every layer of a tiny model made with the same shape
    arguments; return ``path``. The same arguments give the same bytes."""
    import gguf
    import numpy as np

    head_dim = n_embd // n_head
    out_dims = {"attn_q": n_head * head_dim, "attn_k": n_head_kv * head_dim, "attn_v": n_head_kv * head_dim}
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    writer.add_name(f"tiny-{arch}-lora")
    for layer in range(n_layers):
        for target in targets:
            out = out_dims[target]
            a = (rng.standard_normal((rank, n_embd)) * magnitude).astype(np.float32)  # (rank, in)
            b = (rng.standard_normal((out, rank)) * magnitude).astype(np.float32)  # (out, rank)
            writer.add_tensor(f"blk.{layer}.{target}.weight.lora_a", a)
            writer.add_tensor(f"blk.{layer}.{target}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def register_tiny_adapter(
    registry: Registry, base: SignedManifest, path: Path, *, variant: str = "lora-shop", rank: int = 4
) -> SignedManifest:
    """Register the adapter file at ``path`` as an adapter version of ``base`` (see :mod:`slmops.core.adapters`)."""
    from slmops.core.adapters import ADAPTER_DETAIL
    from slmops.core.manifest import Lineage, ModelFacts, Recipe, RecipeStep, Source

    details = {ADAPTER_DETAIL: {"type": "lora", "base": base.digest, "rank": rank, "alpha": 8.0}}
    facts = ModelFacts(
        architecture=base.manifest.facts.architecture,
        context_length=base.manifest.facts.context_length,
        details=details,
    )
    result = registry.register(
        base.manifest.name,
        "gguf",
        {"adapter.gguf": path},
        facts=facts,
        runtime=base.manifest.runtime,
        weight_bytes=path.stat().st_size,
        source=Source(kind="derived", origin=base.digest),
        lineage=Lineage(
            parents=[base.digest], recipe=Recipe(name="test", steps=[RecipeStep(pass_name="lora", params={})])
        ),
        variant=variant,
    )
    return result.envelope
