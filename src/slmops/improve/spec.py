"""The improve recipe: which base, which dataset, how to train, which gates, what to release.

::

    name: shop-format
    model: gemma3-270m@stable          # the base: a single-file GGUF version in the registry
    dataset: shop-feedback@latest      # a curated dataset version (slmops feedback curate)
    method: lora                       # lora (an adapter over the base) | distill (a smaller full model)
    adapter: lora-shop                 # the variant name the result is registered under
    lora: {rank: 8, alpha: 16, steps: 60, learning_rate: 0.001, seed: 0}   # the lora pass's parameters
    evaluation:
      format_regex: '^Answer: .+ \\| Price: .+$'    # optional: the answer format the task wants
      max_heldout: 40
      text: builtin:eval.txt            # general perplexity text
      max_tokens: 1024
      context_tokens: 512
    gates:
      task_metric: format               # format | exact | nll: the held-out score that must improve
      min_gain: 0.1                     # candidate − parent (nll: parent − candidate, nats per token)
      max_perplexity_increase_pct: 10
      max_accuracy_drop: 0.05
      max_adapter_fraction: 0.05        # adapter bytes / base bytes
    release:                            # optional: start a staged release when every gate passes
      blueprint: shop-assistant
      policy: {stages: [0.1, 1.0], soak_s: 30}

Parsing is strict (unknown fields are errors, each naming its path).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slmops.core.blueprint import invalid_document, load_yaml_document
from slmops.core.rollout import RolloutPolicy
from slmops.errors import BlueprintError

__all__ = ["ImproveEvaluation", "ImproveGates", "ImproveRelease", "ImproveSpec", "load_improve_spec", "parse_improve"]

MAX_SPEC_BYTES = 64 * 1024
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImproveEvaluation(_Strict):
    format_regex: str | None = Field(default=None, max_length=1000)
    max_heldout: int = Field(default=50, ge=1, le=10_000)
    max_new_tokens: int = Field(default=48, ge=1, le=1024)
    text: str = "builtin:eval.txt"
    max_tokens: int = Field(default=1024, ge=64)
    context_tokens: int = Field(default=512, ge=32, le=32768)
    tasks: str | None = "builtin:tasks.jsonl"
    max_tasks: int | None = Field(default=None, gt=0)
    threads: int | None = Field(default=None, ge=1)

    @field_validator("format_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


class ImproveGates(_Strict):
    task_metric: Literal["format", "exact", "nll"] = "nll"
    min_gain: float = 0.0
    max_perplexity_increase_pct: float = Field(default=5.0, ge=0)
    max_accuracy_drop: float = Field(default=0.02, ge=0, le=1)
    max_adapter_fraction: float | None = Field(default=0.05, gt=0)


class ImproveRelease(_Strict):
    blueprint: str = Field(min_length=1, max_length=64)
    policy: RolloutPolicy | None = None


class ImproveSpec(_Strict):
    name: str
    model: str = Field(min_length=1, max_length=200)
    dataset: str = Field(min_length=1, max_length=200)
    method: Literal["lora"] = "lora"
    adapter: str | None = Field(default=None, max_length=64)
    lora: dict[str, Any] = Field(default_factory=dict)
    evaluation: ImproveEvaluation = Field(default_factory=ImproveEvaluation)
    gates: ImproveGates = Field(default_factory=ImproveGates)
    release: ImproveRelease | None = None
    base_dir: Path | None = Field(default=None, exclude=True)

    @field_validator("name", "adapter")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.match(value):
            raise ValueError(f"{value!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-'")
        return value

    @field_validator("lora")
    @classmethod
    def _no_dataset(cls, value: dict[str, Any]) -> dict[str, Any]:
        given = sorted({"dataset", "dataset_sha256"} & set(value))
        if given:
            raise ValueError(f"{', '.join(given)} come from the top-level dataset field; remove them from lora")
        return value

    @property
    def variant(self) -> str:
        return self.adapter or f"lora-{self.name}"


def parse_improve(value: Any, source: str = "improve recipe", base_dir: Path | None = None) -> ImproveSpec:
    if not isinstance(value, dict):
        raise BlueprintError(f"{source} must be a mapping with name, model and dataset; found {type(value).__name__}")
    try:
        spec = ImproveSpec.model_validate(value)
    except ValidationError as exc:
        raise invalid_document(source, "improve recipe", exc) from None
    return spec.model_copy(update={"base_dir": base_dir})


def load_improve_spec(path: Path) -> ImproveSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BlueprintError(f"cannot read the improve recipe {path}: {exc.strerror or exc}") from None
    value = load_yaml_document(text, str(path), MAX_SPEC_BYTES, "an improve recipe is a short file")
    return parse_improve(value, str(path), path.parent)
