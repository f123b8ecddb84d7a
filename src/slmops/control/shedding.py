"""Load shedding: a bound on the device requests in flight, answered ``503`` with ``Retry-After`` when over it.

A control plane restarted under a fleet sees every agent that missed a poll come back at once. Without a bound the
requests pile up in the server's thread pool and in its accept queue until they time out on the agents (who then
retry: a storm). :class:`LoadShedder` keeps at most ``max_in_flight`` device requests running; a request beyond
that waits up to ``queue_wait_s`` for a slot (at most ``max_queued`` wait), and the rest are answered at once, before
any database work, with ``503 Service Unavailable``, a ``Retry-After`` (whole seconds, drawn uniformly from
``retry_after_s`` to ``retry_after_s + retry_after_jitter_s`` so the shed agents do not come back together) and a
short JSON :class:`~slmops.control.schemas.ErrorBody` (code ``overloaded``). A cheap answer now beats an expensive
timeout later: the agent backs off and the server keeps its latency for the requests it took.

Only device endpoints are shed (enrollment, desired state, status, telemetry, feedback: :data:`DEVICE_PATH`):
operators, the dashboard, ``/metrics``, health and blob downloads (long streams, or redirects to object storage) are
never refused here, so an operator can still see and steer a loaded fleet.

It is a pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which would add a task and a memory stream
to every request). Waiting requests are served in arrival order; a slot is handed to the next waiter directly, so
a newcomer never overtakes the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from slmops.control.settings import ServerSettings

__all__ = ["DEVICE_PATH", "LoadShedder", "SheddingStats", "install_shedding"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEVICE_PATH = re.compile(r"^/api/v1/(?:enroll(?:/claim)?|devices/[^/]+/(?:desired|status|telemetry|feedback))/?$")


@dataclass
class SheddingStats:
    """Counters since the app started (read them from ``app.state.shedding``)."""

    admitted: int = 0
    queued: int = 0  # admitted after waiting for a slot
    shed: int = 0
    in_flight: int = 0
    waiting: int = 0


class LoadShedder:
    """ASGI middleware: at most ``max_in_flight`` device requests at once (see the module docstring).

    ``max_in_flight <= 0`` turns shedding off (every request passes). ``rng`` draws the Retry-After jitter.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_in_flight: int = 64,
        max_queued: int = 256,
        queue_wait_s: float = 0.5,
        retry_after_s: int = 5,
        retry_after_jitter_s: int = 10,
        rng: random.Random | None = None,
        stats: SheddingStats | None = None,
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.queue_wait_s = queue_wait_s
        self.retry_after_s = max(0, retry_after_s)
        self.retry_after_jitter_s = max(0, retry_after_jitter_s)
        self.rng = rng or random.Random()
        self.stats = stats or SheddingStats()
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_in_flight <= 0 or not DEVICE_PATH.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        if not await self._admit():
            self.stats.shed += 1
            await self._refuse(send)
            return
        self.stats.admitted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._release()

    # ------------------------------------------------------------------------------------------------ slots

    async def _admit(self) -> bool:
        stats = self.stats
        if stats.in_flight < self.max_in_flight and not self._waiters:
            stats.in_flight += 1
            return True
        if self.queue_wait_s <= 0 or len(self._waiters) >= self.max_queued:
            return False
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        stats.waiting += 1
        try:
            await asyncio.wait({slot}, timeout=self.queue_wait_s)  # never cancels ``slot`` itself
        except asyncio.CancelledError:  # the client went away while waiting
            self._abandon(slot)
            raise
        finally:
            stats.waiting -= 1
        if slot.done():  # _release handed its slot over (in_flight already counts it)
            stats.queued += 1
            return True
        self._abandon(slot)
        return False

    def _abandon(self, slot: asyncio.Future[None]) -> None:
        if slot.done() and not slot.cancelled():
            self._release()  # a slot was handed over just as the wait ended: pass it on
            return
        slot.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(slot)

    def _release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot moves to the oldest waiter; in_flight stays the same
                return
        self.stats.in_flight -= 1

    # ------------------------------------------------------------------------------------------------ answer

    def retry_after(self) -> int:
        """The ``Retry-After`` of one refusal, in whole seconds."""
        return self.retry_after_s + self.rng.randint(0, self.retry_after_jitter_s)

    async def _refuse(self, send: Send) -> None:
        wait = self.retry_after()
        body = json.dumps(
            {
                "code": "overloaded",
                "message": f"the control plane is at its limit of {self.max_in_flight} device requests in flight; "
                f"retry after {wait} s",
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(wait).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install_shedding(app: FastAPI, settings: ServerSettings) -> SheddingStats:
    """Add a :class:`LoadShedder` to ``app`` with the ``shed_*`` fields of ``settings``; its counters are
    ``app.state.shedding``."""
    stats = SheddingStats()
    app.add_middleware(
        LoadShedder,
        max_in_flight=settings.shed_max_in_flight,
        max_queued=settings.shed_max_queued,
        queue_wait_s=settings.shed_queue_wait_s,
        retry_after_s=settings.shed_retry_after_s,
        retry_after_jitter_s=settings.shed_retry_after_jitter_s,
        stats=stats,
    )
    app.state.shedding = stats
    return stats
