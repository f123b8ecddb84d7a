"""MQTT nudges from the control plane, through a real Mosquitto broker set up as slmops.control.nudge documents:
which devices are nudged and when, the empty payload, broker authentication and the per-device topic ACL."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.agent.nudge import nudge_token as agent_nudge_token
from slmops.control.auth import hash_secret
from slmops.control.blueprints import apply_blueprint
from slmops.control.desired_state import desired_state_for
from slmops.control.devices import report_status
from slmops.control.enrollment import create_enrollment_token, enroll_device
from slmops.control.nudge import MqttPublisher, Nudger, nudge_token
from slmops.control.plane import ControlPlane
from slmops.core.wire import StatusReport
from tests.control.conftest import Device, GiB, register_variants
from tests.mqtt_servers import CONTROL_USER, DEVICE_USER, SIM_USER, Broker, Subscriber, refused, running_broker

BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {{name: shops}}
spec:
  selector: {{labels: {{fleet: a}}}}
  model: {{name: tiny, ref: latest}}
  variant:
    policy: {{objective: best_quality, max_memory_fraction: {fraction}}}
"""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "mosquitto") as broker:
        yield broker


def _enroll(plane: ControlPlane, memory_gib: float, labels: dict[str, str]) -> tuple[str, str]:
    """An approved device that reported the desired generation it has now; returns (device id, credential)."""
    token = create_enrollment_token(
        plane, max_uses=1, expires_in_s=None, auto_approve=True, labels=labels, created_by="test"
    ).token
    answer = enroll_device(plane, Device(Ed25519PrivateKey.generate(), int(memory_gib * GiB)).enroll_request(token))
    assert answer.credential is not None
    _report_current(plane, answer.device_id)
    return answer.device_id, answer.credential


def _report_current(plane: ControlPlane, device_id: str) -> None:
    generation = desired_state_for(plane, device_id).generation
    report_status(plane, device_id, StatusReport(phase="serving", health="ok", desired_generation=generation))


def _publisher(broker: Broker, password: str | None = None) -> MqttPublisher:
    publisher = MqttPublisher(broker.url, CONTROL_USER, password or broker.passwords[CONTROL_USER]).open()
    return publisher


def _wait_connected(publisher: MqttPublisher) -> None:
    import time

    deadline = time.monotonic() + 10
    while not publisher.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert publisher.connected, publisher.last_error


def test_the_device_and_the_control_plane_derive_the_same_topic() -> None:
    credential = "slmops_dev_" + secrets.token_urlsafe(32)
    token = agent_nudge_token(credential)
    assert token == nudge_token(hash_secret(credential))
    assert len(token) == 32 and credential not in token and hash_secret(credential) not in token
    assert agent_nudge_token(credential + "x") != token


def test_a_changed_blueprint_nudges_each_device_whose_desired_state_changed_once_with_an_empty_message(
    plane: ControlPlane, broker: Broker, tmp_path: Path
) -> None:
    # Prepare: three devices the blueprint selects (the new revision changes their desired state: the 8 GiB ones
    # get another variant, and every one another revision), one outside its selector; each reported its generation.
    register_variants(plane.registry, tmp_path)
    apply_blueprint(plane, BLUEPRINT.format(fraction=0.9), created_by="test")
    big = [_enroll(plane, 8, {"fleet": "a"}) for _ in range(2)]
    small = _enroll(plane, 2, {"fleet": "a"})
    other = _enroll(plane, 8, {"fleet": "b"})
    watcher = Subscriber(broker, SIM_USER, broker.passwords[SIM_USER], "watcher", ["slmops/nudge/#"])
    assert watcher.wait_subscribed()
    publisher = _publisher(broker)
    _wait_connected(publisher)
    nudger = Nudger(plane, publisher, holder="replica-1")
    try:
        first = nudger.tick()
        assert first is not None and (first.devices, first.stale, first.published) == (4, 0, 0)
        assert nudger.tick() is None  # nothing changed: no scan

        # Execute: a new revision (8 GiB devices now get the q8 variant; the 2 GiB one keeps q4).
        apply_blueprint(plane, BLUEPRINT.format(fraction=0.5), created_by="test")
        scan = nudger.tick()

        # Assert
        assert scan is not None and (scan.stale, scan.published, scan.unsent) == (3, 3, 0)
        got = sorted(watcher.next() for _ in range(3))
        expected = sorted((f"slmops/nudge/{agent_nudge_token(credential)}", b"") for _, credential in [*big, small])
        assert got == expected
        assert watcher.received(0.5) == []  # not the device outside the selector
        assert desired_state_for(plane, other[0]).model is None

        nudger.poke()  # a rescan before the devices fetched: they were nudged for this generation already
        again = nudger.tick()
        assert again is not None and (again.stale, again.published) == (3, 0)
        for device_id, _ in [*big, small]:
            _report_current(plane, device_id)
        nudger.poke()
        settled = nudger.tick()
        assert settled is not None and (settled.stale, settled.published) == (0, 0)
        assert watcher.received(0.3) == []
    finally:
        nudger.stop()
        watcher.close()


def test_only_the_lease_holder_nudges(plane: ControlPlane, broker: Broker, tmp_path: Path) -> None:
    register_variants(plane.registry, tmp_path)
    apply_blueprint(plane, BLUEPRINT.format(fraction=0.9), created_by="test")
    _enroll(plane, 8, {"fleet": "a"})
    first = Nudger(plane, _publisher(broker), holder="replica-1")
    second = Nudger(plane, _publisher(broker), holder="replica-2")
    try:
        assert first.tick() is not None and first.holds_lease
        assert second.tick() is None and not second.holds_lease
        first.stop()  # hands the lease back
        assert second.tick() is not None and second.holds_lease
    finally:
        first.stop()
        second.stop()


def test_a_publisher_with_a_wrong_password_is_refused_and_its_nudges_stay_due(
    plane: ControlPlane, broker: Broker, tmp_path: Path
) -> None:
    import time

    register_variants(plane.registry, tmp_path)
    apply_blueprint(plane, BLUEPRINT.format(fraction=0.9), created_by="test")
    _enroll(plane, 8, {"fleet": "a"})
    publisher = _publisher(broker, password="wrong")
    nudger = Nudger(plane, publisher, holder="replica-1")
    try:
        deadline = time.monotonic() + 10
        while publisher.last_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not publisher.connected
        assert refused(publisher.last_error)
        nudger.tick()
        apply_blueprint(plane, BLUEPRINT.format(fraction=0.5), created_by="test")
        scan = nudger.tick()
        assert scan is not None and (scan.stale, scan.published, scan.unsent) == (1, 0, 1)
    finally:
        nudger.stop()


def test_the_acl_lets_a_device_read_only_its_own_topic_and_publish_nothing(broker: Broker) -> None:
    mine, theirs = secrets.token_hex(16), secrets.token_hex(16)
    password = broker.passwords[DEVICE_USER]
    me = Subscriber(broker, DEVICE_USER, password, mine, [f"slmops/nudge/{mine}"])
    snoop = Subscriber(broker, DEVICE_USER, password, mine + "x", [f"slmops/nudge/{theirs}", "slmops/nudge/#"])
    wrong = Subscriber(broker, DEVICE_USER, "wrong", secrets.token_hex(16), ["slmops/nudge/#"])
    watcher = Subscriber(broker, SIM_USER, broker.passwords[SIM_USER], "watcher", ["slmops/nudge/#"])
    publisher = _publisher(broker)
    try:
        assert me.wait_subscribed() and snoop.wait_subscribed() and watcher.wait_subscribed()
        assert refused(wrong.wait_connected())
        _wait_connected(publisher)

        assert publisher.publish(f"slmops/nudge/{theirs}")
        assert publisher.publish(f"slmops/nudge/{mine}")
        assert me.next() == (f"slmops/nudge/{mine}", b"")
        assert snoop.received(0.5) == []  # neither the other topic nor the wildcard delivers anything
        assert sorted(t for t, _ in watcher.received(0.5)) == sorted([f"slmops/nudge/{theirs}", f"slmops/nudge/{mine}"])

        me.publish(f"slmops/nudge/{theirs}")  # a device may not nudge anyone
        assert watcher.received(0.5) == []
        assert wrong.messages.empty()
    finally:
        publisher.close()
        for client in (me, snoop, wrong, watcher):
            client.close()


def test_a_simulated_fleet_that_polls_hourly_follows_a_blueprint_change_through_nudges(
    plane: ControlPlane, broker: Broker, tmp_path: Path
) -> None:
    import threading
    import time

    from slmops.agent.nudge import NudgeConfig
    from slmops.control.app import create_app
    from slmops.core.wire import EnrollRequest
    from slmops.registry.signing import format_public_key
    from slmops.sim import BackgroundFleet, FleetRun, parse_fleet
    from tests.agent.simulator import SimServer

    # Prepare: 12 simulated devices polling once an hour, enrolled beforehand, listening for nudges.
    register_variants(plane.registry, tmp_path)
    register_variants(plane.registry, tmp_path, name="other")
    apply_blueprint(plane, BLUEPRINT.format(fraction=0.9), created_by="test")
    plane.settings = plane.settings.model_copy(update={"nudge_tick_s": 0.1, "desired_cache_ttl_s": 0.0})
    server = SimServer(create_app(plane.settings, plane)).start()
    spec = parse_fleet(
        "profiles: {box: {memory_bytes: 8589934592}}\ndevices: [{profile: box, count: 12, labels: {fleet: a}}]"
    )
    nudges = NudgeConfig(broker.url, SIM_USER, broker.passwords[SIM_USER])
    fleet = FleetRun(spec, server.url, "unused", poll_interval_s=3600, nudges=nudges)
    fleet.agents = fleet.build()
    for agent in fleet.agents:
        token = create_enrollment_token(
            plane, max_uses=1, expires_in_s=None, auto_approve=True, labels=agent.labels, created_by="test"
        ).token
        request = EnrollRequest(
            token=token,
            public_key=format_public_key(agent.key.public_key()).strip(),
            capabilities=agent.profile.capabilities(),
            labels=agent.labels,
            hostname=agent.name,
        )
        answer = enroll_device(plane, request)
        assert answer.credential is not None
        agent.provision(answer.device_id, answer.credential)
    background = BackgroundFleet(fleet)
    background.start()
    nudger = Nudger(plane, _publisher(broker), holder="replica-1")

    def on_desired(timeout_s: float = 30) -> str:
        """Wait until every agent runs its desired version; returns it (the same for all: one profile)."""
        model = desired_state_for(plane, str(fleet.agents[0].device_id)).model
        assert model is not None
        digest = model.digest
        deadline = time.monotonic() + timeout_s
        while not all(a.active_digest == digest for a in fleet.agents):
            assert time.monotonic() < deadline, (nudger.last_scan, [a.active_digest for a in fleet.agents])
            time.sleep(0.1)
        return digest

    try:
        deadline = time.monotonic() + 10  # every agent subscribed before the first nudge goes out
        while not (fleet.agents[0].nudges is not None and fleet.agents[0].nudges.connected):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)

        # Execute: the nudger starts (every device is behind: it never fetched), then the blueprint changes.
        nudger.start()
        first = on_desired()
        apply_blueprint(plane, BLUEPRINT.format(fraction=0.9).replace("name: tiny", "name: other"), created_by="test")

        # Assert: both within seconds, not an hour.
        assert on_desired() != first
        assert sum(a.counters["nudged_polls"] for a in fleet.agents) >= 2 * len(fleet.agents)
    finally:
        nudger.stop()
        summary = background.stop()
        server.stop()
    assert summary.errors == {}
    assert not any(t.name.startswith("paho-mqtt") for t in threading.enumerate())  # broker clients closed
