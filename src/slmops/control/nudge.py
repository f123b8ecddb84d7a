"""MQTT nudges, the control plane's side: tell a device to poll now when its desired state changed.

Optional and off by default (``SLMOPS_MQTT_URL`` unset). Polling stays the protocol; a nudge only makes a device's
next poll come sooner, so a lost nudge, a broker that is down or a device that does not listen costs latency and
nothing else. A nudge is an empty MQTT message (QoS 1, not retained) on ``<prefix>/<token>``, where ``token`` is
derived from the device's credential hash (:func:`nudge_token`; the device derives the same from its credential,
:func:`slmops.agent.nudge.nudge_token`): no new field on the wire, a topic nobody without the credential can name,
and a new one when the device claims a new credential.

**Which devices.** The :class:`Nudger` runs in one replica (it holds the ``mqtt-nudger`` lease). Every
``nudge_tick_s`` it asks the world cache (:mod:`slmops.control.desired_state`) for the current world: when its key
changed (a blueprint applied, a release started, promoted, halted, a registry or site change; seen at once when
made in this process, within ``desired_cache_ttl_s`` when made by another replica), when :meth:`Nudger.poke` was
called, and every ``nudge_rescan_s`` anyway (label changes), it walks the approved devices in batches of
``nudge_batch`` and nudges each whose desired generation differs from the ``desired_generation`` it last reported,
once per (device, generation, credential), again at a later scan when it is still behind after ``nudge_retry_s``
(a nudge it missed while it reconnected). Publishing is limited to ``nudge_rate_per_s``, which also spreads the
polls the nudges cause.

**Broker set-up (Mosquitto).** Three kinds of broker users, no anonymous access; TLS (``mqtts://``) wherever the
broker is not on loopback::

    # /etc/mosquitto/conf.d/slmops.conf
    listener 8883
    certfile /etc/mosquitto/certs/server.crt
    keyfile /etc/mosquitto/certs/server.key
    allow_anonymous false
    password_file /etc/mosquitto/slmops.passwd
    acl_file /etc/mosquitto/slmops.acl

    mosquitto_passwd -c /etc/mosquitto/slmops.passwd slmops-control   # SLMOPS_MQTT_USERNAME / _PASSWORD
    mosquitto_passwd /etc/mosquitto/slmops.passwd slmops-device       # every agent: --mqtt-username ...

    # /etc/mosquitto/slmops.acl (what mosquitto_acl() writes)
    user slmops-control
    topic write slmops/nudge/#
    pattern read slmops/nudge/%c

The control plane may only publish nudges; the shared device user may not publish at all, and each device reads
only the topic named by its client id, which the agent sets to its token: a device that subscribes to another
topic (or to ``slmops/nudge/#``) receives nothing, and naming another device's topic needs that device's
credential. Per-device broker users (``pattern read slmops/nudge/%u`` with the token as user name) work the same way
where a broker requires them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.control.db import DeviceRow
from slmops.control.desired_state import desired_state_for
from slmops.control.lease import acquire_lease, release_lease
from slmops.errors import ConfigError, MissingExtraError, SLMOpsError

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane
    from slmops.control.settings import ServerSettings

__all__ = [
    "NUDGER_LEASE",
    "MqttPublisher",
    "NudgePublisher",
    "Nudger",
    "ScanResult",
    "mosquitto_acl",
    "nudge_token",
    "start_nudger",
]

log = logging.getLogger(__name__)

NUDGER_LEASE = "mqtt-nudger"
_TOKEN_HEX = 32


def nudge_token(credential_hash: str) -> str:
    """A device's topic token from the sha256 hex of its credential (as ``devices.credential_hash`` stores it)."""
    return hashlib.sha256(f"slmops-nudge\x00{credential_hash}".encode()).hexdigest()[:_TOKEN_HEX]


def mosquitto_acl(control_user: str = "slmops-control", prefix: str = "slmops/nudge") -> str:
    """The Mosquitto ACL file of the broker set-up above: the control plane writes nudges, a device reads its own."""
    return f"user {control_user}\ntopic write {prefix}/#\n\npattern read {prefix}/%c\n"


class NudgePublisher(Protocol):
    """Where nudges go: :class:`MqttPublisher`, or a list in tests."""

    def publish(self, topic: str) -> bool:
        """Send one empty nudge; False when it could not be handed to the broker now."""
        ...

    def close(self) -> None: ...


class MqttPublisher:
    """Publishes empty QoS-1 messages through one paho client that (re)connects by itself with backoff."""

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        ca_file: os.PathLike[str] | str | None = None,
        client_id: str | None = None,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self.url = url
        self.username = username
        self.password = password
        self.ca_file = ca_file
        self.client_id = client_id or f"slmops-control-{secrets.token_hex(6)}"
        self.reconnect_max_s = reconnect_max_s
        self._client: Any = None
        self.connected = False
        self.last_error: str | None = None

    def open(self) -> MqttPublisher:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise MissingExtraError("mqtt", "MQTT nudges", "paho-mqtt") from exc
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"SLMOPS_MQTT_URL must look like mqtt://host:1883 or mqtts://host:8883; got {self.url!r}")
        tls = parts.scheme == "mqtts"
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True, protocol=mqtt.MQTTv311
        )
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if tls:
            client.tls_set(ca_certs=str(self.ca_file) if self.ca_file is not None else None)
        client.reconnect_delay_set(min_delay=1, max_delay=max(1, round(self.reconnect_max_s)))
        client.max_queued_messages_set(10_000)

        def on_connect(_client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
            if reason.is_failure:
                if self.last_error != str(reason):
                    log.error(
                        "the MQTT broker %s refused the nudger: %s; devices poll at their interval", self.url, reason
                    )
                self.connected, self.last_error = False, str(reason)
                return
            self.connected, self.last_error = True, None
            log.info("nudging devices through %s", self.url)

        def on_disconnect(_client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
            if self.connected:
                log.warning("lost the MQTT broker %s (%s); reconnecting", self.url, reason)
            self.connected = False

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.connect_async(parts.hostname, parts.port or (8883 if tls else 1883), keepalive=30)
        client.loop_start()
        self._client = client
        return self

    def publish(self, topic: str) -> bool:
        if self._client is None or not self.connected:
            return False
        info = self._client.publish(topic, b"", qos=1, retain=False)
        return bool(info.rc == 0)

    def close(self) -> None:
        client, self._client = self._client, None
        self.connected = False  # before disconnecting: a goodbye is not a lost broker
        if client is not None:
            client.disconnect()
            client.loop_stop()


@dataclass(frozen=True)
class ScanResult:
    devices: int  # approved devices looked at
    stale: int  # whose reported generation is not the desired one
    published: int  # nudges published in this scan
    unsent: int  # nudges due that the broker did not take (retried at the next scan)


class Nudger:
    """The loop that nudges devices. ``scan()`` is one pass; ``start()`` runs ``tick()`` in a thread."""

    def __init__(
        self,
        plane: ControlPlane,
        publisher: NudgePublisher,
        *,
        holder: str | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.plane = plane
        self.publisher = publisher
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._poke = threading.Event()
        self._wake = threading.Event()  # cuts the loop's wait short (poke, stop)
        self._thread: threading.Thread | None = None
        self._sent: dict[str, tuple[str, str, float]] = {}  # device id -> (generation, credential hash, when)
        self._world_key: int | None = None
        self._next_rescan = 0.0
        self._lease_until = 0.0
        self._next_publish = 0.0
        self.holds_lease = False
        self.published = 0  # nudges published by this replica, for /metrics
        self.last_scan: ScanResult | None = None

    def poke(self) -> None:
        """Look at every device at the next tick (a change made here that the world cache may not show yet)."""
        self._poke.set()
        self._wake.set()

    # ----------------------------------------------------------------------------------------------- one pass

    def tick(self) -> ScanResult | None:
        """Renew the lease; scan when the world changed, after a poke, or when a rescan is due."""
        settings = self.plane.settings
        now = time.monotonic()
        if now >= self._lease_until - settings.nudge_lease_s / 2:
            held = acquire_lease(
                self.plane.engine, NUDGER_LEASE, self.holder, settings.nudge_lease_s, self.plane.now_epoch()
            )
            if held and not self.holds_lease:
                self._world_key = None  # a new holder looks at everything once
            if not held:
                self._sent.clear()  # whoever holds it now decides; start afresh if it comes back
            self.holds_lease = held
            self._lease_until = now + settings.nudge_lease_s if held else 0.0
        if not self.holds_lease:
            return None
        world = self.plane.world_cache.current(self.plane)
        poked = self._poke.is_set()
        if world.key == self._world_key and not poked and now < self._next_rescan:
            return None
        self._poke.clear()
        self._world_key = world.key
        self._next_rescan = now + settings.nudge_rescan_s
        result = self.scan()
        self.last_scan = result
        return result

    def scan(self) -> ScanResult:
        """Walk the approved devices and nudge those whose desired generation is not the one they reported."""
        settings = self.plane.settings
        prefix = settings.mqtt_topic_prefix.rstrip("/")
        devices = stale = published = unsent = 0
        after = ""
        while not self._stop.is_set():
            with Session(self.plane.engine) as session:
                rows = session.execute(
                    select(DeviceRow.id, DeviceRow.credential_hash, DeviceRow.desired_generation)
                    .where(DeviceRow.state == "approved", DeviceRow.credential_hash.is_not(None), DeviceRow.id > after)
                    .order_by(DeviceRow.id)
                    .limit(settings.nudge_batch)
                ).all()
            if not rows:
                break
            after = rows[-1][0]
            for device_id, credential_hash, reported in rows:
                devices += 1
                if credential_hash is None:  # the query excludes these; for the type checker
                    continue
                try:
                    generation = desired_state_for(self.plane, device_id).generation
                except SLMOpsError:  # gone meanwhile, or a registry problem its poll will report
                    continue
                if generation == reported:
                    self._sent.pop(device_id, None)
                    continue
                stale += 1
                sent = self._sent.get(device_id)
                recent = sent is not None and time.monotonic() - sent[2] < settings.nudge_retry_s
                if sent is not None and recent and sent[:2] == (generation, credential_hash):
                    continue
                self._pace(settings.nudge_rate_per_s)
                if self.publisher.publish(f"{prefix}/{nudge_token(credential_hash)}"):
                    self._sent[device_id] = (generation, credential_hash, time.monotonic())
                    published += 1
                else:
                    unsent += 1
            if len(rows) < settings.nudge_batch:
                break
        self.published += published
        if published or unsent:
            log.info("nudged %d of %d devices whose desired state changed (%d unsent)", published, stale, unsent)
        return ScanResult(devices, stale, published, unsent)

    def _pace(self, rate_per_s: float) -> None:
        now = time.monotonic()
        self._next_publish = max(self._next_publish, now)
        if self._next_publish > now:
            self._sleep(self._next_publish - now)
        self._next_publish += 1.0 / rate_per_s

    # ----------------------------------------------------------------------------------------------- the loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-nudger", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.plane.settings.nudge_tick_s
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("the nudger's tick failed; retrying in %.1f s", interval)
            self._wake.wait(interval)
            self._wake.clear()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.publisher.close()
        if self.holds_lease:
            try:
                release_lease(self.plane.engine, NUDGER_LEASE, self.holder)
            except Exception:  # the lease then simply expires
                log.warning("could not hand back the nudger lease; it expires by itself")
            self.holds_lease = False


def start_nudger(plane: ControlPlane, settings: ServerSettings | None = None) -> Nudger | None:
    """The server's nudger, started, when ``mqtt_url`` is set; None otherwise (the app's lifespan calls this and
    ``stop()`` on what it returns)."""
    settings = settings or plane.settings
    if not settings.mqtt_url:
        return None
    publisher = MqttPublisher(
        settings.mqtt_url, settings.mqtt_username, settings.mqtt_password, settings.mqtt_ca_file
    ).open()
    nudger = Nudger(plane, publisher)
    nudger.start()
    return nudger
