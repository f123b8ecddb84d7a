"""Device classes: devices grouped by what they measured about themselves.

A class name is ``<arch>-<memory tier>`` plus ``-<accelerator>`` when the device has one, e.g. ``x86_64-8gb``,
``aarch64-2gb``, ``x86_64-16gb-cuda``. Memory tiers are powers of two in GiB (1, 2, 4, ... 1024); a device is in
the highest tier whose size it reaches within 10%, because an "8 GB" machine reports a little less than 8 GiB
after firmware and kernel reservations. Below 0.9 GiB the tier is ``sub1gb``. An unknown architecture is
``unknown``. The function is pure and deterministic, and more memory never yields a lower tier.
"""

from __future__ import annotations

import re

from slmops.core.wire import Capabilities

__all__ = ["MEMORY_TIERS_GIB", "device_class", "memory_tier_gib"]

MEMORY_TIERS_GIB = tuple(1 << i for i in range(11))  # 1, 2, 4, ..., 1024
_GIB = 1 << 30
_TOLERANCE = 0.9
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}
_UNSAFE = re.compile(r"[^a-z0-9_]+")


def memory_tier_gib(memory_bytes: int) -> int:
    """The largest tier (GiB) the memory reaches within 10%; 0 below the smallest tier."""
    tier = 0
    for size in MEMORY_TIERS_GIB:
        if memory_bytes >= size * _GIB * _TOLERANCE:
            tier = size
    return tier


def _token(value: str, default: str) -> str:
    cleaned = _UNSAFE.sub("_", value.strip().lower()).strip("_")[:32]
    return cleaned or default


def device_class(capabilities: Capabilities) -> str:
    """The class name of a device, e.g. ``x86_64-8gb``."""
    arch = _token(capabilities.arch, "unknown")
    arch = _ARCH_ALIASES.get(arch, arch)
    tier = memory_tier_gib(capabilities.memory_bytes)
    name = f"{arch}-{tier}gb" if tier else f"{arch}-sub1gb"
    if capabilities.accelerator:
        name += "-" + _token(capabilities.accelerator, "accel")
    return name
