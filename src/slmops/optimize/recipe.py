"""Optimization recipes: a source model, variants made of pass chains, and how to evaluate them.

::

    name: default
    source: gemma3-270m            # a model reference: NAME, NAME@v2, NAME@stable, NAME@sha256:...
    output_name: gemma3-270m       # optional: register the variants under this name (default: the source's)
    evaluation:
      text: builtin:eval.txt       # or a path, relative to the recipe file
      max_tokens: 1536             # tokens of the text that are used
      context_tokens: 512          # perplexity chunk length; also the context of the speed measurement
      tasks: builtin:tasks.jsonl   # multiple-choice set; null to skip accuracy
      max_tasks: null              # use only the first N items
      device_profiles: [gateway-2gb, pi5-8gb, laptop-16gb]
    variants:
      - name: f16
        passes:
          - dequantize: {}
      - name: q4_k_m-imat
        passes:
          - dequantize: {}
          - quantize: {type: Q4_K_M, imatrix: {}}

A step is written ``{PASS: {params}}`` or ``{pass: PASS, params: {params}}``. Every pass name and parameter is
checked when the recipe is loaded, before any work starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops.core.device_profiles import DEVICE_PROFILES
from slmops.errors import BlueprintError

__all__ = ["EvaluationSpec", "Recipe", "StepSpec", "VariantSpec", "load_recipe", "parse_recipe"]

_VARIANT_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StepSpec(_Strict):
    pass_name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"pass_name": value}
        if isinstance(value, dict) and "pass_name" in value:
            return value
        if isinstance(value, dict) and "pass" in value:
            rest = {k: v for k, v in value.items() if k != "pass"}
            return {"pass_name": value["pass"], **rest}
        if isinstance(value, dict) and len(value) == 1:
            (name, params), *_ = value.items()
            return {"pass_name": name, "params": params if params is not None else {}}
        raise ValueError("a step is {PASS: {params}} or {pass: PASS, params: {params}}")


class VariantSpec(_Strict):
    name: str
    passes: list[StepSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _VARIANT_RE.match(value):
            raise ValueError(f"variant name {value!r} must be 1-64 characters of a-z, 0-9, '.', '_', '+' or '-'")
        return value


class EvaluationSpec(_Strict):
    text: str = "builtin:eval.txt"
    max_tokens: int = Field(default=2048, gt=1)
    context_tokens: int = Field(default=512, ge=32, le=32768)
    tasks: str | None = "builtin:tasks.jsonl"
    max_tasks: int | None = Field(default=None, gt=0)
    device_profiles: list[str] = Field(default_factory=lambda: sorted(DEVICE_PROFILES))
    speed_prompt_tokens: int = Field(default=128, gt=0)
    speed_decode_tokens: int = Field(default=32, gt=0)
    threads: int | None = Field(default=None, gt=0)
    evaluate_source: bool = True

    @field_validator("device_profiles")
    @classmethod
    def _profiles(cls, value: list[str]) -> list[str]:
        unknown = [p for p in value if p not in DEVICE_PROFILES]
        if unknown:
            raise ValueError(
                f"unknown device profiles {', '.join(unknown)}; known: {', '.join(sorted(DEVICE_PROFILES))}"
            )
        return value

    @model_validator(mode="after")
    def _fits(self) -> EvaluationSpec:
        if self.max_tokens < self.context_tokens:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be at least context_tokens ({self.context_tokens}): "
                "perplexity is scored on whole chunks"
            )
        return self


class Recipe(_Strict):
    name: str
    source: str
    output_name: str | None = None
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    variants: list[VariantSpec] = Field(min_length=1)
    base_dir: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique(self) -> Recipe:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(duplicates)}")
        return self


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_recipe(data: Any, origin: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as parsed YAML; checks every pass and its parameters too."""
    from slmops.optimize.passes import get_pass

    if not isinstance(data, dict):
        raise BlueprintError(
            f"{origin}: expected a mapping with name, source and variants, found {type(data).__name__}"
        )
    try:
        recipe = Recipe.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        raise BlueprintError(f"{origin}: {_describe(exc)}") from None
    for variant in recipe.variants:
        for index, step in enumerate(variant.passes, start=1):
            try:
                get_pass(step.pass_name).parse_params(step.params)
            except BlueprintError as exc:
                raise BlueprintError(f"{origin}: variant '{variant.name}', step {index}: {exc}") from None
    return recipe


def load_recipe(path: Path) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BlueprintError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise BlueprintError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_recipe(data, str(path), path.resolve().parent)
