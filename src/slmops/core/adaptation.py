"""Site adaptations: what a site may set locally, within the limits its blueprint grants.

::

    spec:
      local:
        adapters: [lora-shop]            # adapter variants (of the blueprint's model) a site may choose
        system_prompt_max_chars: 600     # 0: no site system prompt
        sampling:                        # bounds; a site's values must lie inside them
          temperature: [0.0, 1.0]
          top_p: [0.5, 1.0]
          max_tokens: [1, 512]

A site (the devices with the label ``site=<name>``) sets its values with ``slmops site set``; the control plane
stores them and resolves them against the winning blueprint's limits into each device's desired state
(:class:`LocalAdaptation`); a value that no longer fits (a new base without the site's adapter, a shorter limit)
is dropped and the reason is shown by ``plan`` and ``slmops site show``. The agent applies what it receives: the
system prompt is put before every request's messages, sampling values become the defaults and requests are
clamped to the bounds.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from slmops.core._wire_base import Wire

__all__ = [
    "MAX_SYSTEM_PROMPT_CHARS",
    "LocalAdaptation",
    "LocalLimits",
    "Sampling",
    "SamplingBounds",
    "SiteAdaptation",
]

MAX_SYSTEM_PROMPT_CHARS = 8_000


def _ordered(pair: tuple[float, float] | None, name: str) -> None:
    if pair is not None and pair[0] > pair[1]:
        raise ValueError(f"{name}: the lower bound {pair[0]} is above the upper bound {pair[1]}")


class SamplingBounds(Wire):
    # strict=False: YAML and JSON give lists, which a strict tuple refuses (the items stay strict numbers)
    temperature: tuple[float, float] | None = Field(default=None, strict=False)
    top_p: tuple[float, float] | None = Field(default=None, strict=False)
    max_tokens: tuple[int, int] | None = Field(default=None, strict=False)

    @model_validator(mode="after")
    def _ordered_bounds(self) -> SamplingBounds:
        _ordered(self.temperature, "temperature")
        _ordered(self.top_p, "top_p")
        _ordered((float(self.max_tokens[0]), float(self.max_tokens[1])) if self.max_tokens else None, "max_tokens")
        return self


class LocalLimits(Wire):
    adapters: list[str] = Field(default_factory=list, max_length=64)
    system_prompt_max_chars: int = Field(default=0, ge=0, le=MAX_SYSTEM_PROMPT_CHARS)
    sampling: SamplingBounds = Field(default_factory=SamplingBounds)


class Sampling(Wire):
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)


class SiteAdaptation(Wire):
    """What a site asked for (stored by the control plane per site)."""

    adapter: str | None = Field(default=None, max_length=128)
    system_prompt: str | None = Field(default=None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    sampling: Sampling = Field(default_factory=Sampling)


class LocalAdaptation(Wire):
    """What a device applies: the site's values that fit its blueprint's limits, and why the others were dropped."""

    site: str | None = None
    adapter: str | None = None  # the adapter variant in effect (the desired model is then that adapter version)
    system_prompt: str | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    bounds: SamplingBounds = Field(default_factory=SamplingBounds)
    dropped: list[str] = Field(default_factory=list)  # "adapter lora-shop: not a variant of gemma3-270m@v4", ...
