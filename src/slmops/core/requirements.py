"""Estimated memory a model version needs, from the facts read out of its files.

An estimate, and labelled as one: weights (mapped or loaded whole) + the runtime itself (interpreter and
inference library) + an f16 KV cache for the context + the activation buffers of one 512-token prompt batch and
one row of logits. The terms were checked against the peak RSS of llama.cpp running gemma3-270m at contexts
512 to 32768 on the development machine. Measured peak RSS per device class replaces it once the optimizer has
evaluated the version.
"""

from __future__ import annotations

from slmops.core.manifest import MemoryAtContext, ModelFacts, Requirements

__all__ = ["DEFAULT_CONTEXTS", "estimate_requirements", "kv_cache_bytes"]

DEFAULT_CONTEXTS = (512, 2048, 8192, 32768)
_BATCH_TOKENS = 512
_RUNTIME_OVERHEAD_BYTES = 96 * 1024 * 1024
_KV_BYTES_PER_VALUE = 2  # f16 cache
_ACTIVATION_BYTES = 4  # fp32


def _int(details: dict[str, object], key: str) -> int | None:
    value = details.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def kv_cache_bytes(facts: ModelFacts, context_tokens: int) -> int | None:
    """f16 K and V for every layer at a context length; None when the facts do not say enough."""
    d = facts.details
    layers = _int(d, "block_count")
    kv_heads = _int(d, "head_count_kv") or _int(d, "head_count")
    key_length = _int(d, "key_length")
    value_length = _int(d, "value_length") or key_length
    if key_length is None:
        embedding, heads = _int(d, "embedding_length"), _int(d, "head_count")
        if embedding is not None and heads is not None:
            key_length = value_length = embedding // heads
    if layers is None or kv_heads is None or key_length is None or value_length is None:
        return None
    per_token = layers * kv_heads * (key_length + value_length) * _KV_BYTES_PER_VALUE
    return per_token * context_tokens


def _batch_buffers(facts: ModelFacts) -> int:
    d = facts.details
    embedding = _int(d, "embedding_length") or 0
    ff = _int(d, "feed_forward_length") or 4 * embedding
    vocab = facts.vocab_size or 0
    return _BATCH_TOKENS * (4 * embedding + ff) * _ACTIVATION_BYTES + 2 * vocab * _ACTIVATION_BYTES


def estimate_requirements(
    facts: ModelFacts, weight_bytes: int, contexts: tuple[int, ...] = DEFAULT_CONTEXTS
) -> Requirements:
    load = weight_bytes + _RUNTIME_OVERHEAD_BYTES
    limit = facts.context_length
    wanted = sorted({c for c in contexts if limit is None or c <= limit} | ({limit} if limit else set()))
    runs: list[MemoryAtContext] = []
    buffers = _batch_buffers(facts)
    for context in wanted:
        kv = kv_cache_bytes(facts, context)
        if kv is None:
            break
        runs.append(MemoryAtContext(context_tokens=context, bytes=load + kv + buffers))
    method = "weights + 96 MiB runtime"
    if runs:
        method += " + f16 KV cache (all layers, full context) + fp32 buffers for a 512-token batch and its logits"
    return Requirements(memory_load_bytes=load, memory_run=runs, estimate_method=method)
