"""Curation: what becomes a training pair, the filters, dedupe, and a split that never shares a prompt."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.core.feedback import FeedbackMessage
from slmops.feedback.curate import (
    CurationParams,
    FeedbackRecord,
    TrainingRecord,
    curate,
    dedupe,
    normalize_text,
    prompt_key,
    read_jsonl,
    split_of,
    to_jsonl,
)

V1, V2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def record(n: int, prompt: str = "What is 2+2?", answer: str = "4", **changes: Any) -> FeedbackRecord:
    body: dict[str, Any] = {
        "id": f"{n:064x}",
        "version_digest": V1,
        "device_class": "cpu-8g",
        "release_id": None,
        "rated_at": f"2025-06-01T12:00:{n % 60:02d}Z",
        "received_at": "2025-06-01T12:01:00Z",
        "rating": "up",
        "messages": [FeedbackMessage(role="user", content=prompt)],
        "answer": answer,
    }
    return FeedbackRecord(**(body | changes))


def test_corrections_and_ups_become_pairs_and_downs_are_counted_not_trained() -> None:
    samples = [
        record(1, "a?", "bad", rating="down", correction="good"),
        record(2, "b?", "fine"),
        record(3, "c?", "wrong", rating="down"),
        record(4, "d?", "meh", rating=None, score=0.2),
        record(5, "e?", "great", rating=None, score=0.9),
    ]

    got = curate(samples, CurationParams(heldout_fraction=0.0))

    assert [(r.messages[0].content, r.completion, r.source.kind) for r in got.train] == [
        ("a?", "good", "correction"),
        ("b?", "fine", "up"),
        ("e?", "great", "up"),
    ]
    assert got.counts["excluded_down"] == 2 and got.counts["samples"] == 5 and got.heldout == []
    assert got.counts["correction"] == 1 and got.counts["up"] == 2


def test_filters_by_version_class_time_kind_score_and_length() -> None:
    samples = [
        record(1, "keep?"),
        record(2, "other version?", version_digest=V2),
        record(3, "other class?", device_class="gpu"),
        record(4, "too early?", received_at="2025-05-01T00:00:00Z"),
        record(5, "x" * 50),
        record(6, "low?", score=0.1),
        record(7, "fixed?", rating="down", correction="yes"),
    ]
    params = CurationParams(
        versions=[V1],
        device_classes=["cpu-8g"],
        since="2025-06-01T00:00:00Z",
        max_prompt_chars=20,
        min_score=0.5,
        include_corrections=False,
        heldout_fraction=0.0,
    )

    got = curate(samples, params)

    assert [r.messages[0].content for r in got.train] == ["keep?"]
    assert got.counts["excluded_version"] == 1 and got.counts["excluded_device_class"] == 1
    assert got.counts["excluded_time"] == 1 and got.counts["excluded_prompt_length"] == 1
    assert got.counts["excluded_down"] == 1 and got.counts["excluded_kind"] == 1
    assert got.versions == [V1] and got.device_classes == ["cpu-8g"]


def test_dedupe_folds_case_and_whitespace_and_keeps_the_earliest() -> None:
    samples = [record(3, "Hello   World?", "Hi."), record(1, "hello world?", "hi."), record(2, "hello world?", "Hey")]

    got = curate(samples, CurationParams(heldout_fraction=0.0))

    assert [(r.messages[0].content, r.completion) for r in got.train] == [
        ("hello world?", "hi."),
        ("hello world?", "Hey"),
    ]
    assert got.counts["excluded_duplicate"] == 1
    assert normalize_text("  A\u00a0b\tC ") == "a b c"


def test_jsonl_round_trips_and_is_independent_of_input_order() -> None:
    samples = [record(i, f"question {i}?", f"answer {i}", release_id="r1") for i in range(20)]

    forward = curate(samples, CurationParams(heldout_fraction=0.3))
    backward = curate(list(reversed(samples)), CurationParams(heldout_fraction=0.3))
    data = to_jsonl(forward.train)

    assert data == to_jsonl(backward.train) and to_jsonl(forward.heldout) == to_jsonl(backward.heldout)
    assert read_jsonl(data) == forward.train
    line = data.decode().splitlines()[0]
    assert list(__import__("json").loads(line)) == ["completion", "messages", "source"]
    assert forward.releases == ["r1"] and forward.heldout and forward.train


texts = st.text(alphabet=st.sampled_from("aAbB ?\t"), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(texts, texts, st.sampled_from(["up", "down"]), st.booleans()), max_size=30))
def test_the_split_never_puts_one_prompt_in_both_sets(items: list[tuple[str, str, str, bool]]) -> None:
    samples = [
        record(i, prompt, answer, rating=rating, correction=answer + "!" if corrected else None)
        for i, (prompt, answer, rating, corrected) in enumerate(items)
    ]

    got = curate(samples, CurationParams(heldout_fraction=0.5))

    train = {prompt_key(r.messages) for r in got.train}
    heldout = {prompt_key(r.messages) for r in got.heldout}
    assert not train & heldout
    assert got.counts["train"] + got.counts["heldout"] + sum(
        v for k, v in got.counts.items() if k.startswith("excluded_")
    ) == len(samples)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(texts, texts), max_size=30))
def test_dedupe_is_idempotent_and_leaves_no_two_equal_pairs(pairs: list[tuple[str, str]]) -> None:
    records = [
        TrainingRecord.model_validate(
            {
                "messages": [{"role": "user", "content": p}],
                "completion": c,
                "source": {
                    "kind": "up",
                    "rating": "up",
                    "score": None,
                    "version": V1,
                    "device_class": "c",
                    "release": None,
                },
            }
        )
        for p, c in pairs
    ]

    once = dedupe(records)

    assert dedupe(once) == once
    keys = [(prompt_key(r.messages), normalize_text(r.completion)) for r in once]
    assert len(keys) == len(set(keys))


@given(st.text(min_size=1, max_size=20), st.floats(min_value=0.0, max_value=1.0))
def test_split_of_is_stable_and_follows_the_fraction_ends(key: str, fraction: float) -> None:
    assert split_of(key, fraction) == split_of(key, fraction)
    assert split_of(key, 0.0) == "train" and split_of(key, 1.0) == "heldout"
