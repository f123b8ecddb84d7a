"""Rollout cohorts: which devices are in a stage of a release.

A device's *position* in a release is a number in [0, 1) taken from sha256 of (release id, device id): stable,
independent of the fleet, and different per release, so the same devices are not always the first canaries.

A stage with fraction ``f`` takes, **within each device class**, the ``quota(n, f)`` devices with the lowest
positions, where ``n`` is the class size and ``quota(n, f) = min(n, max(ceil(f * n), min_per_class))`` for
``f > 0`` (and 0 for ``f == 0``).

Why rank within the class and not a threshold on the hash (``position < f``): with a threshold, a class of ``n``
devices gets no canary at ``f`` with probability ``(1 - f) ** n`` -- a class of 20 devices at a 1% stage has none
82% of the time, so a release bad on that class only would pass stage 1 unnoticed and reach it at 10% or 50%.
Ranking takes the lowest ``quota`` positions in every class, so every non-empty class has at least
``min(min_per_class, n)`` canaries at any ``f > 0``, by construction.

Guarantees (tested in ``tests/core/test_cohorts.py``):

1. **Deterministic**: the same fleet, release and fraction give the same members, on every replica.
2. **Monotone in the fraction, for a fixed fleet**: ``quota`` never decreases as ``f`` grows and the ranking does
   not depend on ``f``, so members at ``a`` are a subset of members at ``b`` for ``a <= b``. A device that entered
   at stage 1 is in every later stage; no device flips while the fleet is unchanged. ``f == 1`` is everyone.
3. **Joins evict at most one member, and only in a known case** -- rank membership is *not* fully stable when the
   fleet changes, and this is the exact bound. When one device ``x`` joins class ``c`` (size ``n -> n + 1``),
   other classes are unchanged, and ``quota(n + 1) - quota(n)`` is 0 or 1 (``ceil(f * n)`` grows by at most one
   per device for ``f <= 1``, and the ``max``/``min`` clamps keep that). Every old member keeps its rank or moves
   down by one (only if ``x`` ranks before it). So an old member is evicted iff ``x`` ranks within the old quota
   **and** the quota did not grow; the evicted device is then exactly the old member with the highest position.
   Counterexample showing it happens: ``f = 0.5``, class of 3 (quota 2); a 4th device with the lowest position
   joins, quota stays 2, the old second-ranked member drops out. Symmetrically, a device *leaving* can evict the
   last-ranked member when the quota shrinks (``n = 3 -> 2`` at ``f = 0.5``: quota 2 -> 1).
   Consequence for the controller: a device that ran a release must stay in its cohort even if the fleet changes.
   Record the members at each stage transition and take ``recorded | stage_members(...)``; ``members_with_history``
   does that union.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Set

from slmops.errors import ConfigError

__all__ = ["members_with_history", "rollout_position", "stage_members", "stage_quota"]

_MANTISSA_BITS = 53  # a double holds 53 bits exactly, so k / 2**53 < 1 for every k < 2**53


def rollout_position(device_id: str, release_id: str) -> float:
    """The device's place in the release's order, uniform in [0, 1); deterministic.

    Both ids are length-prefixed before hashing, so ("ab", "c") and ("a", "bc") cannot collide by concatenation.
    """
    release = release_id.encode("utf-8")
    device = device_id.encode("utf-8")
    payload = b"slmops-rollout\x00" + len(release).to_bytes(8, "big") + release + device
    digest = hashlib.sha256(payload).digest()
    return (int.from_bytes(digest[:8], "big") >> (64 - _MANTISSA_BITS)) / float(1 << _MANTISSA_BITS)


def _check(fraction: float, min_per_class: int) -> None:
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ConfigError(f"a stage fraction must be between 0 and 1 (e.g. 0.01 for 1%); got {fraction!r}")
    if min_per_class < 0:
        raise ConfigError(f"min_per_class must be 0 or more (canaries per device class); got {min_per_class}")


def stage_quota(n: int, fraction: float, *, min_per_class: int = 1) -> int:
    """How many of a class's ``n`` devices a stage with ``fraction`` takes."""
    _check(fraction, min_per_class)
    if n <= 0 or fraction == 0.0:
        return 0
    return min(n, max(math.ceil(fraction * n), min_per_class))


def stage_members(devices: Mapping[str, str], release_id: str, fraction: float, *, min_per_class: int = 1) -> set[str]:
    """The device ids in the stage: per device class, the ``stage_quota`` lowest positions.

    ``devices`` maps device id to device class. Ties in position (a 2**-53 chance per pair) are broken by device
    id, so the order is total and the result deterministic.
    """
    _check(fraction, min_per_class)
    by_class: dict[str, list[str]] = {}
    for device_id, device_class in devices.items():
        by_class.setdefault(device_class, []).append(device_id)
    members: set[str] = set()
    for ids in by_class.values():
        quota = stage_quota(len(ids), fraction, min_per_class=min_per_class)
        ranked = sorted(ids, key=lambda d: (rollout_position(d, release_id), d))
        members.update(ranked[:quota])
    return members


def members_with_history(
    devices: Mapping[str, str],
    release_id: str,
    fraction: float,
    recorded: Set[str],
    *,
    min_per_class: int = 1,
) -> set[str]:
    """``stage_members`` plus every device already recorded in the release's cohort and still in the fleet.

    With ``recorded`` the members of earlier evaluations, membership never shrinks across fleet changes (see
    guarantee 3 in the module docstring); the cost is at most one extra device per join that displaced one.
    """
    return stage_members(devices, release_id, fraction, min_per_class=min_per_class) | (recorded & devices.keys())
