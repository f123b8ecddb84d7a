from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from slmops.core.manifest import ModelFacts
from slmops.core.requirements import estimate_requirements, kv_cache_bytes

GEMMA_LIKE = ModelFacts(
    vocab_size=262144,
    context_length=32768,
    details={
        "block_count": 18,
        "head_count": 4,
        "head_count_kv": 1,
        "key_length": 256,
        "value_length": 256,
        "embedding_length": 640,
        "feed_forward_length": 2048,
    },
)


def test_kv_cache_is_layers_times_kv_heads_times_k_plus_v_in_f16() -> None:
    assert kv_cache_bytes(GEMMA_LIKE, 1) == 18 * 1 * (256 + 256) * 2
    assert kv_cache_bytes(ModelFacts(details={"block_count": 2}), 10) is None


def test_contexts_stop_at_the_model_limit() -> None:
    req = estimate_requirements(GEMMA_LIKE, weight_bytes=253_000_000)
    assert [r.context_tokens for r in req.memory_run] == [512, 2048, 8192, 32768]
    small = estimate_requirements(GEMMA_LIKE.model_copy(update={"context_length": 1024}), weight_bytes=1)
    assert [r.context_tokens for r in small.memory_run] == [512, 1024]
    assert req.memory_load_bytes > 253_000_000


@given(st.integers(1, 10**10), st.integers(1, 10**6), st.integers(1, 10**6))
def test_more_context_or_weights_never_needs_less_memory(weights: int, a: int, b: int) -> None:
    small, large = sorted((a, b))
    req = estimate_requirements(GEMMA_LIKE.model_copy(update={"context_length": None}), weights, (small, large))
    assert [r.bytes for r in req.memory_run] == sorted(r.bytes for r in req.memory_run)
    assert estimate_requirements(GEMMA_LIKE, weights + 1).memory_load_bytes > req.memory_load_bytes
