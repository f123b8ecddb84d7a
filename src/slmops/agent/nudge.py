"""MQTT nudges, the agent's side: a subscriber that wakes the poll loop when the control plane says "poll now".

Nudges are optional (``AgentConfig.nudge``; off by default) and only ever shorten a wait: the agent still polls at
its interval, so a broker that is down, unreachable or refusing costs nothing but latency. The subscriber runs in
paho-mqtt's network thread, reconnects by itself with exponential backoff (``reconnect_min_s`` doubling up to
``reconnect_max_s``), and resubscribes after every reconnect (clean sessions: nothing is queued for an absent
device, the next poll covers what it missed).

A nudge carries **no payload**: it says only "your desired state may have changed", so a forged or replayed one
makes a device do what it does every poll interval anyway, and nothing about the device or its model crosses the
broker. The topic is ``<topic_prefix>/<token>`` with ``token = sha256("slmops-nudge\\0" + sha256(credential))``
(the first 32 hex digits): the device derives it from the credential it already has, the control plane from the
credential hash it already stores (:func:`slmops.control.nudge.nudge_token`), so the wire schema does not change,
nobody without the credential can name the topic, and the topic does not reveal the credential. A new credential
(a re-claim) gives a new topic; the subscriber follows it.

The client id is the token too, so a broker ACL ``pattern read <topic_prefix>/%c`` lets a device read its own topic
and nothing else (see :mod:`slmops.control.nudge` for the whole broker set-up).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from slmops.errors import ConfigError, MissingExtraError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = [
    "DEFAULT_TOPIC_PREFIX",
    "BrokerAddress",
    "NudgeConfig",
    "NudgeListener",
    "make_client",
    "nudge_token",
    "parse_broker_url",
    "wait_for_poll",
]

log = logging.getLogger(__name__)

DEFAULT_TOPIC_PREFIX = "slmops/nudge"
_TOKEN_HEX = 32  # 128 bits of the hash: unguessable, and short enough for any broker's client-id limit


def nudge_token(credential: str) -> str:
    """The topic token of a device credential (the control plane computes the same from the credential's hash)."""
    credential_hash = hashlib.sha256(credential.encode("utf-8")).hexdigest()
    return hashlib.sha256(f"slmops-nudge\x00{credential_hash}".encode()).hexdigest()[:_TOKEN_HEX]


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` (TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"the MQTT broker URL must look like mqtt://host:1883 or mqtts://host:8883; got {url!r}")
    if parts.username or parts.password:
        raise ConfigError(f"put the MQTT user and password in their own settings, not in the URL {parts.hostname!r}")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"the MQTT broker URL {url!r} has an invalid port") from None
    return BrokerAddress(parts.hostname, port, tls)


@dataclass(frozen=True)
class NudgeConfig:
    """Where the agent listens for nudges. The broker user may only subscribe (see :mod:`slmops.control.nudge`)."""

    url: str  # mqtt://host:1883 or mqtts://host:8883
    username: str | None = None
    password: str | None = None
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    ca_file: Path | None = None  # mqtts: the CA of the broker's certificate (default: the system's)
    keepalive_s: int = 30  # a dead connection is noticed after about 1.5 times this
    reconnect_min_s: float = 1.0  # first reconnect delay, doubled after each failure ...
    reconnect_max_s: float = 60.0  # ... up to this

    def topic(self, credential: str) -> str:
        return f"{self.topic_prefix}/{nudge_token(credential)}"


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:
        raise MissingExtraError("mqtt", "MQTT nudges", "paho-mqtt") from exc
    return mqtt


def make_client(
    client_id: str,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    address: BrokerAddress,
    reconnect_min_s: float,
    reconnect_max_s: float,
) -> mqtt.Client:
    """A paho client (MQTT 3.1.1, clean session) set up but not connected; shared by the agent, the control plane's
    publisher and the simulator."""
    paho = _paho()
    from paho.mqtt.enums import CallbackAPIVersion

    client: mqtt.Client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=paho.MQTTv311
    )
    if username is not None:
        client.username_pw_set(username, password)
    if address.tls:
        client.tls_set(ca_certs=str(ca_file) if ca_file is not None else None)
    client.reconnect_delay_set(
        min_delay=max(1, round(reconnect_min_s)), max_delay=max(1, round(max(reconnect_min_s, reconnect_max_s)))
    )
    return client


def wait_for_poll(nudges: NudgeListener | None, stop: threading.Event, timeout_s: float) -> bool:
    """The poll loop's wait: ``timeout_s``, less when ``stop`` is set or (with ``nudges``) a nudge arrives; True when
    nudged."""
    if nudges is None:
        stop.wait(timeout_s)
        return False
    return nudges.wait(stop, timeout_s)


class NudgeListener:
    """Subscribes to this device's nudge topic; :meth:`wait` is the poll loop's wait, cut short by a nudge.

    ``credential`` is read at every :meth:`wait`: before the device has one, nothing connects; when it changes,
    the listener reconnects with the new client id and topic. ``start()`` never blocks on the network.
    """

    def __init__(self, config: NudgeConfig, credential: Callable[[], str | None]) -> None:
        self.config = config
        self._credential = credential
        self._address: BrokerAddress | None = None
        self._client: mqtt.Client | None = None
        self._subscribed_for: str | None = None  # the credential the current client serves
        self._nudged = threading.Event()
        self._lock = threading.Lock()
        self.nudges = 0  # nudges received
        self.connected = False
        self.last_error: str | None = None  # why the last connection attempt or connection ended

    def start(self) -> NudgeListener:
        self._address = parse_broker_url(self.config.url)
        _paho()  # fail now, not in the loop, when the extra is missing
        self._follow_credential()
        return self

    def wait(self, stop: threading.Event, timeout_s: float) -> bool:
        """Wait up to ``timeout_s``, less when ``stop`` is set or a nudge arrives; True when nudged."""
        self._follow_credential()
        deadline = time.monotonic() + max(0.0, timeout_s)
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._nudged.wait(min(remaining, 0.25)):  # slices, so that a set ``stop`` is seen soon too
                self._nudged.clear()
                return True
        return False

    def close(self) -> None:
        with self._lock:
            client, self._client, self._subscribed_for = self._client, None, None
        self.connected = False  # before disconnecting: a goodbye is not a lost broker
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # ----------------------------------------------------------------------------------------------- internals

    def _follow_credential(self) -> None:
        credential = self._credential()
        if credential == self._subscribed_for:
            return
        self.close()
        if credential is None or self._address is None:
            return
        config = self.config
        topic = config.topic(credential)
        client = make_client(
            nudge_token(credential),
            config.username,
            config.password,
            config.ca_file,
            self._address,
            config.reconnect_min_s,
            config.reconnect_max_s,
        )

        def on_connect(client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
            if reason.is_failure:
                self.connected = False
                if self.last_error != str(reason):
                    log.warning("the MQTT broker refused the nudge subscriber: %s; polling at the interval", reason)
                self.last_error = str(reason)
                return
            self.connected, self.last_error = True, None
            client.subscribe(topic, qos=1)

        def on_disconnect(_client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
            if self.connected:  # (after a refused CONNECT, keep the refusal as the reason)
                log.info("lost the MQTT broker (%s); polling at the interval until it is back", reason)
                self.last_error = str(reason)
            self.connected = False

        def on_message(_client: Any, _userdata: Any, message: Any) -> None:
            if message.topic == topic:
                self.nudges += 1
                self._nudged.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.connect_async(self._address.host, self._address.port, keepalive=config.keepalive_s)
        client.loop_start()  # paho's thread connects, retries with backoff, reconnects
        with self._lock:
            self._client, self._subscribed_for = client, credential
