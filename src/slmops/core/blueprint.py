"""Blueprints: declarative desired state for a group of devices, written in YAML like a Kubernetes manifest.

::

    apiVersion: slmops/v1
    kind: Blueprint
    metadata:
      name: tills-berlin
    spec:
      priority: 10                       # higher wins when several blueprints match a device; then the name
      selector:
        labels: {site: berlin-3}         # every label must be equal
        min_memory_gib: 2                # or min_memory_bytes
        arch: [x86_64, aarch64]          # one of
        cpu_flags: [avx2]                # all required
        device_class: [x86_64-8gb]       # one of
      model:
        name: gemma3-270m
        ref: stable                      # an alias, a version label (v3) or a manifest digest
      variant:
        policy: {objective: best_quality, max_memory_fraction: 0.5}
        # or: pin: q8_0                  # a variant name, a version label or a digest
      runtime: {threads: 4, context_tokens: 2048, port: 8089}
      adaptations: {system_prompt: true, adapter: false}
      feedback: {mode: opt_in, sample_rate: 0.5}   # see slmops.core.feedback (off by default)
      privacy: {dp: {epsilon_per_window: 1.0, epsilon_per_day: 24}}
      local: {adapters: [lora-shop], system_prompt_max_chars: 600}   # see slmops.core.adaptation
      rollout:                           # optional: how releases move (defaults: core.rollout.RolloutPolicy)
        stages: [0.01, 0.1, 0.5, 1.0]
        soak_s: 600
        min_reporting_devices: 3
        gates:
          - {name: error-rate, metric: errors, max_increase: 0.01, critical: true}
          - {name: p95-latency, metric: latency, max_ratio: 1.25, min_samples: 100}

Parsing is strict: unknown fields are errors, and every error names the field path (``spec.selector.arch``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops.core.adaptation import LocalLimits
from slmops.core.feedback import FeedbackPolicy, PrivacyPolicy
from slmops.core.manifest import canonical_json, digest_bytes
from slmops.core.rollout import RolloutPolicy
from slmops.core.selection import VariantPolicy
from slmops.core.wire import AllowedAdaptations, Capabilities, RuntimeConfig
from slmops.errors import BlueprintError

__all__ = [
    "API_VERSION",
    "Blueprint",
    "BlueprintSpec",
    "Metadata",
    "ModelSpec",
    "PolicySpec",
    "Selector",
    "VariantSpec",
    "blueprint_from_value",
    "invalid_document",
    "load_yaml_document",
    "parse_blueprint",
    "precedence",
]

API_VERSION = "slmops/v1"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_GIB = 1 << 30
MAX_BLUEPRINT_BYTES = 256 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Selector(_Strict):
    """Which devices a blueprint is for. An empty selector matches every device."""

    labels: dict[str, str] = Field(default_factory=dict)
    min_memory_bytes: int | None = Field(default=None, ge=0)
    min_memory_gib: float | None = Field(default=None, ge=0)
    arch: list[str] | None = None
    cpu_flags: list[str] = Field(default_factory=list)
    device_class: list[str] | None = None

    @field_validator("arch", "device_class", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_memory_unit(self) -> Selector:
        if self.min_memory_bytes is not None and self.min_memory_gib is not None:
            raise ValueError("give min_memory_bytes or min_memory_gib, not both")
        return self

    @property
    def min_memory(self) -> int | None:
        if self.min_memory_gib is not None:
            return int(self.min_memory_gib * _GIB)
        return self.min_memory_bytes

    def mismatch(self, labels: dict[str, str], capabilities: Capabilities | None, device_class: str) -> str | None:
        """Why a device does not match, or None when it does."""
        for key, value in sorted(self.labels.items()):
            if labels.get(key) != value:
                return f"label {key}={labels.get(key, '<unset>')}, selector wants {value}"
        if self.device_class is not None and device_class not in self.device_class:
            return f"device class {device_class} not in {', '.join(self.device_class)}"
        needs_caps = self.min_memory is not None or self.arch is not None or self.cpu_flags
        if needs_caps and capabilities is None:
            return "the device has not reported capabilities"
        if capabilities is None:
            return None
        if self.min_memory is not None and capabilities.memory_bytes < self.min_memory:
            return f"memory {capabilities.memory_bytes:,} bytes < {self.min_memory:,}"
        if self.arch is not None and capabilities.arch not in self.arch:
            return f"arch {capabilities.arch or '<unknown>'} not in {', '.join(self.arch)}"
        missing = sorted(set(self.cpu_flags) - set(capabilities.cpu_flags))
        if missing:
            return f"missing CPU flags {', '.join(missing)}"
        return None

    def matches(self, labels: dict[str, str], capabilities: Capabilities | None, device_class: str) -> bool:
        return self.mismatch(labels, capabilities, device_class) is None


class ModelSpec(_Strict):
    name: str = Field(min_length=1, max_length=128)
    ref: str = Field(default="latest", min_length=1, max_length=80)

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.ref}"


class PolicySpec(_Strict):
    """The fields of :class:`slmops.core.selection.VariantPolicy`."""

    objective: Literal["best_quality", "smallest_within", "fastest_within"] = "best_quality"
    max_memory_fraction: float = Field(default=0.5, gt=0, le=1)
    min_decode_tokens_per_s: float | None = Field(default=None, ge=0)
    max_perplexity_increase_pct: float = Field(default=5.0, ge=0)

    def to_policy(self) -> VariantPolicy:
        return VariantPolicy(
            objective=self.objective,
            max_memory_fraction=self.max_memory_fraction,
            min_decode_tokens_per_s=self.min_decode_tokens_per_s,
            max_perplexity_increase_pct=self.max_perplexity_increase_pct,
        )


class VariantSpec(_Strict):
    """Either a pinned variant or a policy for choosing one per device; neither means the default policy."""

    pin: str | None = Field(default=None, min_length=1, max_length=128)
    policy: PolicySpec | None = None

    @model_validator(mode="after")
    def _exclusive(self) -> VariantSpec:
        if self.pin is not None and self.policy is not None:
            raise ValueError("give either pin or policy, not both")
        return self

    def effective_policy(self) -> VariantPolicy:
        return (self.policy or PolicySpec()).to_policy()


class BlueprintSpec(_Strict):
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    selector: Selector = Field(default_factory=Selector)
    model: ModelSpec
    variant: VariantSpec = Field(default_factory=VariantSpec)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    adaptations: AllowedAdaptations = Field(default_factory=AllowedAdaptations)
    rollout: RolloutPolicy | None = None  # how releases of this blueprint move; None = the defaults
    feedback: FeedbackPolicy = Field(default_factory=FeedbackPolicy)  # see slmops.core.feedback
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy)
    local: LocalLimits = Field(default_factory=LocalLimits)  # see slmops.core.adaptation


class Metadata(_Strict):
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"name {value!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
            )
        return value


class Blueprint(_Strict):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True)

    api_version: Literal["slmops/v1"] = Field(alias="apiVersion")
    kind: Literal["Blueprint"]
    metadata: Metadata
    spec: BlueprintSpec

    @property
    def name(self) -> str:
        return self.metadata.name

    def to_json_value(self) -> dict[str, Any]:
        value = self.model_dump(mode="json", by_alias=True)
        if value["spec"].get("rollout") is None:
            value["spec"].pop("rollout", None)  # absent, so blueprints written before it keep their digests
        defaults = {
            "feedback": FeedbackPolicy().model_dump(mode="json"),
            "privacy": PrivacyPolicy().model_dump(mode="json"),
            "local": LocalLimits().model_dump(mode="json"),
        }
        for key, default in defaults.items():
            if value["spec"].get(key) == default:
                value["spec"].pop(key)  # likewise for the fields added later
        return value

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of the whole blueprint: equal exactly when nothing changed."""
        return digest_bytes(canonical_json(self.to_json_value()))


def precedence(blueprint: Blueprint) -> tuple[int, str]:
    """Sort key: the first blueprint in ascending order wins (highest priority, then the smallest name)."""
    return (-blueprint.spec.priority, blueprint.name)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<document>"


def load_yaml_document(text: str, source: str, max_bytes: int, too_large: str) -> Any:
    """The value of a short YAML (or JSON) document; :class:`BlueprintError` when it is longer or not YAML.

    ``too_large`` ends the message of the size error, e.g. "a blueprint is a short file".
    """
    if len(text.encode("utf-8", errors="replace")) > max_bytes:
        raise BlueprintError(f"{source} is larger than {max_bytes // 1024} KiB; {too_large}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BlueprintError(f"{source} is not valid YAML: {exc}") from None


def invalid_document(source: str, what: str, exc: ValidationError) -> BlueprintError:
    """The error for a document that failed validation: its first five problems, each with its field path."""
    problems = []
    for error in exc.errors()[:5]:
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{_path(tuple(error['loc']))}: {message}")
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return BlueprintError(f"{source} is not a valid {what}: " + "; ".join(problems) + more)


def parse_blueprint(text: str, source: str = "blueprint") -> Blueprint:
    """Parse YAML (or JSON) text into a :class:`Blueprint`; errors name the field path."""
    value = load_yaml_document(text, source, MAX_BLUEPRINT_BYTES, "a blueprint is a short file")
    return blueprint_from_value(value, source)


def blueprint_from_value(value: Any, source: str = "blueprint") -> Blueprint:
    if not isinstance(value, dict):
        raise BlueprintError(
            f"{source} must be a mapping with apiVersion, kind, metadata and spec; got {type(value).__name__}"
        )
    if value.get("apiVersion") != API_VERSION:
        raise BlueprintError(f"{source}: apiVersion must be '{API_VERSION}', got {value.get('apiVersion')!r}")
    if value.get("kind") != "Blueprint":
        raise BlueprintError(f"{source}: kind must be 'Blueprint', got {value.get('kind')!r}")
    try:
        return Blueprint.model_validate(value)
    except ValidationError as exc:
        raise invalid_document(source, "blueprint", exc) from None
