"""Device classes as values: how many threads a class of device runs inference on, and how much memory it has.

A profile is what the optimizer evaluates a variant against (does it fit, how fast at that thread count) and what
the variant chooser uses as a device's capabilities. Speeds measured for a profile are measured on the machine that
ran the evaluation, at ``min(profile.threads, cores of that machine)`` threads, and labelled with that machine;
they are never extrapolated to the real hardware of the class.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmops.errors import NotFoundError

__all__ = ["DEVICE_PROFILES", "DeviceProfile", "get_profile"]

GiB = 1 << 30


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    threads: int
    memory_bytes: int
    description: str = ""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"device profile {self.name!r}: threads must be >= 1, got {self.threads}")
        if self.memory_bytes <= 0:
            raise ValueError(f"device profile {self.name!r}: memory_bytes must be > 0, got {self.memory_bytes}")


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("gateway-2gb", 2, 2 * GiB, "factory or shop gateway: 2 cores, 2 GiB RAM"),
        DeviceProfile("pi5-8gb", 4, 8 * GiB, "Raspberry Pi 5 class board: 4 cores, 8 GiB RAM"),
        DeviceProfile("laptop-16gb", 8, 16 * GiB, "office laptop: 8 threads, 16 GiB RAM"),
    )
}


def get_profile(name: str, profiles: dict[str, DeviceProfile] | None = None) -> DeviceProfile:
    """The profile called ``name``; a clear error naming the known ones otherwise."""
    known = DEVICE_PROFILES if profiles is None else profiles
    try:
        return known[name]
    except KeyError:
        raise NotFoundError(
            f"unknown device class {name!r}; known device classes: {', '.join(sorted(known))}"
        ) from None
