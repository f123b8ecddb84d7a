"""The local policy: what the local API applies to each request besides the model itself.

Two things come from the control plane's desired state and change without a model reload: the site's
:class:`~slmops.core.adaptation.LocalAdaptation` (a system prompt, sampling defaults and bounds) and the blueprint's
:class:`~slmops.core.feedback.FeedbackPolicy`. A third is the site's own consent to let feedback text leave the
device (``slmops agent --feedback-opt-in``), fixed when the agent starts and never set by the control plane.
:class:`LocalPolicy` holds the three behind a lock; the agent replaces them when the desired state changes and
every request reads one consistent :class:`PolicySnapshot` when it starts.

How a request is adapted (:func:`with_system_prompt`, :func:`adapt_request`), pure functions over values:

- **System prompt** (chat only): the site's prompt comes first. When the request's first message is already a
  ``system`` (or ``developer``) message, the two are *merged* into one system message, the site's text first and the
  client's after a blank line; otherwise the site's prompt becomes a new first message. Merging keeps chat templates
  that accept only one leading system message (Gemma, Llama) working. Text completions get no system prompt.
- **Sampling defaults** fill the fields the request left out (``temperature``, ``top_p``, ``max_tokens``).
- **Bounds** clamp the values in effect; a value the *client* sent that was changed is named in the answer's
  ``x-slmops-clamped`` header (for example ``temperature,max_tokens``), so callers can tell.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from slmops.core.adaptation import LocalAdaptation
from slmops.core.feedback import FeedbackPolicy
from slmops.runtime._openai import GenerationRequest
from slmops.runtime.chat import message_text

__all__ = ["CLAMPED_HEADER", "LocalPolicy", "PolicySnapshot", "adapt_request", "with_system_prompt"]

CLAMPED_HEADER = "x-slmops-clamped"


@dataclass(frozen=True)
class PolicySnapshot:
    """The policy in effect for one request."""

    local: LocalAdaptation
    feedback: FeedbackPolicy
    site_opt_in: bool = False

    @property
    def collect_text(self) -> bool:
        """Whether prompt and answer text may be kept for feedback: the blueprint allows it *and* the site opted in."""
        return self.feedback.mode == "opt_in" and self.site_opt_in

    def why_no_text(self) -> str | None:
        """Why no text is kept or uploaded (None when it is)."""
        if self.feedback.mode != "opt_in":
            return "feedback collection is off in this device's blueprint (spec.feedback.mode: off)"
        if not self.site_opt_in:
            return "this site has not opted in to feedback (start the agent with --feedback-opt-in to do so)"
        return None


class LocalPolicy:
    """A thread-safe holder of the current :class:`PolicySnapshot`; readers never see half an update."""

    def __init__(
        self,
        *,
        site_opt_in: bool = False,
        local: LocalAdaptation | None = None,
        feedback: FeedbackPolicy | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._snapshot = PolicySnapshot(local or LocalAdaptation(), feedback or FeedbackPolicy(), site_opt_in)

    def current(self) -> PolicySnapshot:
        with self._lock:
            return self._snapshot

    def update(self, local: LocalAdaptation, feedback: FeedbackPolicy) -> bool:
        """Put the desired state's adaptation and feedback policy in effect; returns whether anything changed."""
        with self._lock:
            old = self._snapshot
            self._snapshot = PolicySnapshot(local, feedback, old.site_opt_in)
            return (old.local, old.feedback) != (local, feedback)


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """``messages`` with the site's system prompt first (merged into a leading system message; see the module)."""
    if not system_prompt:
        return messages
    if messages and messages[0].get("role") in ("system", "developer"):
        own = message_text(messages[0].get("content"))
        merged = f"{system_prompt}\n\n{own}" if own else system_prompt
        return [{"role": "system", "content": merged}, *messages[1:]]
    return [{"role": "system", "content": system_prompt}, *messages]


def _clamp(value: float, bound: tuple[float, float] | None) -> float:
    return value if bound is None else min(max(value, bound[0]), bound[1])


def adapt_request(
    body: GenerationRequest, local: LocalAdaptation, max_tokens_limit: int
) -> tuple[GenerationRequest, list[str]]:
    """``body`` with the site's sampling defaults filled in and its values clamped to the site's bounds, and the
    names of the fields the client sent that were clamped. ``max_tokens_limit`` is the server's own limit (and its
    default), which the bounds never raise."""
    sent = body.model_fields_set
    defaults, bounds = local.sampling, local.bounds
    clamped: list[str] = []
    temperature = body.temperature
    if "temperature" not in sent and defaults.temperature is not None:
        temperature = defaults.temperature
    top_p = body.top_p
    if "top_p" not in sent and defaults.top_p is not None:
        top_p = defaults.top_p
    asked = body.max_tokens or body.max_completion_tokens
    max_tokens = asked if asked is not None else (defaults.max_tokens or max_tokens_limit)
    update: dict[str, Any] = {}
    for name, value, bound in (("temperature", temperature, bounds.temperature), ("top_p", top_p, bounds.top_p)):
        final = _clamp(value, bound)
        if final != value and name in sent:
            clamped.append(name)
        if final != getattr(body, name):
            update[name] = final
    if bounds.max_tokens is not None:
        low, high = bounds.max_tokens
        final_tokens = min(max(max_tokens, low), high, max(max_tokens_limit, 1))
        if asked is not None and final_tokens != asked:
            clamped.append("max_tokens")
        max_tokens = final_tokens
    if max_tokens != asked and (asked is not None or max_tokens != max_tokens_limit):
        update["max_tokens"] = max_tokens
        update["max_completion_tokens"] = None
    return (body.model_copy(update=update) if update else body), clamped
