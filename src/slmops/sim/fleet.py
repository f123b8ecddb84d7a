"""The fleet YAML: which simulated devices to run, how many of each profile, with which labels.

Either a list of groups::

    - {profile: pi-2gb, count: 300, labels: {site: lab}}
    - {profile: till-8gb, count: 400}

or a mapping with ``devices`` (that list) and optional ``profiles`` (extra or replaced profiles, by name),
``runtime`` (overrides that make a version slow or failing on some profiles; the shape of the simulated traffic
and drift shifts of it), ``seed`` and ``poll_interval_s``. See ``examples/fleet.yaml``. A drift shift doubles the
prompt-length median on one class ten minutes into the run::

    runtime:
      traffic: {prompt_tokens_median: 120, prompt_nll_mean: 3.2, prompt_nll_sample_rate: 0.25}
      drift:
        - {profile: pi-2gb, after_s: 600, signal: prompt_tokens, factor: 2.0}
        - {profile: till-8gb, version: "sha256:ab12", after_s: 300, signal: prompt_nll, factor: 1.3}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slmops.core.blueprint import invalid_document, load_yaml_document
from slmops.errors import BlueprintError
from slmops.sim.profiles import BUILTIN_PROFILES, DeviceProfile
from slmops.sim.runtime import DriftShift, RuntimeOverride, TrafficShape

__all__ = ["DeviceGroup", "FleetSpec", "RuntimeSpec", "load_fleet", "parse_fleet"]

MAX_FLEET_BYTES = 1 << 20
MAX_DEVICES = 200_000


class DeviceGroup(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str = Field(min_length=1)
    count: int = Field(ge=1, le=MAX_DEVICES)
    labels: dict[str, str] = Field(default_factory=dict)


class RuntimeSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base_latency_ms: float = Field(default=200.0, gt=0)
    base_error_rate: float = Field(default=0.001, ge=0, le=1)
    overrides: tuple[RuntimeOverride, ...] = ()
    requests_per_window: int = Field(default=20, ge=0, le=100_000)  # simulated requests per telemetry window
    telemetry_window_s: float = Field(default=10.0, gt=0)  # a window closes at the first poll after this long
    traffic: TrafficShape = Field(default_factory=TrafficShape)  # distributions of the simulated requests
    drift: tuple[DriftShift, ...] = ()  # shifts of those distributions on some profiles, after a time


class FleetSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    devices: tuple[DeviceGroup, ...] = Field(min_length=1)
    profiles: dict[str, DeviceProfile] = Field(default_factory=dict)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    seed: int = 0
    poll_interval_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _name_profiles(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("profiles"), dict):
            named = {}
            for name, body in value["profiles"].items():
                named[name] = {"name": name, **body} if isinstance(body, dict) else body
            value = {**value, "profiles": named}
        return value

    @model_validator(mode="after")
    def _known_profiles(self) -> FleetSpec:
        known = self.all_profiles()
        for group in self.devices:
            if group.profile not in known:
                raise ValueError(
                    f"unknown profile {group.profile!r}; known profiles: {', '.join(sorted(known))} "
                    "(define it under 'profiles:')"
                )
        for override in self.runtime.overrides:
            if override.profile is not None and override.profile not in known:
                raise ValueError(f"runtime override names unknown profile {override.profile!r}")
        for shift in self.runtime.drift:
            if shift.profile is not None and shift.profile not in known:
                raise ValueError(
                    f"runtime drift names unknown profile {shift.profile!r}; known profiles: {', '.join(sorted(known))}"
                )
        total = sum(g.count for g in self.devices)
        if total > MAX_DEVICES:
            raise ValueError(f"at most {MAX_DEVICES} devices per fleet, got {total}")
        return self

    def all_profiles(self) -> dict[str, DeviceProfile]:
        return {**BUILTIN_PROFILES, **self.profiles}

    @property
    def device_count(self) -> int:
        return sum(g.count for g in self.devices)


def parse_fleet(text: str, source: str = "fleet") -> FleetSpec:
    """Parse fleet YAML the way blueprints are parsed; errors name the field path and raise :class:`BlueprintError`."""
    value = load_yaml_document(text, source, MAX_FLEET_BYTES, "a fleet file is short")
    if isinstance(value, list):
        value = {"devices": value}
    if not isinstance(value, dict):
        raise BlueprintError(
            f"{source} must be a list of {{profile, count, labels}} or a mapping with 'devices'; "
            f"got {type(value).__name__} (see examples/fleet.yaml)"
        )
    try:
        return FleetSpec.model_validate(value)
    except ValidationError as exc:
        raise invalid_document(source, "fleet", exc) from None


def load_fleet(path: Path) -> FleetSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BlueprintError(f"cannot read fleet file {path}: {exc.strerror}; check the path") from None
    return parse_fleet(text, str(path))
