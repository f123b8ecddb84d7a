"""MQTT nudges for a simulated fleet: one broker connection for every :class:`~slmops.sim.agent.SimAgent`.

A real device holds one connection as the shared device user and may read only its own topic (client id = token,
see :mod:`slmops.control.nudge`). A thousand connections from one simulator process would measure the simulator,
so :class:`FleetNudges` connects once as a broker user that may read ``<prefix>/#`` (the test broker's
``slmops-sim``; never give a real device such a user), subscribes to each agent's topic
(:func:`slmops.agent.nudge.nudge_token` of its credential) and wakes that agent's poll loop in the fleet's event
loop. The topics and the empty payload are the real ones, so the control plane cannot tell the difference.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from typing import TYPE_CHECKING, Any

from slmops.agent.nudge import NudgeConfig, make_client, nudge_token, parse_broker_url

if TYPE_CHECKING:
    from slmops.sim.agent import SimAgent

__all__ = ["FleetNudges"]

log = logging.getLogger(__name__)

_SUBSCRIBE_CHUNK = 200  # topics per SUBSCRIBE packet


class FleetNudges:
    """Nudges for many simulated agents through one MQTT client (paho's network thread)."""

    def __init__(self, config: NudgeConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self._agents: dict[str, SimAgent] = {}  # topic -> agent
        self._lock = threading.Lock()
        self._client: Any = None
        self.connected = False
        self.received = 0
        self.last_error: str | None = None

    def open(self) -> FleetNudges:
        config = self.config
        address = parse_broker_url(config.url)
        client = make_client(
            f"slmops-sim-{secrets.token_hex(6)}",
            config.username,
            config.password,
            config.ca_file,
            address,
            config.reconnect_min_s,
            config.reconnect_max_s,
        )

        def on_connect(client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
            if reason.is_failure:
                self.connected, self.last_error = False, str(reason)
                log.warning("the MQTT broker refused the simulator: %s", reason)
                return
            self.connected, self.last_error = True, None
            with self._lock:
                topics = list(self._agents)
            for start in range(0, len(topics), _SUBSCRIBE_CHUNK):  # clean session: subscribe again each time
                client.subscribe([(t, 1) for t in topics[start : start + _SUBSCRIBE_CHUNK]])

        def on_disconnect(_client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
            self.connected = False

        def on_message(_client: Any, _userdata: Any, message: Any) -> None:
            with self._lock:
                agent = self._agents.get(message.topic)
            if agent is not None:
                self.received += 1
                self.loop.call_soon_threadsafe(agent.nudge)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.connect_async(address.host, address.port, keepalive=config.keepalive_s)
        client.loop_start()
        self._client = client
        return self

    def watch(self, agent: SimAgent) -> None:
        """Subscribe for ``agent`` (once it has its credential)."""
        if agent.credential is None:
            return
        topic = f"{self.config.topic_prefix}/{nudge_token(agent.credential)}"
        with self._lock:
            self._agents[topic] = agent
        if self._client is not None and self.connected:
            self._client.subscribe(topic, qos=1)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self.connected = False
