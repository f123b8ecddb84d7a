from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmops.core.selection import VariantCandidate, VariantPolicy, choose_variant

GiB = 1 << 30


@st.composite
def candidates(draw: st.DrawFn) -> list[VariantCandidate]:
    n = draw(st.integers(0, 8))
    out = []
    for i in range(n):
        out.append(
            VariantCandidate(
                digest=f"sha256:{i:064x}",
                label=f"m@v{i + 1}",
                size_bytes=draw(st.integers(1, 8 * GiB)),
                memory_bytes=draw(st.integers(1, 16 * GiB)),
                perplexity=draw(st.none() | st.floats(1.0, 100.0)),
                accuracy=draw(st.none() | st.floats(0.0, 1.0)),
                decode_tokens_per_s=draw(st.none() | st.floats(0.1, 200.0)),
            )
        )
    return out


policies = st.builds(
    VariantPolicy,
    objective=st.sampled_from(["best_quality", "smallest_within"]),
    max_memory_fraction=st.floats(0.05, 1.0),
    min_decode_tokens_per_s=st.none() | st.floats(1.0, 100.0),
    max_perplexity_increase_pct=st.floats(0.0, 50.0),
)


@given(candidates(), st.integers(1, 32 * GiB), policies)
def test_never_picks_a_variant_that_does_not_fit_and_explains_every_other(
    cands: list[VariantCandidate], memory: int, policy: VariantPolicy
) -> None:
    choice = choose_variant(cands, memory, policy)

    if choice.chosen is not None:
        assert choice.chosen.memory_bytes <= memory * policy.max_memory_fraction
        if policy.min_decode_tokens_per_s is not None:
            assert (choice.chosen.decode_tokens_per_s or 0) >= policy.min_decode_tokens_per_s
    decided = [r.digest for r in choice.rejected] + ([choice.chosen.digest] if choice.chosen else [])
    assert sorted(decided) == sorted(c.digest for c in cands)
    assert len(choice.rejected) + (1 if choice.chosen else 0) == len(cands)
    assert all(r.reason for r in choice.rejected)


@given(candidates(), st.integers(1, 32 * GiB), policies)
def test_the_choice_is_deterministic_whatever_the_input_order(
    cands: list[VariantCandidate], memory: int, policy: VariantPolicy
) -> None:
    assert choose_variant(cands, memory, policy) == choose_variant(list(reversed(cands)), memory, policy)


@given(candidates(), st.integers(1, 16 * GiB), st.integers(0, 16 * GiB), policies)
def test_more_memory_never_gives_a_worse_choice(
    cands: list[VariantCandidate], memory: int, extra: int, policy: VariantPolicy
) -> None:
    policy = VariantPolicy("best_quality", policy.max_memory_fraction, policy.min_decode_tokens_per_s)
    small = choose_variant(cands, memory, policy).chosen
    large = choose_variant(cands, memory + extra, policy).chosen

    if small is not None:
        assert large is not None
        ppl = lambda c: c.perplexity if c.perplexity is not None else float("inf")  # noqa: E731
        assert ppl(large) <= ppl(small)


def test_smallest_within_picks_the_smallest_close_enough_variant() -> None:
    f16 = VariantCandidate("sha256:" + "1" * 64, "f16", 540, 600, perplexity=10.0)
    q8 = VariantCandidate("sha256:" + "2" * 64, "q8_0", 290, 350, perplexity=10.1)
    q4 = VariantCandidate("sha256:" + "3" * 64, "q4_k_m", 250, 300, perplexity=11.5)

    choice = choose_variant([f16, q8, q4], 2000, VariantPolicy("smallest_within", 1.0, None, 5.0))
    assert choice.chosen == q8
    reasons = {r.label: r.reason for r in choice.rejected}
    assert reasons["q4_k_m"].startswith("quality too far from the best")
    assert reasons["f16"].startswith("larger")

    tight = choose_variant([f16, q8, q4], 1000, VariantPolicy("best_quality", 0.5))
    assert tight.chosen == q8
    assert {r.label: r.reason for r in tight.rejected}["f16"].startswith("does not fit")


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="max_memory_fraction"):
        VariantPolicy(max_memory_fraction=0)
