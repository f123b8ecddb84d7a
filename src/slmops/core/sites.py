"""Site adaptations resolved against a blueprint's limits: what a site asked for, cut down to what it may have.

A site (the devices labelled ``site=<name>``) stores a :class:`~slmops.core.adaptation.SiteAdaptation`; the winning
blueprint of each device grants :class:`~slmops.core.adaptation.LocalLimits`. :func:`resolve` keeps each value that
fits and drops the others with a reason an operator can act on:

- a system prompt when the blueprint allows none or a shorter one;
- a sampling value the blueprint gives no bounds for, or one outside its bounds;
- an adapter the blueprint does not list, one the registry does not have, or one trained for another base than the
  version the device runs now ("adapter lora-shop was trained for tiny@v1, the device now runs tiny@v2").

Pure: the control plane looks up the adapter versions (:class:`AdapterOption`) and passes them in. The result is
what goes into the device's desired state (``DesiredState.local``); its ``bounds`` are the blueprint's, which the
agent clamps requests to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from slmops.core.adaptation import LocalAdaptation, LocalLimits, Sampling, SiteAdaptation

__all__ = ["SITE_LABEL", "AdapterOption", "chosen_adapter", "describe", "resolve"]

SITE_LABEL = "site"  # the device label whose value names the device's site


@dataclass(frozen=True)
class AdapterOption:
    """An adapter version a site could choose: its variant name and the base version it was trained for."""

    name: str  # the adapter's variant name, e.g. "lora-shop"
    digest: str  # the adapter version's manifest digest
    label: str  # "tiny@v3 (lora-shop)"
    base_digest: str
    base_label: str  # "tiny@v1 (q8_0)"
    number: int = 0  # version number, newer wins among options of one name and base


def _number(value: float) -> str:
    return f"{value:g}"


def _sampling(limits: LocalLimits, asked: Sampling, dropped: list[str]) -> Sampling:
    kept: dict[str, float | int] = {}
    for name in ("temperature", "top_p", "max_tokens"):
        value = getattr(asked, name)
        if value is None:
            continue
        bounds = getattr(limits.sampling, name)
        if bounds is None:
            dropped.append(
                f"{name} {_number(value)}: the blueprint sets no bounds for {name}, so a site may not set it"
            )
        elif not bounds[0] <= value <= bounds[1]:
            dropped.append(
                f"{name} {_number(value)}: outside the blueprint's bounds [{_number(bounds[0])}, {_number(bounds[1])}]"
            )
        else:
            kept[name] = value
    return Sampling.model_validate(kept)


def _system_prompt(limits: LocalLimits, prompt: str | None, dropped: list[str]) -> str | None:
    if not prompt:
        return None
    allowed = limits.system_prompt_max_chars
    if allowed == 0:
        dropped.append("system prompt: the blueprint allows no site system prompt (spec.local.system_prompt_max_chars)")
        return None
    if len(prompt) > allowed:
        dropped.append(f"system prompt: {len(prompt):,} characters, more than the {allowed:,} the blueprint allows")
        return None
    return prompt


def chosen_adapter(
    name: str | None, adapters_available: Sequence[AdapterOption], base_digest: str | None
) -> AdapterOption | None:
    """The newest adapter version called ``name`` that was trained for ``base_digest``, if any."""
    if name is None or base_digest is None:
        return None
    fitting = [a for a in adapters_available if a.name == name and a.base_digest == base_digest]
    return max(fitting, key=lambda a: (a.number, a.digest)) if fitting else None


def _adapter(
    limits: LocalLimits,
    name: str | None,
    adapters_available: Sequence[AdapterOption],
    base_digest: str | None,
    base_label: str,
    dropped: list[str],
) -> str | None:
    if name is None:
        return None
    if name not in limits.adapters:
        allowed = ", ".join(limits.adapters) if limits.adapters else "none"
        dropped.append(f"adapter {name}: the blueprint does not allow it (spec.local.adapters: {allowed})")
        return None
    if base_digest is None:
        dropped.append(f"adapter {name}: the device has no model to load it over")
        return None
    if chosen_adapter(name, adapters_available, base_digest) is not None:
        return name
    named = sorted((a for a in adapters_available if a.name == name), key=lambda a: (-a.number, a.digest))
    if not named:
        dropped.append(f"adapter {name}: no adapter version of that name is in the registry")
    else:
        trained = ", ".join(dict.fromkeys(a.base_label for a in named))
        dropped.append(f"adapter {name} was trained for {trained}, the device now runs {base_label}")
    return None


def resolve(
    limits: LocalLimits,
    site_name: str | None,
    site_adaptation: SiteAdaptation | None,
    adapters_available: Sequence[AdapterOption] = (),
    *,
    base_digest: str | None = None,
    base_label: str = "",
) -> LocalAdaptation:
    """What a device of ``site_name`` applies: the site's values that fit ``limits``, and why the others were
    dropped. ``base_digest``/``base_label`` name the version the device's blueprint (or release) chose for it; an
    adapter is kept only when one of ``adapters_available`` of that name was trained for exactly that version."""
    if site_adaptation is None:
        return LocalAdaptation(site=site_name, bounds=limits.sampling)
    dropped: list[str] = []
    prompt = _system_prompt(limits, site_adaptation.system_prompt, dropped)
    sampling = _sampling(limits, site_adaptation.sampling, dropped)
    adapter = _adapter(limits, site_adaptation.adapter, adapters_available, base_digest, base_label, dropped)
    return LocalAdaptation(
        site=site_name,
        adapter=adapter,
        system_prompt=prompt,
        sampling=sampling,
        bounds=limits.sampling,
        dropped=dropped,
    )


def describe(local: LocalAdaptation) -> str:
    """One line of what a device applies: adapter, system prompt, sampling; '-' when nothing."""
    parts = []
    if local.adapter:
        parts.append(f"adapter {local.adapter}")
    if local.system_prompt:
        parts.append(f"system prompt ({len(local.system_prompt)} chars)")
    parts += [f"{k}={v:g}" for k, v in local.sampling.model_dump().items() if v is not None]
    return ", ".join(parts) or "-"
