"""The agent's backoff: full-jitter exponential waits after failed passes, capped, on top of a shedding server's
``Retry-After``, and back to the normal poll interval after a success; against a real server on loopback."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from slmops.agent.client import MAX_RETRY_AFTER_S, Backoff, ControlPlaneClient, parse_retry_after
from slmops.agent.config import AgentConfig
from slmops.agent.daemon import Agent
from slmops.errors import UnavailableError
from tests.agent.conftest import Models
from tests.agent.simulator import RunningSim, SimServer, free_port


def test_the_window_doubles_up_to_the_cap_and_a_success_resets_it() -> None:
    backoff = Backoff(base_s=1.0, cap_s=10.0, rng=random.Random(7))
    expected = random.Random(7)
    waits = [backoff.failed() for _ in range(6)]
    windows = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert waits == [expected.uniform(0.0, w) for w in windows]  # full jitter over the whole window
    assert backoff.failures == 6
    backoff.succeeded()
    assert backoff.failures == 0
    assert backoff.failed() == expected.uniform(0.0, 1.0)  # from the first window again


def test_retry_after_is_a_floor_with_the_jitter_on_top() -> None:
    backoff = Backoff(base_s=1.0, cap_s=30.0, rng=random.Random(1))
    waits = [backoff.failed(retry_after_s=5.0) for _ in range(200)]
    assert min(waits) >= 5.0
    assert max(waits) <= 5.0 + 30.0
    assert len({round(w, 3) for w in waits}) > 150  # spread, not all at 5 s


@given(
    failures=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.01, max_value=10),
    cap=st.floats(min_value=0.0, max_value=3600),
    retry_after=st.one_of(st.none(), st.floats(min_value=0, max_value=3600)),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_every_wait_lies_in_its_window(
    failures: int, base: float, cap: float, retry_after: float | None, seed: int
) -> None:
    backoff = Backoff(base_s=base, cap_s=cap, rng=random.Random(seed))
    for _ in range(failures - 1):
        backoff.failed()
    wait = backoff.failed(retry_after)
    floor = retry_after or 0.0
    assert floor <= wait <= floor + min(cap, base * 2.0 ** min(failures - 1, 60)) + 1e-9


def test_retry_after_is_read_as_seconds_or_a_date_and_capped() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    assert parse_retry_after("99999999") == MAX_RETRY_AFTER_S
    for value in (None, "", "soon", "-3", "1.5e400"):
        assert parse_retry_after(value) is None, value


class Flaky:
    """ASGI wrapper: the first ``failures`` desired-state polls get 503 + ``Retry-After``; every poll's arrival is
    recorded."""

    def __init__(self, app: Any, failures: int, retry_after_s: int) -> None:
        self.app = app
        self.failures = failures
        self.retry_after_s = retry_after_s
        self.polls: list[tuple[float, int]] = []  # (time.monotonic(), status)
        self.lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/desired"):
            await self.app(scope, receive, send)
            return
        with self.lock:
            shed = self.failures > 0
            self.failures -= shed
            self.polls.append((time.monotonic(), 503 if shed else 200))
        if not shed:
            await self.app(scope, receive, send)
            return
        body = b'{"code":"overloaded","message":"retry later"}'
        headers = [(b"content-type", b"application/json"), (b"retry-after", str(self.retry_after_s).encode())]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_the_agent_waits_out_retry_after_then_polls_normally_again(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    sim.sim.set_desired(None, free_port())
    with ControlPlaneClient(sim.url) as probe:  # the real simulator first, to enroll on
        assert probe.retry_after_s is None
    flaky = Flaky(sim.sim.app(), failures=0, retry_after_s=1)
    server = SimServer(flaky).start()
    try:
        with Agent(agent_config(server_url=server.url)) as agent:
            agent.run(once=True)  # enrolled, one successful poll
            with flaky.lock:
                flaky.failures, flaky.polls = 2, []
            stop = threading.Event()
            thread = threading.Thread(target=agent.run, kwargs={"stop": stop}, daemon=True)
            thread.start()
            deadline = time.monotonic() + 20
            while sum(1 for _, status in flaky.polls if status == 200) < 6:
                assert time.monotonic() < deadline, flaky.polls
                time.sleep(0.05)
            stop.set()
            thread.join(10)
            assert agent.client is not None and agent.client.retry_after_s is None  # taken by the loop
        polls = list(flaky.polls)
    finally:
        server.stop()

    statuses = [status for _, status in polls]
    assert statuses[:3] == [503, 503, 200]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(polls)]
    assert gaps[0] >= 1.0 and gaps[1] >= 1.0  # Retry-After (1 s) waited out after each 503
    recovered = sorted(gaps[2:])
    assert recovered[len(recovered) // 2] < 0.6  # then the 0.1 s poll interval again, not the Retry-After


def test_a_refused_connection_backs_off_within_twice_the_poll_interval(
    agent_config: Callable[..., AgentConfig],
) -> None:
    agent = Agent(agent_config(server_url=f"http://127.0.0.1:{free_port()}", poll_interval_s=5.0))
    with agent:
        rng = random.Random(11)
        backoff = Backoff(rng=rng)
        try:
            agent.enroll()
        except UnavailableError:
            pass
        else:
            raise AssertionError("nothing listens on that port: enrolling must fail")
        assert agent.client is not None and agent.client.retry_after_s is None
        waits = [agent.next_wait_s(backoff, True, rng) for _ in range(8)]
        expected = random.Random(11)
        assert waits == [expected.uniform(0.0, min(10.0, 2.0**n)) for n in range(8)]
        normal = agent.next_wait_s(backoff, False, rng)
        assert backoff.failures == 0 and 4.0 <= normal <= 6.0  # the jittered poll interval (jitter 0.2)
