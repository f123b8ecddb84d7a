"""Feedback on the agent: which rated completions leave the device (sampled, capped, redacted), and their upload.

Text leaves only when both consents hold at the moment of the rating: the blueprint's ``spec.feedback.mode`` is
``opt_in`` (from the control plane) *and* this device's own configuration opts in (``AgentConfig.feedback_opt_in``,
``slmops agent --feedback-opt-in``: the site's decision, which the control plane cannot set). Then a rated completion
whose text the local store kept is

1. sampled: kept with probability ``sample_rate``;
2. capped: at most ``max_samples_per_day`` samples are queued per UTC day (counted in the store, across restarts);
3. redacted on the device: every message, the answer and the correction go through
   :class:`~slmops.feedback.redact.Redactor` (``presidio`` as the blueprint says); a redaction that fails queues
   nothing, never the raw text;
4. queued as a :class:`~slmops.core.feedback.FeedbackSample` (a fresh id, no device identifier) in the store's
   upload queue, which survives restarts.

:meth:`FeedbackCollector.upload` (called by the daemon at every poll) sends the queue in batches to
``POST /api/v1/devices/{id}/feedback`` and drops the ids the :class:`~slmops.core.feedback.FeedbackAck` names, accepted
or rejected (a rejection is final: its reason is logged). Failures back off exponentially with jitter (from
``backoff_base_s`` up to ``backoff_max_s``). When either consent is withdrawn, the queue is emptied before anything
is sent: a sample queued under consent never leaves without it.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from slmops.core.feedback import (
    MAX_FEEDBACK_SAMPLES_PER_BATCH,
    MAX_FEEDBACK_TEXT_CHARS,
    FeedbackBatch,
    FeedbackMessage,
    FeedbackSample,
)
from slmops.errors import SLMOpsError, UnavailableError
from slmops.feedback.store import FeedbackStore, RatedCompletion, UploadDecision, rfc3339
from slmops.runtime.policy import LocalPolicy, PolicySnapshot

if TYPE_CHECKING:
    from slmops.agent.client import ControlPlaneClient
    from slmops.feedback.redact import Redactor

__all__ = ["FeedbackCollector"]

log = logging.getLogger(__name__)


class FeedbackCollector:
    """Turns ratings into redacted, queued samples (:meth:`rated`, the local API's hook) and uploads them."""

    def __init__(
        self,
        store: FeedbackStore,
        policy: LocalPolicy,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        backoff_base_s: float = 5.0,
        backoff_max_s: float = 600.0,
    ) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock
        self._rng = rng or random.Random()
        self._redactors: dict[bool, Redactor] = {}
        self._lock = threading.Lock()
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._failures = 0
        self._next_attempt = 0.0

    # ----------------------------------------------------------------------------------------------- queueing

    def _redactor(self, presidio: bool) -> Redactor:
        from slmops.feedback.redact import Redactor

        with self._lock:
            if presidio not in self._redactors:
                self._redactors[presidio] = Redactor(presidio=presidio)
            return self._redactors[presidio]

    def rated(self, rated: RatedCompletion, policy: PolicySnapshot) -> UploadDecision:
        """Decide whether a rating's redacted sample is queued for upload (see the module); never raises."""
        why_not = policy.why_no_text()
        if why_not is not None:
            return UploadDecision(False, why_not)
        if not rated.has_text or not rated.messages:
            return UploadDecision(False, "the completion's text was not kept on this device: only the rating is")
        feedback = policy.feedback
        with self._lock:
            draw = self._rng.random()
        if draw >= feedback.sample_rate:
            return UploadDecision(
                False, f"not sampled (the blueprint uploads {feedback.sample_rate:.0%} of rated completions)"
            )
        try:
            sample = self._sample(rated, policy)
        except (SLMOpsError, ImportError, ValueError) as exc:
            log.warning("feedback redaction failed (%s); the sample is not queued", type(exc).__name__)
            return UploadDecision(False, f"redaction failed on this device ({type(exc).__name__}): nothing is queued")
        day = datetime.fromtimestamp(self.clock(), UTC).date().isoformat()
        if not self.store.queue(sample, day=day, daily_cap=feedback.max_samples_per_day):
            return UploadDecision(
                False, f"today's cap of {feedback.max_samples_per_day} samples is reached (spec.feedback)"
            )
        counts = sum(sample.redactions.values())
        return UploadDecision(True, f"queued for upload after on-device redaction ({counts} spans replaced)")

    def _sample(self, rated: RatedCompletion, policy: PolicySnapshot) -> FeedbackSample:
        redactor = self._redactor(policy.feedback.redaction.presidio)
        counts: dict[str, int] = {}

        def clean(text: str) -> str:
            result = redactor.redact(text[:MAX_FEEDBACK_TEXT_CHARS])
            for kind, count in result.counts.items():
                counts[kind] = counts.get(kind, 0) + count
            return result.text[:MAX_FEEDBACK_TEXT_CHARS]

        assert rated.messages is not None and rated.answer is not None
        messages = [FeedbackMessage(role=m["role"], content=clean(m["content"])) for m in rated.messages]  # type: ignore[arg-type]
        answer = clean(rated.answer)
        correction = clean(rated.correction) if rated.correction is not None else None
        return FeedbackSample(
            id=f"fb-{secrets.token_hex(12)}",
            completion_id=rated.completion_id,
            version_digest=rated.version_digest or "unknown",
            time=rfc3339(rated.rated),
            rating=rated.rating,
            score=rated.score,
            messages=messages,
            answer=answer,
            correction=correction,
            redactions=counts,
        )

    # ----------------------------------------------------------------------------------------------- upload

    def upload(self, client: ControlPlaneClient, device_id: str) -> int:
        """Send the queue in batches (unless backing off); returns how many samples left the queue. Empties the
        queue without sending when either consent is missing now."""
        policy = self.policy.current()
        if policy.why_no_text() is not None:
            dropped = self.store.clear_queue()
            if dropped:
                log.info("dropped %d queued feedback samples: %s", dropped, policy.why_no_text())
            return 0
        now = self.clock()
        if now < self._next_attempt:
            return 0
        sent = 0
        while samples := self.store.pending(MAX_FEEDBACK_SAMPLES_PER_BATCH):
            try:
                ack = client.post_feedback(device_id, FeedbackBatch(samples=samples))
            except UnavailableError as exc:
                self._back_off(now, exc)
                return sent
            except SLMOpsError as exc:  # refused (404 before the control plane knows the route, 403, …)
                self._back_off(now, exc)
                return sent
            if ack.rejected:
                log.warning(
                    "the control plane rejected %d feedback samples: %s",
                    len(ack.rejected),
                    "; ".join(sorted(set(ack.rejected.values())))[:300],
                )
            removed = self.store.acknowledge([*ack.accepted_ids, *ack.rejected])
            sent += removed
            if removed == 0:
                self._back_off(now, None)
                return sent
        self._failures, self._next_attempt = 0, 0.0
        return sent

    def _back_off(self, now: float, exc: SLMOpsError | None) -> None:
        self._failures += 1
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (self._failures - 1))
        self._next_attempt = now + delay * self._rng.uniform(0.5, 1.0)
        log.warning(
            "feedback upload failed (%s); %d samples wait, next try in %.0f s",
            exc if exc is not None else "nothing was accepted",
            self.store.queued(),
            self._next_attempt - now,
        )
