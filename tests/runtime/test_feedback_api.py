"""``POST /v1/feedback`` and the local feedback store, over a real server on loopback and a tiny llama.cpp model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.core.feedback import FeedbackPolicy
from slmops.feedback.store import FeedbackStore, FeedbackStoreConfig, RatedCompletion, UploadDecision
from slmops.runtime import LlamaCppBackend, LocalServer, ModelHost, ModelInfo, create_app
from slmops.runtime.policy import LocalPolicy, PolicySnapshot
from tests.runtime.test_server import assert_error, chat, sse

Load = Callable[..., tuple[LlamaCppBackend, ModelInfo]]
SECRET = "zebra-quartz-5521"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Local:
    client: httpx.Client
    store: FeedbackStore
    policy: LocalPolicy
    clock: Clock
    rated: list[tuple[RatedCompletion, PolicySnapshot]] = field(default_factory=list)


def _serve(tmp_path: Path, load: Load, tiny_model: Path, *, site_opt_in: bool, hook: bool = True) -> Iterator[Local]:
    clock = Clock()
    store = FeedbackStore(tmp_path / "feedback.db", FeedbackStoreConfig(max_rows=50), clock=clock).open()
    policy = LocalPolicy(site_opt_in=site_opt_in)
    host = ModelHost()
    backend, info = load(tiny_model, "tiny@v1")
    host.activate(backend, ModelInfo(**{**info.__dict__, "digest": "sha256:" + "ab" * 32}))
    rated: list[tuple[RatedCompletion, PolicySnapshot]] = []

    def on_rated(completion: RatedCompletion, snapshot: PolicySnapshot) -> UploadDecision:
        rated.append((completion, snapshot))
        return UploadDecision(True, "queued (test hook)")

    app = create_app(host, max_tokens_limit=8, policy=policy, feedback=store, on_rated=on_rated if hook else None)
    server = LocalServer(app).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield Local(client, store, policy, clock, rated)
    finally:
        server.stop()
        host.deactivate()
        store.close()


@pytest.fixture
def local(tmp_path: Path, load: Load, tiny_model: Path) -> Iterator[Local]:
    yield from _serve(tmp_path, load, tiny_model, site_opt_in=True)


def _complete(local: Local, text: str = SECRET, **extra: Any) -> str:
    answer = local.client.post("/v1/chat/completions", json=chat(text, max_tokens=3, **extra))
    assert answer.status_code == 200, answer.text
    ident: str = answer.json()["id"]
    return ident


def _rate(local: Local, body: Any) -> httpx.Response:
    return local.client.post("/v1/feedback", json=body)


def test_with_feedback_off_only_the_id_and_digest_are_kept_and_a_rating_is_stored_locally(local: Local) -> None:
    ident = _complete(local)

    row = local.store.debug_row(ident)
    assert row is not None
    assert row["version_digest"] == "sha256:" + "ab" * 32
    assert row["messages"] is None and row["answer"] is None
    answer = _rate(local, {"completion_id": ident, "rating": "down", "correction": f"say {SECRET}"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["stored"] is True and body["text_kept"] is False and body["correction_kept"] is False
    assert body["queued_for_upload"] is False and "spec.feedback.mode: off" in body["reason"]
    row = local.store.debug_row(ident)
    assert row is not None and row["rating"] == "down" and row["correction"] is None
    assert not any(SECRET.encode() in f.read_bytes() for f in local.store.path.parent.glob("feedback.db*"))
    assert local.rated == []  # the upload hook is never asked
    assert local.store.counts()["sha256:" + "ab" * 32].down == 1


def test_with_feedback_opt_in_the_text_is_kept_and_the_hook_decides_the_upload(local: Local) -> None:
    local.policy.update(local.policy.current().local, FeedbackPolicy(mode="opt_in"))
    ident = _complete(local, text=f"my word is {SECRET}")

    row = local.store.debug_row(ident)
    assert row is not None and json.loads(row["messages"]) == [{"role": "user", "content": f"my word is {SECRET}"}]
    assert isinstance(row["answer"], str)
    answer = _rate(local, {"completion_id": ident, "score": 0.25, "correction": "better"})
    assert answer.status_code == 201, answer.text
    assert answer.json()["queued_for_upload"] is True and answer.json()["text_kept"] is True
    [(rated, snapshot)] = local.rated
    assert rated.completion_id == ident and rated.score == 0.25 and rated.correction == "better"
    assert rated.messages == [{"role": "user", "content": f"my word is {SECRET}"}] and snapshot.collect_text


def test_a_streamed_chat_and_a_text_completion_are_recorded_too(local: Local) -> None:
    local.policy.update(local.policy.current().local, FeedbackPolicy(mode="opt_in"))
    with local.client.stream("POST", "/v1/chat/completions", json=chat("streamed", max_tokens=3, stream=True)) as r:
        events = sse(r)
    streamed = events[0]["id"]
    text = local.client.post("/v1/completions", json={"prompt": "once upon", "max_tokens": 3})
    assert text.status_code == 200, text.text

    stream_row, text_row = local.store.debug_row(streamed), local.store.debug_row(text.json()["id"])
    assert stream_row is not None and text_row is not None
    pieces = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert stream_row["answer"] == pieces
    assert json.loads(text_row["messages"]) == [{"role": "user", "content": "once upon"}]
    assert text_row["answer"] == text.json()["choices"][0]["text"]


def test_without_the_sites_opt_in_no_text_is_kept(tmp_path: Path, load: Load, tiny_model: Path) -> None:
    for local in _serve(tmp_path, load, tiny_model, site_opt_in=False):
        local.policy.update(local.policy.current().local, FeedbackPolicy(mode="opt_in"))
        ident = _complete(local)
        answer = _rate(local, {"completion_id": ident, "rating": "up"})
        assert answer.status_code == 201
        assert answer.json()["queued_for_upload"] is False and "--feedback-opt-in" in answer.json()["reason"]
        row = local.store.debug_row(ident)
        assert row is not None and row["messages"] is None and local.rated == []


def test_a_second_rating_is_409_an_unknown_id_404_and_a_bad_body_422(local: Local) -> None:
    ident = _complete(local)
    assert _rate(local, {"completion_id": ident, "rating": "up"}).status_code == 201

    assert_error(_rate(local, {"completion_id": ident, "rating": "down"}), 409, "already_rated")
    assert_error(_rate(local, {"completion_id": "chatcmpl-nope", "rating": "up"}), 404, "completion_not_found")
    for bad in (
        {"completion_id": ident},  # neither rating, score nor correction
        {"completion_id": ident, "rating": "meh"},
        {"completion_id": ident, "score": 1.5},
        {"rating": "up"},
        {"completion_id": ident, "rating": "up", "extra": 1},
        [1, 2],
    ):
        assert_error(_rate(local, bad), 422, "invalid_feedback")
    garbage = local.client.post("/v1/feedback", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(garbage, 422, "invalid_feedback")


def test_a_completion_older_than_the_retention_is_gone(local: Local) -> None:
    local.policy.update(local.policy.current().local, FeedbackPolicy(retention_days=1.0))
    ident = _complete(local)
    local.clock.now += 86400.0 + 1

    assert_error(_rate(local, {"completion_id": ident, "rating": "up"}), 404, "completion_not_found")
    assert local.store.purge() == 1 and local.store.size() == 0


def test_a_server_without_a_store_answers_503(tmp_path: Path, load: Load, tiny_model: Path) -> None:
    host = ModelHost()
    host.activate(*load(tiny_model))
    server = LocalServer(create_app(host, max_tokens_limit=8)).start()
    try:
        answer = httpx.post(f"{server.url}/v1/feedback", json={"completion_id": "x", "rating": "up"}, timeout=30)
        assert_error(answer, 503, "feedback_unavailable")
    finally:
        server.stop()
        host.deactivate()


def test_the_store_is_bounded_by_rows_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    with FeedbackStore(tmp_path / "f.db", FeedbackStoreConfig(max_rows=3), clock=clock) as store:
        for n in range(5):
            clock.now += 1
            store.record(f"c{n}", None, retention_days=30)

        assert store.size() == 3
        assert [store.debug_row(f"c{n}") is not None for n in range(5)] == [False, False, True, True, True]


def test_the_upload_queue_survives_a_reopen_and_respects_the_daily_cap(tmp_path: Path) -> None:
    from slmops.core.feedback import FeedbackMessage, FeedbackSample

    def sample(n: int) -> FeedbackSample:
        return FeedbackSample(
            id=f"fb-{n}",
            completion_id=f"c{n}",
            version_digest="sha256:00",
            time="2026-12-03T12:00:00Z",
            rating="up",
            messages=[FeedbackMessage(role="user", content="hi")],
            answer="hello",
        )

    with FeedbackStore(tmp_path / "f.db") as store:
        assert [store.queue(sample(n), day="2026-12-03", daily_cap=2) for n in range(3)] == [True, True, False]
        assert store.queue(sample(3), day="2026-12-04", daily_cap=2) is True
    with FeedbackStore(tmp_path / "f.db") as store:
        assert [s.id for s in store.pending(10)] == ["fb-0", "fb-1", "fb-3"]
        assert store.queued_on("2026-12-04") == 1 and store.queued_on("2026-12-03") == 0  # old days are forgotten
        assert store.acknowledge(["fb-0", "fb-9"]) == 1
        assert [s.id for s in store.pending(10)] == ["fb-1", "fb-3"]
