"""A simulated inference runtime: latency and errors as a function of (device class, model version).

Nothing is loaded or generated. Each (profile, version digest) pair has a :class:`Behaviour` — mean latency and
error probability — made from the profile's ``speed_factor`` and the matching :class:`RuntimeOverride` entries,
so a version can be made slow or failing on one device class only. Samples come from a RNG seeded from
``(seed, device, digest, window)``: the same seed gives the same numbers on every run and machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from slmops.sim.profiles import DeviceProfile

__all__ = ["Behaviour", "RuntimeOverride", "RuntimeSample", "SimulatedRuntime"]


class RuntimeOverride(BaseModel):
    """Change the behaviour of versions whose digest starts with ``version`` (all versions when empty), on the
    profile named ``profile`` (all profiles when None)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str | None = None
    version: str = ""  # a manifest digest ("sha256:...") or a prefix of one
    latency_factor: float = Field(default=1.0, gt=0)
    error_rate: float | None = Field(default=None, ge=0, le=1)
    activation_failure_rate: float | None = Field(default=None, ge=0, le=1)

    def matches(self, profile: str, digest: str) -> bool:
        return (self.profile is None or self.profile == profile) and digest.startswith(self.version)


@dataclass(frozen=True)
class Behaviour:
    latency_ms: float  # mean latency of one request
    error_rate: float  # probability that one request fails
    activation_failure_rate: float  # probability that starting this version fails on the device


@dataclass(frozen=True)
class RuntimeSample:
    requests: int
    errors: int
    latencies_ms: tuple[float, ...]


class SimulatedRuntime:
    """Behaviours and deterministic samples for simulated devices."""

    def __init__(
        self,
        seed: int = 0,
        overrides: tuple[RuntimeOverride, ...] = (),
        base_latency_ms: float = 200.0,
        base_error_rate: float = 0.001,
    ) -> None:
        self.seed = seed
        self.overrides = overrides
        self.base_latency_ms = base_latency_ms
        self.base_error_rate = base_error_rate

    def behaviour(self, profile: DeviceProfile, digest: str) -> Behaviour:
        """How ``digest`` behaves on a device of ``profile``; later overrides win over earlier ones."""
        latency = self.base_latency_ms * profile.speed_factor
        error_rate = self.base_error_rate
        activation_failure = profile.failure_rate
        for override in self.overrides:
            if override.matches(profile.name, digest):
                latency *= override.latency_factor
                if override.error_rate is not None:
                    error_rate = override.error_rate
                if override.activation_failure_rate is not None:
                    activation_failure = override.activation_failure_rate
        return Behaviour(latency_ms=latency, error_rate=error_rate, activation_failure_rate=activation_failure)

    def rng(self, device: str, digest: str, window: int) -> random.Random:
        """A RNG that depends only on the seed and its arguments (string seeds hash with SHA-512)."""
        return random.Random(f"{self.seed}:{device}:{digest}:{window}")

    def activation_fails(self, profile: DeviceProfile, device: str, digest: str, attempt: int = 0) -> bool:
        """Whether activating ``digest`` on this device fails on this attempt."""
        rate = self.behaviour(profile, digest).activation_failure_rate
        return self.rng(device, digest, -1 - attempt).random() < rate

    def sample(self, profile: DeviceProfile, device: str, digest: str, window: int, requests: int) -> RuntimeSample:
        """``requests`` simulated requests in one window: log-normal latencies around the mean, Bernoulli errors."""
        behaviour = self.behaviour(profile, digest)
        rng = self.rng(device, digest, window)
        sigma = 0.3
        mu = math.log(behaviour.latency_ms) - sigma * sigma / 2  # so the mean is latency_ms
        latencies = tuple(rng.lognormvariate(mu, sigma) for _ in range(requests))
        errors = sum(1 for _ in range(requests) if rng.random() < behaviour.error_rate)
        return RuntimeSample(requests=requests, errors=errors, latencies_ms=latencies)

    def probe_passes(self, profile: DeviceProfile, device: str, digest: str, requests: int = 20) -> bool:
        """The activation probe a simulated agent runs: it fails when more than a quarter of the requests fail."""
        sample = self.sample(profile, device, digest, window=0, requests=requests)
        return sample.errors * 4 <= sample.requests
