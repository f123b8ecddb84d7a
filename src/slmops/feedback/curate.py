"""Curation: from the feedback samples devices uploaded to a training set and a held-out set. Pure; no I/O.

The control plane stores each sample once (:mod:`slmops.control.feedback`); an operator lists them as
:class:`FeedbackRecord` (the stored sample without any device identifier) and curates them with
:class:`CurationParams` into a dataset version (:mod:`slmops.registry.datasets`). What a sample becomes:

- with a ``correction``: the pair (prompt → correction), kind ``correction``, whatever its rating;
- rated ``up`` (or only scored, at or above ``min_score``): the pair (prompt → answer), kind ``up``;
- rated ``down`` (or scored below ``min_score``) without a correction: no pair; counted as ``down``.

Then the filters (model version, device class, received time, prompt and completion length in characters), then
dedupe: two pairs whose prompt and completion are the same after :func:`normalize_text` (Unicode NFKC, case
folded, whitespace collapsed) are one; the earliest rated is kept. The split is by the hash of the normalised
prompt (:func:`split_of`), so one prompt never lands in both sets and a prompt keeps its set as the data grows.

The JSONL files (``train.jsonl``, ``heldout.jsonl``; UTF-8, one object a line, keys sorted, ordered by rating time)
hold one :class:`TrainingRecord` a line::

    {"completion": "Paris.",
     "messages": [{"content": "What is the capital of France?", "role": "user"}],
     "source": {"device_class": "cpu-8g", "kind": "correction", "rating": "down", "release": "r-1a2b",
                "score": null, "version": "sha256:..."}}

``messages`` is the prompt (the agent sends it without the system prompt), ``completion`` the target answer: the
shape of TRL's conversational prompt-completion data, which the ``lora`` pass and ``slmops improve`` read.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from slmops.core._wire_base import Wire
from slmops.core.feedback import FeedbackMessage

__all__ = [
    "EXCLUSION_REASONS",
    "Curated",
    "CurationParams",
    "FeedbackRecord",
    "TrainingRecord",
    "TrainingSource",
    "curate",
    "dedupe",
    "normalize_text",
    "pair_key",
    "prompt_key",
    "read_jsonl",
    "split_of",
    "to_jsonl",
]

EXCLUSION_REASONS = (
    "down",  # rated down (or scored below min_score) without a correction
    "kind",  # a kind the parameters leave out (up or correction)
    "version",
    "device_class",
    "time",
    "prompt_length",
    "completion_length",
    "duplicate",
)
_SPACE = re.compile(r"\s+")


class FeedbackRecord(Wire):
    """A stored feedback sample as operators see and export it: which version and device class, never which
    device. ``id`` is the server's id of the sample (a hash), not the device's."""

    id: str
    version_digest: str
    device_class: str
    release_id: str | None = None  # the release whose cohort held the device when it sent the sample
    rated_at: str  # RFC 3339 UTC
    received_at: str  # RFC 3339 UTC
    rating: Literal["up", "down"] | None = None
    score: float | None = None
    messages: list[FeedbackMessage]
    answer: str
    correction: str | None = None
    redactions: dict[str, int] = Field(default_factory=dict)


class CurationParams(Wire):
    """What goes into a dataset; recorded in its manifest. Empty ``versions``/``device_classes``: all of them."""

    versions: list[str] = Field(default_factory=list)  # model version digests
    device_classes: list[str] = Field(default_factory=list)
    since: str | None = None  # on received_at, inclusive; RFC 3339 UTC as stored (2025-01-31T12:00:00Z)
    until: str | None = None  # exclusive
    include_up: bool = True
    include_corrections: bool = True
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)  # an 'up' scored below it does not count as up
    min_prompt_chars: int = Field(default=1, ge=0)
    max_prompt_chars: int = Field(default=8000, ge=1)
    min_completion_chars: int = Field(default=1, ge=0)
    max_completion_chars: int = Field(default=8000, ge=1)
    heldout_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    split_salt: str = Field(default="", max_length=64)  # another salt, another split

    @model_validator(mode="after")
    def _ranges(self) -> CurationParams:
        if self.max_prompt_chars < self.min_prompt_chars:
            raise ValueError("max_prompt_chars must be at least min_prompt_chars")
        if self.max_completion_chars < self.min_completion_chars:
            raise ValueError("max_completion_chars must be at least min_completion_chars")
        return self


SCORE_UP = 0.5
"""A sample that has only a score counts as ``up`` at or above this (or at or above ``min_score`` when set)."""


class TrainingSource(Wire):
    kind: Literal["up", "correction"]
    rating: Literal["up", "down"] | None
    score: float | None
    version: str  # the model version digest that answered
    device_class: str
    release: str | None


class TrainingRecord(Wire):
    """One line of ``train.jsonl`` / ``heldout.jsonl``."""

    messages: list[FeedbackMessage]
    completion: str
    source: TrainingSource


@dataclass(frozen=True)
class Curated:
    """The two sets, what was left out and why, and where the kept pairs came from."""

    train: list[TrainingRecord]
    heldout: list[TrainingRecord]
    counts: dict[str, int]  # samples, train, heldout, up, correction, and excluded_<reason> for each reason
    versions: list[str] = field(default_factory=list)  # of the kept pairs, sorted
    device_classes: list[str] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)


def normalize_text(text: str) -> str:
    """NFKC, case folded, runs of whitespace as one space, trimmed: what counts as 'the same text'."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _prompt_text(messages: Sequence[FeedbackMessage]) -> str:
    return "\n".join(f"{m.role}: {normalize_text(m.content)}" for m in messages)


def prompt_key(messages: Sequence[FeedbackMessage]) -> str:
    """sha256 hex of the normalised prompt (roles included)."""
    return hashlib.sha256(_prompt_text(messages).encode("utf-8")).hexdigest()


def pair_key(messages: Sequence[FeedbackMessage], completion: str) -> str:
    """sha256 hex of the normalised prompt and completion: the identity dedupe uses."""
    text = _prompt_text(messages) + "\n\x00\n" + normalize_text(completion)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(key: str, heldout_fraction: float, salt: str = "") -> Literal["train", "heldout"]:
    """``heldout`` for the share ``heldout_fraction`` of prompt keys, by a hash: the same key, the same set."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if position < heldout_fraction else "train"


def _order(sample: FeedbackRecord) -> tuple[str, str]:
    return (sample.rated_at, sample.id)


def dedupe(records: Iterable[TrainingRecord]) -> list[TrainingRecord]:
    """One record per (normalised prompt, normalised completion): the first one met. Idempotent."""
    seen: set[str] = set()
    kept = []
    for record in records:
        key = pair_key(record.messages, record.completion)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


def _kind(sample: FeedbackRecord, params: CurationParams) -> Literal["up", "correction", "down"]:
    if sample.correction is not None and sample.correction.strip():
        return "correction"
    threshold = params.min_score if params.min_score is not None else SCORE_UP
    if sample.rating == "up":
        return (
            "down" if params.min_score is not None and sample.score is not None and sample.score < threshold else "up"
        )
    if sample.rating is None and sample.score is not None and sample.score >= threshold:
        return "up"
    return "down"


def _exclusion(sample: FeedbackRecord, params: CurationParams) -> str | None:
    if params.versions and sample.version_digest not in params.versions:
        return "version"
    if params.device_classes and sample.device_class not in params.device_classes:
        return "device_class"
    if params.since is not None and sample.received_at < params.since:
        return "time"
    if params.until is not None and sample.received_at >= params.until:
        return "time"
    return None


def curate(samples: Iterable[FeedbackRecord], params: CurationParams) -> Curated:
    """Training pairs from samples (see the module docstring), split into train and held-out. The result does not
    depend on the order of ``samples``."""
    excluded: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    pairs: list[TrainingRecord] = []
    ordered = sorted(samples, key=_order)
    for sample in ordered:
        reason = _exclusion(sample, params)
        if reason is not None:
            excluded[reason] += 1
            continue
        kind = _kind(sample, params)
        if kind == "down":
            excluded["down"] += 1
            continue
        if (kind == "up" and not params.include_up) or (kind == "correction" and not params.include_corrections):
            excluded["kind"] += 1
            continue
        completion = sample.correction if kind == "correction" and sample.correction is not None else sample.answer
        prompt_chars = sum(len(m.content) for m in sample.messages)
        if not params.min_prompt_chars <= prompt_chars <= params.max_prompt_chars:
            excluded["prompt_length"] += 1
            continue
        if not params.min_completion_chars <= len(completion.strip()) <= params.max_completion_chars:
            excluded["completion_length"] += 1
            continue
        source = TrainingSource(
            kind=kind,
            rating=sample.rating,
            score=sample.score,
            version=sample.version_digest,
            device_class=sample.device_class,
            release=sample.release_id,
        )
        pairs.append(TrainingRecord(messages=list(sample.messages), completion=completion, source=source))
    kept = dedupe(pairs)
    excluded["duplicate"] += len(pairs) - len(kept)
    train: list[TrainingRecord] = []
    heldout: list[TrainingRecord] = []
    for record in kept:
        kinds[record.source.kind] += 1
        target = split_of(prompt_key(record.messages), params.heldout_fraction, params.split_salt)
        (heldout if target == "heldout" else train).append(record)
    counts = {"samples": len(ordered), "train": len(train), "heldout": len(heldout)}
    counts |= {kind: kinds[kind] for kind in ("up", "correction")}
    counts |= {f"excluded_{reason}": excluded[reason] for reason in EXCLUSION_REASONS}
    return Curated(
        train=train,
        heldout=heldout,
        counts=counts,
        versions=sorted({r.source.version for r in kept}),
        device_classes=sorted({r.source.device_class for r in kept}),
        releases=sorted({r.source.release for r in kept if r.source.release is not None}),
    )


def to_jsonl(records: Iterable[Wire]) -> bytes:
    """One canonical JSON object a line (keys sorted, UTF-8, no NaN), each line ending in a newline."""
    lines = [
        json.dumps(
            r.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        for r in records
    ]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def read_jsonl(data: bytes) -> list[TrainingRecord]:
    """The records of a ``train.jsonl`` / ``heldout.jsonl``."""
    return [TrainingRecord.model_validate_json(line) for line in data.decode("utf-8").splitlines() if line.strip()]
