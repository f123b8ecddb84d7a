"""Fleet YAML, profiles and the simulated runtime: pure values, no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.core.device_class import device_class
from slmops.errors import BlueprintError
from slmops.sim import BUILTIN_PROFILES, RuntimeOverride, SimulatedRuntime, load_fleet, parse_fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"


def test_the_example_fleet_parses_with_a_custom_profile() -> None:
    spec = load_fleet(EXAMPLE)

    assert spec.device_count == 1000
    profiles = spec.all_profiles()
    assert profiles["kiosk-4gb"].name == "kiosk-4gb" and profiles["kiosk-4gb"].speed_factor == 3.0
    assert device_class(profiles["kiosk-4gb"].capabilities()) == "aarch64-4gb"
    assert spec.devices[0].labels == {"site": "lab", "ring": "edge"}


def test_a_bare_list_is_a_fleet() -> None:
    spec = parse_fleet("- {profile: pi-2gb, count: 3}\n- {profile: till-8gb, count: 2, labels: {a: b}}\n")

    assert [(g.profile, g.count) for g in spec.devices] == [("pi-2gb", 3), ("till-8gb", 2)]
    assert spec.poll_interval_s == 5.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("devices: [{profile: nope, count: 1}]", "unknown profile 'nope'; known profiles: pi-2gb"),
        ("devices: [{profile: pi-2gb, count: 0}]", "devices[0].count: Input should be greater than or equal to 1"),
        ("devices: [{profile: pi-2gb, count: 1, colour: red}]", "devices[0].colour: Extra inputs are not permitted"),
        ("devices: []", "devices: "),
        ("42", "must be a list of {profile, count, labels} or a mapping with 'devices'; got int"),
        ("devices: [", "is not valid YAML"),
        ("profiles: {x: {memory_bytes: -1}}\ndevices: [{profile: x, count: 1}]", "profiles.x.memory_bytes"),
        (
            "devices: [{profile: pi-2gb, count: 1}]\nruntime: {overrides: [{profile: ghost}]}",
            "runtime override names unknown profile 'ghost'",
        ),
    ],
)
def test_bad_fleets_say_where_and_why(text: str, expected: str) -> None:
    with pytest.raises(BlueprintError, match="fleet") as info:
        parse_fleet(text, "fleet.yaml")

    assert expected in str(info.value)


def test_a_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BlueprintError, match=r"cannot read fleet file .*check the path"):
        load_fleet(tmp_path / "absent.yaml")


def test_the_runtime_is_deterministic_per_seed() -> None:
    pi = BUILTIN_PROFILES["pi-2gb"]
    digest = "sha256:" + "ab" * 32

    first = SimulatedRuntime(seed=1).sample(pi, "pi-2gb-1", digest, window=3, requests=50)
    again = SimulatedRuntime(seed=1).sample(pi, "pi-2gb-1", digest, window=3, requests=50)
    other = SimulatedRuntime(seed=2).sample(pi, "pi-2gb-1", digest, window=3, requests=50)

    assert first == again
    assert first.latencies_ms != other.latencies_ms
    assert len(first.latencies_ms) == first.requests == 50


def test_a_version_can_be_bad_on_one_class_only() -> None:
    bad, good = "sha256:" + "0b" * 32, "sha256:" + "60" * 32
    runtime = SimulatedRuntime(
        seed=3, overrides=(RuntimeOverride(profile="pi-2gb", version="sha256:0b0b", latency_factor=3, error_rate=0.8),)
    )
    pi, till = BUILTIN_PROFILES["pi-2gb"], BUILTIN_PROFILES["till-8gb"]

    assert runtime.behaviour(pi, bad).error_rate == 0.8
    assert runtime.behaviour(pi, bad).latency_ms == 3 * runtime.behaviour(pi, good).latency_ms
    assert runtime.behaviour(till, bad) == runtime.behaviour(till, good)
    pis = [f"pi-2gb-{i}" for i in range(100)]
    tills = [f"till-8gb-{i}" for i in range(100)]
    assert not any(runtime.probe_passes(pi, name, bad) for name in pis)
    assert all(runtime.probe_passes(pi, name, good) for name in pis)
    assert all(runtime.probe_passes(till, name, bad) for name in tills)
    mean = sum(runtime.sample(till, "t", bad, 0, 2000).latencies_ms) / 2000
    assert mean == pytest.approx(runtime.behaviour(till, bad).latency_ms, rel=0.05)


def test_activation_failures_follow_the_profile_rate() -> None:
    runtime = SimulatedRuntime(seed=5)
    flaky = BUILTIN_PROFILES["pi-2gb"].model_copy(update={"failure_rate": 0.2})
    digest = "sha256:" + "cd" * 32

    failures = sum(runtime.activation_fails(flaky, f"d{i}", digest) for i in range(2000))

    assert 300 < failures < 500
    assert not any(runtime.activation_fails(BUILTIN_PROFILES["workstation-16gb"], f"d{i}", digest) for i in range(500))


def test_a_fleet_file_over_the_size_limit_is_refused_before_parsing() -> None:
    text = "devices: [{profile: pi-2gb, count: 1}]\n" + "#" * (1 << 20)

    with pytest.raises(BlueprintError, match=r"fleet.yaml is larger than 1024 KiB; a fleet file is short"):
        parse_fleet(text, "fleet.yaml")
