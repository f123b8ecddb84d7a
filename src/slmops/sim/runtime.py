"""A simulated inference runtime: latency and errors as a function of (device class, model version).

Nothing is loaded or generated. Each (profile, version digest) pair has a :class:`Behaviour` — mean latency and
error probability — made from the profile's ``speed_factor`` and the matching :class:`RuntimeOverride` entries,
so a version can be made slow or failing on one device class only. Samples come from a RNG seeded from
``(seed, device, digest, window)``: the same seed gives the same numbers on every run and machine.

Drift: each simulated request also has a :class:`~slmops.telemetry.drift.RequestSummary` drawn from stable
distributions (:class:`TrafficShape`: log-normal prompt and completion lengths, a normal prompt NLL scored on a
sampled fraction of requests, a small empty-output rate), from its own RNG so latencies and errors do not change.
A :class:`DriftShift` multiplies the prompt-length median or the NLL mean of one profile (and optionally one
version) from ``after_s`` seconds after the fleet started.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slmops.sim.profiles import DeviceProfile
from slmops.telemetry.drift import RequestSummary

__all__ = ["Behaviour", "DriftShift", "RuntimeOverride", "RuntimeSample", "SimulatedRuntime", "TrafficShape"]

ShiftedSignal = Literal["prompt_tokens", "prompt_nll"]


class DriftShift(BaseModel):
    """From ``after_s`` seconds after the fleet started, multiply the simulated ``signal`` by ``factor`` on the
    profile named ``profile`` (all profiles when None) for versions whose digest starts with ``version``:
    ``prompt_tokens`` scales the prompt-length median, ``prompt_nll`` the mean prompt NLL (and its spread)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str | None = None
    version: str = ""  # a manifest digest ("sha256:...") or a prefix of one; "" = every version
    after_s: float = Field(default=0.0, ge=0)
    signal: ShiftedSignal
    factor: float = Field(gt=0, le=1000)

    def applies(self, profile: str, digest: str, elapsed_s: float) -> bool:
        return (
            (self.profile is None or self.profile == profile)
            and digest.startswith(self.version)
            and (elapsed_s >= self.after_s)
        )


class TrafficShape(BaseModel):
    """The stable distributions of simulated requests: log-normal prompt and completion token counts (median and
    sigma of the log), completions cut at ``max_completion_tokens`` (finish reason "length"), a normal prompt NLL
    (nats per token) measured on ``prompt_nll_sample_rate`` of the requests, and an empty-output probability."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens_median: float = Field(default=120.0, gt=0)
    prompt_tokens_sigma: float = Field(default=0.6, ge=0, le=5)
    completion_tokens_median: float = Field(default=32.0, gt=0)
    completion_tokens_sigma: float = Field(default=0.5, ge=0, le=5)
    max_completion_tokens: int = Field(default=256, ge=1)
    prompt_nll_mean: float = Field(default=3.2, gt=0, le=50)
    prompt_nll_sd: float = Field(default=0.5, ge=0, le=20)
    prompt_nll_sample_rate: float = Field(default=1.0, ge=0, le=1)
    empty_output_rate: float = Field(default=0.01, ge=0, le=1)


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
        traffic: TrafficShape | None = None,
        drift: tuple[DriftShift, ...] = (),
    ) -> None:
        self.seed = seed
        self.overrides = overrides
        self.base_latency_ms = base_latency_ms
        self.base_error_rate = base_error_rate
        self.traffic = traffic or TrafficShape()
        self.drift = drift

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

    def summaries(
        self, profile: DeviceProfile, device: str, digest: str, window: int, sample: RuntimeSample, elapsed_s: float
    ) -> tuple[RequestSummary, ...]:
        """What each request of ``sample`` looked like, for the window's drift summary: its first ``errors``
        requests failed (no completion), the others drawn from :attr:`traffic`, shifted by every
        :class:`DriftShift` that applies ``elapsed_s`` seconds after the fleet started."""
        shape = self.traffic
        prompt_factor = nll_factor = 1.0
        for shift in self.drift:
            if shift.applies(profile.name, digest, elapsed_s):
                if shift.signal == "prompt_tokens":
                    prompt_factor *= shift.factor
                else:
                    nll_factor *= shift.factor
        rng = random.Random(f"{self.seed}:{device}:{digest}:{window}:drift")
        prompt_mu = math.log(shape.prompt_tokens_median * prompt_factor)
        completion_mu = math.log(shape.completion_tokens_median)
        result = []
        for i in range(sample.requests):
            prompt = max(1, round(rng.lognormvariate(prompt_mu, shape.prompt_tokens_sigma)))
            completion = max(1, round(rng.lognormvariate(completion_mu, shape.completion_tokens_sigma)))
            nll: float | None = None
            if rng.random() < shape.prompt_nll_sample_rate:
                nll = max(0.01, rng.gauss(shape.prompt_nll_mean * nll_factor, shape.prompt_nll_sd * nll_factor))
            if i < sample.errors:
                result.append(RequestSummary(prompt, 0, "error", nll))
                continue
            finish = "length" if completion >= shape.max_completion_tokens else "stop"
            empty = rng.random() < shape.empty_output_rate
            result.append(
                RequestSummary(prompt, min(completion, shape.max_completion_tokens), finish, nll, empty=empty)
            )
        return tuple(result)

    def probe_passes(self, profile: DeviceProfile, device: str, digest: str, requests: int = 20) -> bool:
        """The activation probe a simulated agent runs: it fails when more than a quarter of the requests fail."""
        sample = self.sample(profile, device, digest, window=0, requests=requests)
        return sample.errors * 4 <= sample.requests
