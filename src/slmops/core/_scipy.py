"""scipy's statistics module, imported when a test is first computed (it comes with the ``server`` extra)."""

from __future__ import annotations

from types import ModuleType

from slmops.errors import MissingExtraError

__all__ = ["scipy_stats"]


def scipy_stats(purpose: str) -> ModuleType:
    """``scipy.stats``; :class:`MissingExtraError` naming ``purpose`` when scipy is not installed."""
    try:
        from scipy import stats  # type: ignore[import-untyped, unused-ignore]
    except ImportError as exc:
        raise MissingExtraError("server", purpose, "scipy") from exc
    result: ModuleType = stats
    return result
