"""One request's generation, run in a worker thread and reported to the event loop through a queue.

The worker holds the request's lease on the model until it ends, so a model switch never closes a backend that is
still generating. Nothing here logs prompt or answer text; errors are logged by type only.

Waking the event loop costs: each wake is a write to its self-pipe, a GIL hand-over from the worker (which holds
the GIL between llama.cpp calls) and back. A non-streamed request therefore wakes the loop once, with the whole
text; a streamed one at most once per batch of pieces: while a wake is pending, newer pieces join the text it
delivers (so a loop that lags behind the model sends one chunk with several tokens instead of falling further
behind). With a backend that yields 128 pieces 5 ms apart, this halved the CPU the local API spends per
non-streamed request (server and client: 4.3 ms to 1.9 ms on a 2-core VM), CPU a small device's llama.cpp
threads can use instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from slmops.errors import RuntimeBackendError
from slmops.runtime._openai import ApiError, Done, bad_request
from slmops.runtime.backend import Backend, Sampling
from slmops.runtime.host import ModelInfo
from slmops.runtime.metrics import Operation, ServerMetrics
from slmops.runtime.stats import RequestStats

__all__ = ["Generation"]

log = logging.getLogger(__name__)


class Generation:
    """Reports ``("piece", str)`` events, then one ``("done", Done)`` or ``("error", ApiError)``, on ``queue``.

    ``lease`` is closed when the work ends (or fails to start); setting ``cancel`` stops it after the next piece.
    """

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        stats: RequestStats | None,
        lease: ExitStack,
        backend: Backend,
        info: ModelInfo,
        started: float,
        metrics: ServerMetrics | None = None,
        operation: Operation = "chat",
    ) -> None:
        self.executor = executor
        self.metrics = metrics
        self.operation: Operation = operation
        self.stats = stats
        self.lease = lease
        self.backend = backend
        self.info = info
        self.started = started
        self.cancel = threading.Event()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def start(self, prompt: str, sampling: Sampling, *, stream: bool = True) -> None:
        """Generate in a worker. ``stream=False`` reports the whole text as one ``("piece", text)`` event (none for
        an empty answer) just before ``("done", ...)``; ``stream=True`` reports pieces as they come, coalesced
        while the loop has not yet taken the previous ones."""
        loop = asyncio.get_running_loop()
        pending: list[str] = []  # pieces not yet handed to the loop; guarded by ``lock``
        lock = threading.Lock()

        def deliver() -> None:  # on the event loop
            with lock:
                text = "".join(pending)
                pending.clear()
            if text:
                self.queue.put_nowait(("piece", text))

        def wake(callback: Callable[..., None], *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop is gone (shutting down)
                loop.call_soon_threadsafe(callback, *args)

        def put(kind: str, value: Any) -> None:
            if kind == "piece":
                with lock:
                    pending.append(value)
                    if len(pending) > 1 or not stream:  # a wake is already on its way, or the end will deliver
                        return
                wake(deliver)
                return
            with lock:
                held = bool(pending)
            if held:  # hand over what is left, in order, before the final event
                wake(deliver)
            wake(self.queue.put_nowait, (kind, value))

        try:
            self.executor.submit(self._work, prompt, sampling, put)
        except RuntimeError:
            self.lease.close()
            raise ApiError(503, "the server is shutting down; retry later", "server_error", "shutting_down") from None

    def _work(self, prompt: str, sampling: Sampling, put: Callable[[str, Any], None]) -> None:
        model_id = self.info.model_id
        first: float | None = None
        prompt_tokens = completion_tokens = 0
        outcome = "error"
        error_type = "internal"
        finish_reason: str | None = None
        prompt_nll: float | None = None
        try:
            prompt_tokens = self.backend.count_tokens(prompt)
            if prompt_tokens >= self.info.context_tokens:
                outcome = "rejected"
                put(
                    "error",
                    bad_request(
                        f"the prompt has {prompt_tokens} tokens; model '{model_id}' has a context of "
                        f"{self.info.context_tokens} tokens: shorten the prompt",
                        "context_length_exceeded",
                        "messages",
                    ),
                )
                return
            with self.backend.stream(prompt, **sampling) as pieces:
                for piece in pieces:
                    if first is None:
                        first = time.monotonic()
                    if self.cancel.is_set():
                        outcome = "cancelled"
                        break
                    put("piece", piece)
                prompt_tokens, completion_tokens = pieces.prompt_tokens, pieces.completion_tokens
                prompt_nll = pieces.prompt_nll
                if outcome != "cancelled":
                    outcome = "ok"
                    finish_reason = pieces.finish_reason or "stop"
                    put("done", Done(prompt_tokens, completion_tokens, finish_reason))
        except RuntimeBackendError as exc:
            log.warning("generation with model %s failed: %s", model_id, type(exc).__name__)
            error_type = exc.code
            put("error", ApiError(500, exc.message, "server_error", exc.code))
        except Exception as exc:
            log.error("generation with model %s failed unexpectedly: %s", model_id, type(exc).__name__)
            put(
                "error",
                ApiError(500, "the model failed to generate; see the device's log", "server_error", "internal"),
            )
        finally:
            self.lease.close()
            self._record(outcome, prompt_tokens, completion_tokens, first, finish_reason, prompt_nll)
            self._observe(outcome, error_type, prompt_tokens, completion_tokens, first)

    def _observe(
        self, outcome: str, error_type: str, prompt_tokens: int, completion_tokens: int, first: float | None
    ) -> None:
        if self.metrics is None or outcome == "rejected":
            return
        self.metrics.observe(
            self.operation,
            self.info.model_id,
            duration_s=time.monotonic() - self.started,
            error_type=error_type if outcome == "error" else None,
            input_tokens=prompt_tokens,
            output_tokens=completion_tokens,
            time_to_first_token_s=first - self.started if first is not None and outcome == "ok" else None,
        )

    def _record(
        self,
        outcome: str,
        prompt_tokens: int,
        completion_tokens: int,
        first: float | None,
        finish_reason: str | None = None,
        prompt_nll: float | None = None,
    ) -> None:
        """Count the request; for drift also its finish reason ("other" when cancelled), whether it produced no
        text at all (a stream that never yielded a piece), and the prompt NLL the backend measured, if any."""
        if self.stats is None:
            return
        if outcome == "rejected":
            self.stats.record_rejected()
            return
        self.stats.record(
            self.info.model_id,
            ok=outcome != "error",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=time.monotonic() - self.started if outcome == "ok" else None,
            time_to_first_token_s=first - self.started if first is not None else None,
            finish_reason={"ok": finish_reason, "error": "error"}.get(outcome, "other"),
            empty=first is None if outcome == "ok" else None,
            prompt_nll=prompt_nll,
        )
