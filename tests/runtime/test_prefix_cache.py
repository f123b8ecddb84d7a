"""Prefix reuse: saved llama.cpp states of shared prompt prefixes give the same tokens as evaluating every prompt in
full, for interleaved system prompts, streamed and not, under eviction, drift scoring and a LoRA adapter; the cache
itself finds the longest shared prefix within one adapter's namespace and stays within its byte bound."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmops.runtime.backend import (
    BackendConfig,
    LlamaCppBackend,
    PrefixCache,
    PrefixCacheStats,
    common_prefix_length,
)
from tests.tiny_gguf import write_tiny_gguf
from tests.tiny_lora import write_tiny_lora

GREEDY = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "stop": []}
CONTEXT = 256


def _system(tag: str) -> str:
    # The tiny vocabulary tokenizes text byte by byte: about 120 tokens of system prompt.
    return f"system {tag}: be brief and kind, answer about shop {tag} only, never about prices or people. "


QUESTIONS = ["where?", "what is on sale today", "open on sunday?", "hi", "can i return it?", "item 7"]


def _prompts(tags: str) -> list[str]:
    """Prompts cycling through the system prompts of ``tags`` (interleaved), a few unrelated ones mixed in."""
    prompts = [f"{_system(tags[i % len(tags)])}user: {q}\nassistant:" for i, q in enumerate(QUESTIONS * 2)]
    prompts.insert(3, "a prompt that shares nothing with the others, at all")
    prompts.insert(7, f"{_system(tags[0])[:40]} a prompt that stops sharing early")
    return prompts


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Seed 2: random weights whose answers depend on the middle of the prompt, not only on its start and end.
    return write_tiny_gguf(tmp_path_factory.mktemp("prefix") / "tiny.gguf", seed=2, context_length=CONTEXT)


@pytest.fixture
def opened() -> Iterator[list[LlamaCppBackend]]:
    backends: list[LlamaCppBackend] = []
    yield backends
    for backend in backends:
        backend.close()


def _load(model: Path, opened: list[LlamaCppBackend], **config: object) -> LlamaCppBackend:
    settings: dict[str, object] = {"context_tokens": CONTEXT, "threads": 1, "prompt_nll_sample_rate": 0.0}
    settings.update(config)
    backend = LlamaCppBackend.load(model, "tiny@v1", BackendConfig(**settings))  # type: ignore[arg-type]
    opened.append(backend)
    return backend


def _run(backend: LlamaCppBackend, prompts: list[str], *, streamed: bool) -> list[str]:
    if not streamed:
        return [backend.complete(p, **GREEDY).text for p in prompts]  # type: ignore[arg-type]
    outputs = []
    for p in prompts:
        with backend.stream(p, **GREEDY) as pieces:  # type: ignore[arg-type]
            outputs.append("".join(pieces))
    return outputs


def _fresh(model: Path, opened: list[LlamaCppBackend], prompts: list[str], **config: object) -> list[str]:
    """Each prompt evaluated in full by a backend without the cache (reset: no prefix kept from the one before)."""
    backend = _load(model, opened, prefix_cache_bytes=0, **config)
    outputs = []
    for p in prompts:
        backend._llama.reset()
        outputs.append(backend.complete(p, **GREEDY).text)  # type: ignore[arg-type]
    return outputs


# --- the cache's bookkeeping ---------------------------------------------------------------------------------------


def test_lookup_finds_the_entry_sharing_the_longest_prefix_and_only_in_its_namespace() -> None:
    cache = PrefixCache(10_000, min_tokens=3)
    cache.put("base", [1, 2, 3, 4], bytearray(b"a"))
    cache.put("base", [1, 2, 3, 4, 5, 6], bytearray(b"b"))
    cache.put("lora=x@1.0", [1, 2, 3, 4, 5, 6, 7], bytearray(b"c"))

    found = cache.lookup("base", [1, 2, 3, 4, 5, 9])

    assert found == ((1, 2, 3, 4, 5, 6), bytearray(b"b"), 5)
    assert cache.lookup("base", [1, 2, 9]) is None  # shares 2 < min_tokens
    assert cache.lookup("base", [7, 1, 2, 3]) is None
    assert cache.lookup("lora=y@1.0", [1, 2, 3, 4, 5, 6, 7]) is None
    assert cache.lookup("lora=x@1.0", [1, 2, 3, 4, 5, 6, 7]) == ((1, 2, 3, 4, 5, 6, 7), bytearray(b"c"), 7)


def test_entries_past_the_byte_bound_are_evicted_least_recently_used_first() -> None:
    cache = PrefixCache(3 * (100 + 4 * 4), min_tokens=1)  # room for three entries of 100 state bytes and 4 tokens
    for first in (1, 2, 3):
        assert cache.put("base", [first, 0, 0, 0], bytearray(100))
    assert cache.lookup("base", [1, 0, 0, 0]) is not None  # 1 is now the most recently used

    assert cache.put("base", [4, 0, 0, 0], bytearray(100))

    assert cache.lookup("base", [2, 0, 0, 0]) is None
    assert all(cache.lookup("base", [k, 0, 0, 0]) is not None for k in (1, 3, 4))
    stats = cache.stats()
    assert (stats.entries, stats.evictions, stats.bytes) == (3, 1, 3 * 116)
    assert not cache.put("base", [5], bytearray(1_000))  # larger than the whole bound: refused, nothing evicted
    assert cache.stats().entries == 3


def test_shared_prefix_is_the_longest_prefix_shared_with_a_recent_prompt_of_the_namespace() -> None:
    cache = PrefixCache(1_000)

    assert cache.shared_prefix("base", [1, 2, 3, 4]) == 0
    assert cache.shared_prefix("lora=x@1.0", [1, 2, 3, 9]) == 0
    assert cache.shared_prefix("base", [1, 2, 3, 9]) == 3
    assert cache.shared_prefix("base", [1, 2, 3, 9, 8]) == 4


@given(st.lists(st.integers(0, 3), max_size=12), st.lists(st.integers(0, 3), max_size=12))
def test_common_prefix_length_is_the_longest_shared_prefix(a: list[int], b: list[int]) -> None:
    n = common_prefix_length(a, b)

    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=6), max_size=8), st.integers(30, 200))
def test_the_cache_never_holds_more_bytes_than_its_bound(keys: list[list[int]], capacity: int) -> None:
    cache = PrefixCache(capacity, min_tokens=1)
    for key in keys:
        cache.put("base", key, bytearray(len(key) * 5))
        assert cache.stats().bytes <= capacity


# --- real llama.cpp --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_interleaved_system_prompts_give_the_tokens_of_full_evaluation_and_hit_the_cache(
    model: Path, opened: list[LlamaCppBackend], streamed: bool
) -> None:
    prompts = _prompts("ABC")
    expected = _fresh(model, opened, prompts)
    cached = _load(model, opened)

    outputs = _run(cached, prompts, streamed=streamed)

    assert outputs == expected
    assert len(set(expected)) > 3  # the prompts lead to different answers: a wrong prefix would show
    stats = cached.prefix_cache_stats()
    assert stats is not None
    assert stats.hits >= 6  # from the third prompt of each system prompt on
    assert stats.stores >= 3
    assert stats.reused_tokens >= 6 * 100
    assert stats.bytes <= stats.capacity_bytes
    assert stats.hits + stats.live + stats.misses == len(prompts)


def test_without_the_cache_interleaved_prompts_reuse_nothing_but_the_same_tokens_come(
    model: Path, opened: list[LlamaCppBackend]
) -> None:
    prompts = _prompts("AB")
    off = _load(model, opened, prefix_cache_bytes=0)

    assert _run(off, prompts, streamed=False) == _fresh(model, opened, prompts)
    assert off.prefix_cache_stats() is None


def test_a_bound_of_one_entry_evicts_and_stays_correct(model: Path, opened: list[LlamaCppBackend]) -> None:
    prompts = _prompts("ABC")
    probe = _load(model, opened)
    _run(probe, prompts[:5], streamed=False)
    first = probe.prefix_cache_stats()
    assert first is not None and first.entries == 1  # A seen twice: one state saved
    one_entry = first.bytes + first.bytes // 2

    small = _load(model, opened, prefix_cache_bytes=one_entry)
    outputs = _run(small, prompts, streamed=False)

    stats = small.prefix_cache_stats()
    assert stats is not None
    assert outputs == _fresh(model, opened, prompts)
    assert stats.evictions >= 2
    assert stats.entries == 1
    assert stats.bytes <= one_entry


def test_prompts_differing_only_inside_the_shared_part_never_reuse_each_others_state(
    model: Path, opened: list[LlamaCppBackend]
) -> None:
    base = _system("A")
    variants = [base, base.replace("kind", "kend"), base.replace("brief", "brift"), base[:-3] + "xy "]
    variants.append(base.replace("never", "NEVER"))
    prompts = [f"{v}user: {q}\nassistant:" for q in ("hi", "what is on sale today") for v in variants * 2]
    cached = _load(model, opened)

    outputs = _run(cached, prompts, streamed=True)

    expected = _fresh(model, opened, prompts)
    assert outputs == expected
    assert len(set(expected[:5])) >= 3  # the differences inside the prefix change the answer
    stats = cached.prefix_cache_stats()
    assert stats is not None and stats.hits >= 4


def test_a_repeated_prompt_is_served_from_its_saved_state(model: Path, opened: list[LlamaCppBackend]) -> None:
    prompt = f"{_system('A')}user: hi\nassistant:"
    cached = _load(model, opened)

    outputs = _run(cached, [prompt, "something else entirely", prompt, "another one", prompt], streamed=False)

    assert len(set(outputs[0::2])) == 1
    assert outputs[0] == _fresh(model, opened, [prompt])[0]
    stats = cached.prefix_cache_stats()
    assert stats is not None and stats.hits == 1 and stats.stores == 1


def test_drift_scoring_every_prompt_keeps_the_tokens(model: Path, opened: list[LlamaCppBackend]) -> None:
    prompts = _prompts("AB")
    scored_off = _load(model, opened, prefix_cache_bytes=0, prompt_nll_sample_rate=1.0)
    scored_on = _load(model, opened, prompt_nll_sample_rate=1.0)

    assert _run(scored_on, prompts, streamed=True) == _run(scored_off, prompts, streamed=True)
    stats = scored_on.prefix_cache_stats()
    assert stats is not None and stats.hits >= 4  # scoring resets the context; the saved states survive it


def test_with_a_lora_adapter_the_cache_gives_the_adapters_tokens(tmp_path: Path, opened: list[LlamaCppBackend]) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf", seed=1, context_length=CONTEXT)
    lora = write_tiny_lora(tmp_path / "lora.gguf", seed=3)
    prompts = _prompts("AB")

    base = _run(_load(model, opened), prompts, streamed=False)
    adapted_backend = _load(model, opened, lora_path=lora)
    adapted = _run(adapted_backend, prompts, streamed=False)

    assert adapted == _fresh(model, opened, prompts, lora_path=lora)
    assert base == _fresh(model, opened, prompts)
    assert adapted != base
    stats = adapted_backend.prefix_cache_stats()
    assert isinstance(stats, PrefixCacheStats) and stats.hits >= 4


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        BackendConfig(prefix_cache_bytes=-1)


@pytest.mark.integration
def test_gemma_answers_the_same_with_the_cache_for_interleaved_300_token_system_prompts(
    gemma_gguf: Path, opened: list[LlamaCppBackend]
) -> None:
    from benchmarks.prefix_cache import QUESTIONS as SHOP_QUESTIONS
    from benchmarks.prefix_cache import _template, system_prompt

    from slmops.runtime.chat import render_chat

    shops = ["Green Grocer Berlin", "Harbour Market Hamburg"]
    prompts = [
        render_chat(
            _template(),
            [{"role": "system", "content": system_prompt(shops[i % 2])}, {"role": "user", "content": q}],
            bos_token="<bos>",
        )
        for i, q in enumerate(SHOP_QUESTIONS)
    ]
    settings = {"context_tokens": 1024, "threads": 2, "prompt_nll_sample_rate": 0.0}
    fresh = LlamaCppBackend.load(gemma_gguf, "gemma", BackendConfig(**settings, prefix_cache_bytes=0))  # type: ignore[arg-type]
    cached = LlamaCppBackend.load(gemma_gguf, "gemma", BackendConfig(**settings))  # type: ignore[arg-type]
    opened.extend([fresh, cached])
    greedy = {**GREEDY, "max_tokens": 16, "stop": ["<end_of_turn>"]}
    expected = []
    for p in prompts:
        fresh._llama.reset()
        expected.append(fresh.complete(p, **greedy).text)  # type: ignore[arg-type]

    outputs = []
    for p in prompts:
        with cached.stream(p, **greedy) as pieces:  # type: ignore[arg-type]
            outputs.append("".join(pieces))

    assert outputs == expected
    assert 250 <= cached.count_tokens(system_prompt(shops[0])) <= 350
    stats = cached.prefix_cache_stats()
    assert stats is not None and stats.hits >= 2
