"""The agent's nudge subscriber against a real Mosquitto broker: a nudge cuts the poll wait short; without a broker
(refused, killed) the wait lasts the poll interval, and nudges resume when the broker is back."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slmops.agent.nudge import NudgeConfig, NudgeListener, nudge_token, parse_broker_url
from slmops.control.nudge import MqttPublisher
from slmops.errors import ConfigError
from tests.mqtt_servers import CONTROL_USER, DEVICE_USER, Broker, refused, running_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def publisher(broker: Broker) -> Iterator[MqttPublisher]:
    publisher = MqttPublisher(broker.url, CONTROL_USER, broker.passwords[CONTROL_USER]).open()
    until(lambda: publisher.connected)
    yield publisher
    publisher.close()


def until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def listener(broker: Broker, credential: Callable[[], str | None], password: str | None = None) -> NudgeListener:
    config = NudgeConfig(broker.url, DEVICE_USER, password or broker.passwords[DEVICE_USER], reconnect_max_s=2)
    return NudgeListener(config, credential).start()


def nudge_until_woken(publisher: MqttPublisher, nudges: NudgeListener, credential: str) -> bool:
    """Publish to the device's topic from another thread while the poll loop waits (up to an hour)."""
    stop = threading.Event()
    sender = threading.Timer(0.3, lambda: publisher.publish(f"slmops/nudge/{nudge_token(credential)}"))
    sender.start()
    watchdog = threading.Timer(20, stop.set)  # a failing test ends instead of waiting the hour
    watchdog.start()
    try:
        return nudges.wait(stop, 3600)
    finally:
        sender.cancel()
        watchdog.cancel()


def test_a_nudge_wakes_the_poll_wait_and_nothing_else_does(broker: Broker, publisher: MqttPublisher) -> None:
    credential = "slmops_dev_" + secrets.token_urlsafe(32)
    nudges = listener(broker, lambda: credential)
    try:
        until(lambda: nudges.connected)
        time.sleep(0.2)  # the SUBSCRIBE follows the CONNACK
        assert nudge_until_woken(publisher, nudges, credential)
        assert nudges.nudges == 1

        publisher.publish(f"slmops/nudge/{nudge_token('slmops_dev_someone-else')}")  # another device's nudge
        assert not nudges.wait(threading.Event(), 0.5)  # the whole interval: no nudge for this device
        stop = threading.Event()
        stop.set()
        assert not nudges.wait(stop, 3600)  # a set stop returns at once
    finally:
        nudges.close()


def test_a_wrong_password_is_refused_and_the_agent_waits_its_interval(broker: Broker) -> None:
    nudges = listener(broker, lambda: "slmops_dev_x", password="wrong")
    try:
        until(lambda: nudges.last_error is not None)
        assert refused(nudges.last_error) and not nudges.connected
        started = time.monotonic()
        assert not nudges.wait(threading.Event(), 0.4)
        assert time.monotonic() - started >= 0.4
    finally:
        nudges.close()


def test_without_a_credential_nothing_connects_and_a_new_one_moves_the_subscription(
    broker: Broker, publisher: MqttPublisher
) -> None:
    credentials: list[str | None] = [None]
    nudges = listener(broker, lambda: credentials[-1])
    try:
        assert not nudges.wait(threading.Event(), 0.3) and not nudges.connected
        old = "slmops_dev_" + secrets.token_urlsafe(32)
        credentials.append(old)
        nudges.wait(threading.Event(), 0)  # each wait follows the credential
        until(lambda: nudges.connected)
        time.sleep(0.2)
        assert nudge_until_woken(publisher, nudges, old)

        new = "slmops_dev_" + secrets.token_urlsafe(32)  # a re-claim
        credentials.append(new)
        nudges.wait(threading.Event(), 0)
        until(lambda: nudges.connected)
        time.sleep(0.2)
        publisher.publish(f"slmops/nudge/{nudge_token(old)}")
        assert not nudges.wait(threading.Event(), 0.5)
        assert nudge_until_woken(publisher, nudges, new)
    finally:
        nudges.close()


def test_a_killed_broker_leaves_the_interval_and_nudges_resume_when_it_is_back(
    broker: Broker, publisher: MqttPublisher
) -> None:
    credential = "slmops_dev_" + secrets.token_urlsafe(32)
    nudges = listener(broker, lambda: credential)
    try:
        until(lambda: nudges.connected)
        time.sleep(0.2)
        assert nudge_until_woken(publisher, nudges, credential)

        broker.stop()  # SIGKILL
        until(lambda: not nudges.connected and not publisher.connected)
        assert not publisher.publish(f"slmops/nudge/{nudge_token(credential)}")
        started = time.monotonic()
        assert not nudges.wait(threading.Event(), 1.0)  # the poll interval, as without nudges
        assert time.monotonic() - started >= 1.0

        broker.start()  # same port, same users
        until(lambda: nudges.connected and publisher.connected)  # both reconnect by themselves (backoff <= 2 s)
        time.sleep(0.3)
        assert nudge_until_woken(publisher, nudges, credential)
    finally:
        nudges.close()


def test_broker_urls_are_checked() -> None:
    assert parse_broker_url("mqtt://broker.example") == parse_broker_url("mqtt://broker.example:1883")
    assert parse_broker_url("mqtts://broker.example").port == 8883
    assert parse_broker_url("mqtts://broker.example").tls
    for bad in ("http://broker", "mqtt://", "mqtt://user:pw@broker", "mqtt://broker:99999"):
        with pytest.raises(ConfigError, match="MQTT"):
            parse_broker_url(bad)


def _daemon_listens_for_nudges() -> bool:
    import inspect

    from slmops.agent.daemon import Agent

    return "NudgeListener" in inspect.getsource(Agent)


@pytest.mark.skipif(
    not _daemon_listens_for_nudges(), reason="agent/daemon.py does not start a NudgeListener yet (hook: HB's report)"
)
def test_the_agent_polls_at_once_when_nudged_and_at_its_interval_otherwise(
    broker: Broker,
    publisher: MqttPublisher,
    sim: object,
    agent_config: Callable[..., object],
) -> None:
    from slmops.agent.config import AgentConfig
    from slmops.agent.daemon import Agent
    from tests.agent.simulator import RunningSim, free_port

    assert isinstance(sim, RunningSim)
    sim.sim.set_desired(None, free_port())
    nudge = NudgeConfig(broker.url, DEVICE_USER, broker.passwords[DEVICE_USER], reconnect_max_s=2)
    config = agent_config(poll_interval_s=3600.0, poll_jitter=0.0, nudge=nudge)
    assert isinstance(config, AgentConfig)
    stop = threading.Event()
    with Agent(config) as agent:
        runner = threading.Thread(target=agent.run, kwargs={"stop": stop})
        runner.start()
        try:
            until(lambda: len(sim.sim.requests_to("/desired")) == 1)
            credential = agent.identities.credential()
            assert credential is not None
            time.sleep(1.0)  # connected and subscribed meanwhile
            for polls in (2, 3):
                publisher.publish(f"slmops/nudge/{nudge_token(credential)}")
                until(lambda polls=polls: len(sim.sim.requests_to("/desired")) == polls)
            time.sleep(0.5)
            assert len(sim.sim.requests_to("/desired")) == 3  # nothing else made it poll
        finally:
            stop.set()
            runner.join(timeout=30)
    assert not runner.is_alive()
