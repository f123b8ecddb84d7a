"""When did a shift begin? Page's one-sided CUSUM over a sequence of per-window statistics. Pure.

The statistic is standardized against a null estimated from reference windows (``target`` and ``scale``):
``z_t = (x_t - target) / scale``; the sum ``S_t = max(0, S_{t-1} + z_t - k)`` alarms when it exceeds ``h``, and the
shift is taken to begin at the first window of the run of positive ``S`` that crossed (the usual CUSUM estimate of
the change time). ``k`` is half the standardized shift worth detecting; ``h`` trades the delay against the false
alarm rate (``k=0.5, h=5`` is the textbook choice: a one-sigma shift is found in about ten windows, while a normal
null runs several hundred windows between false alarms). Missing values (``None``: a window with too few samples)
leave the sum as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CusumAlarm", "cusum_alarms", "first_alarm", "null_estimate"]


@dataclass(frozen=True)
class CusumAlarm:
    """An alarm: the sum crossed ``h`` at ``detected``; the run of positive sums that crossed began at ``began``."""

    began: int
    detected: int
    statistic: float  # the sum at ``detected``, in units of ``scale``


def null_estimate(values: Sequence[float], *, scale_floor: float) -> tuple[float, float]:
    """``(mean, max(sample standard deviation, scale_floor))`` of the null values; ``scale_floor`` must be > 0.

    The floor keeps a very steady reference from turning a negligible change into many standard deviations.
    """
    if not scale_floor > 0:
        raise ValueError(f"scale_floor must be > 0; got {scale_floor!r}")
    if not values:
        return 0.0, scale_floor
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, scale_floor
    variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, max(math.sqrt(variance), scale_floor)


def cusum_alarms(
    values: Sequence[float | None], *, target: float, scale: float, k: float = 0.5, h: float = 5.0
) -> list[CusumAlarm]:
    """Every alarm over the sequence, restarting the sum after each one (how false alarms are counted)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0; got {scale!r}")
    if k < 0 or not h > 0:
        raise ValueError(f"need k >= 0 and h > 0; got k={k!r}, h={h!r}")
    alarms: list[CusumAlarm] = []
    total = 0.0
    began = 0
    for index, value in enumerate(values):
        if value is None:
            continue
        if total == 0.0:
            began = index
        total = max(0.0, total + (value - target) / scale - k)
        if total == 0.0:
            continue
        if total > h:
            alarms.append(CusumAlarm(began=began, detected=index, statistic=total))
            total = 0.0
    return alarms


def first_alarm(
    values: Sequence[float | None], *, target: float, scale: float, k: float = 0.5, h: float = 5.0
) -> CusumAlarm | None:
    """The first alarm, or ``None`` when the sum never crosses ``h``."""
    alarms = cusum_alarms(values, target=target, scale=scale, k=k, h=h)
    return alarms[0] if alarms else None
