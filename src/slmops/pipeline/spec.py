"""The pipeline file: which model, how to optimize it, which device classes, which gates, what to release.

::

    name: shop-ci
    source: gemma3-270m@v1            # a registry reference, or {gguf: model.gguf, name: gemma3-270m}
    optimize:                         # an optimize recipe without name and source (slmops.optimize.recipe),
      evaluation: {max_tokens: 1024}  # or a path to one: optimize: recipes/default.yaml
      variants:
        - name: q8_0
          passes: [{quantize: {type: Q8_0}}]
    baseline: {ref: gemma3-270m@stable}   # the current stable version; or {blueprint: shop-assistant} (the version
                                          # its release currently serves; needs --server); default: the source
    gates:                            # defaults for every class; a class may override any of them
      max_perplexity_increase_pct: 5
      max_accuracy_drop: 0.02
      ram_share: 0.5                  # peak memory within this share of the class's RAM
      min_decode_tokens_per_s: 5      # measured in the test matrix, on that class's limits
    classes:
      - name: x86_64-2gb              # a class name as slmops.core.device_class makes them
        profile: gateway-2gb          # memory and threads from slmops.core.device_profiles, or give them:
        # memory_mib: 2048, cores: 2, threads: 2
        disk_mib: 1024                # the agent's data directory is a filesystem of this size
        blueprint: shop-gateway       # release target for this class (default: release.blueprint)
        gates: {min_decode_tokens_per_s: 2}
    matrix:
      prompts: ["Say hello.", "What is 2+2?"]
      max_tokens: 16
      timeout_s: 300
    release:                          # optional: what to release when a class passes
      blueprint: shop-assistant
      tag: candidate                  # alias set on each released variant: candidate-<class>
      policy: {stages: [0.1, 1.0], soak_s: 600}

Parsing is strict: unknown fields are errors, and every error names its field path (``classes[1].gates.ram_share``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops.core.blueprint import invalid_document, load_yaml_document
from slmops.core.device_profiles import DEVICE_PROFILES
from slmops.core.rollout import RolloutPolicy
from slmops.errors import BlueprintError

__all__ = [
    "ClassGates",
    "DeviceClassSpec",
    "GGUFSource",
    "MatrixSpec",
    "PipelineBaseline",
    "PipelineRelease",
    "PipelineSpec",
    "load_pipeline",
    "parse_pipeline",
]

MAX_PIPELINE_BYTES = 64 * 1024
MIB = 1 << 20
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_PROMPTS = (
    "Say hello to the shop.",
    "List three colours.",
    "What is the capital of France?",
)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"{value!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-'")
    return value


class GGUFSource(_Strict):
    gguf: str = Field(min_length=1, description="a GGUF file, relative to the pipeline file")
    name: str = Field(min_length=1, max_length=128, description="the model name it is imported under")


class ClassGates(_Strict):
    """Limits one class must meet; ``None`` leaves a gate off (and the report says it was skipped)."""

    max_perplexity_increase_pct: float | None = Field(default=None, ge=0)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    ram_share: float | None = Field(default=None, gt=0, le=1)
    min_decode_tokens_per_s: float | None = Field(default=None, ge=0)

    def over(self, defaults: ClassGates) -> ClassGates:
        """These gates, each unset one taken from ``defaults``."""
        merged = {k: v if v is not None else getattr(defaults, k) for k, v in self.model_dump().items()}
        return ClassGates(**merged)


DEFAULT_GATES = ClassGates(max_perplexity_increase_pct=5.0, max_accuracy_drop=0.02, ram_share=0.5)


class DeviceClassSpec(_Strict):
    name: str
    profile: str | None = None
    memory_mib: int | None = Field(default=None, ge=16)
    cores: int | None = Field(default=None, ge=1, le=1024)
    threads: int | None = Field(default=None, ge=1, le=1024)
    disk_mib: int | None = Field(default=None, ge=16)
    blueprint: str | None = Field(default=None, min_length=1, max_length=64)
    gates: ClassGates = Field(default_factory=ClassGates)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _name(value)

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str | None) -> str | None:
        if value is not None and value not in DEVICE_PROFILES:
            raise ValueError(f"unknown device profile {value!r}; known: {', '.join(sorted(DEVICE_PROFILES))}")
        return value

    @model_validator(mode="after")
    def _sized(self) -> DeviceClassSpec:
        if self.profile is None and self.memory_mib is None:
            raise ValueError("give a profile (slmops.core.device_profiles) or memory_mib")
        return self

    @property
    def memory_bytes(self) -> int:
        if self.memory_mib is not None:
            return self.memory_mib * MIB
        assert self.profile is not None
        return DEVICE_PROFILES[self.profile].memory_bytes

    @property
    def thread_count(self) -> int:
        if self.threads is not None:
            return self.threads
        if self.profile is not None:
            return DEVICE_PROFILES[self.profile].threads
        return self.cores or 1

    @property
    def core_count(self) -> int:
        return self.cores or self.thread_count


class MatrixSpec(_Strict):
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1, max_length=100)
    max_tokens: int = Field(default=16, ge=1, le=1024)
    context_tokens: int = Field(default=256, ge=32, le=32768)
    timeout_s: float = Field(default=300.0, gt=0, le=7200)
    enabled: bool = True


class PipelineBaseline(_Strict):
    ref: str | None = Field(default=None, min_length=1, max_length=200)
    blueprint: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one(self) -> PipelineBaseline:
        if (self.ref is None) == (self.blueprint is None):
            raise ValueError("give exactly one of ref (a registry reference) or blueprint (a blueprint's name)")
        return self


class PipelineRelease(_Strict):
    blueprint: str | None = Field(default=None, min_length=1, max_length=64)
    tag: str | None = Field(default="candidate", max_length=40)
    policy: RolloutPolicy | None = None

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[a-z][a-z0-9._-]{0,39}$", value):
            raise ValueError(f"tag {value!r} must start with a letter and be a-z, 0-9, '.', '_' or '-'")
        return value


class PipelineSpec(_Strict):
    name: str
    source: str | GGUFSource
    optimize: str | dict[str, Any]
    baseline: PipelineBaseline | None = None
    gates: ClassGates = DEFAULT_GATES
    classes: list[DeviceClassSpec] = Field(min_length=1, max_length=32)
    matrix: MatrixSpec = Field(default_factory=MatrixSpec)
    release: PipelineRelease | None = None
    base_dir: Path | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _name(value)

    @field_validator("optimize")
    @classmethod
    def _no_source(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, dict):
            given = sorted({"name", "source"} & set(value))
            if given:
                raise ValueError(f"{', '.join(given)} come from the pipeline's name and source; remove them")
            if "variants" not in value:
                raise ValueError("an inline recipe needs variants (see slmops.optimize.recipe)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        names = [c.name for c in self.classes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"class names must be unique; repeated: {', '.join(repeated)}")
        if self.release is not None and self.release.blueprint is None:
            missing = [c.name for c in self.classes if c.blueprint is None]
            if missing:
                raise ValueError(
                    f"release has no blueprint and classes {', '.join(missing)} name none; "
                    "set release.blueprint or classes[].blueprint"
                )
        return self

    def class_gates(self, device_class: DeviceClassSpec) -> ClassGates:
        return device_class.gates.over(self.gates)

    def class_blueprint(self, device_class: DeviceClassSpec) -> str | None:
        if self.release is None:
            return None
        return device_class.blueprint or self.release.blueprint

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() or self.base_dir is None else self.base_dir / path


def parse_pipeline(value: Any, source: str = "pipeline file", base_dir: Path | None = None) -> PipelineSpec:
    if not isinstance(value, dict):
        raise BlueprintError(
            f"{source} must be a mapping with name, source, optimize and classes; found {type(value).__name__}"
        )
    try:
        spec = PipelineSpec.model_validate(value)
    except ValidationError as exc:
        raise invalid_document(source, "pipeline file", exc) from None
    return spec.model_copy(update={"base_dir": base_dir})


def load_pipeline(path: Path) -> PipelineSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BlueprintError(f"cannot read the pipeline file {path}: {exc.strerror or exc}") from None
    value = load_yaml_document(text, str(path), MAX_PIPELINE_BYTES, "a pipeline file is a short file")
    return parse_pipeline(value, str(path), path.resolve().parent)
