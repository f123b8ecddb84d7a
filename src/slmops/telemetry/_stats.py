"""Two-sample tests on counts for drift, through scipy (imported here, lazily; it comes with the ``server`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from slmops.core._scipy import scipy_stats

__all__ = ["chi_square_p", "fisher_p"]


def _scipy_stats() -> ModuleType:
    return scipy_stats("drift detection")


def chi_square_p(reference: Sequence[int], current: Sequence[int]) -> float:
    """p-value of Pearson's chi-square test of homogeneity on the 2 x buckets table (no continuity correction);
    buckets empty in both rows are dropped, and 1.0 when fewer than two buckets remain (nothing to compare)."""
    columns = [(r, c) for r, c in zip(reference, current, strict=True) if r or c]
    if len(columns) < 2 or not sum(r for r, _ in columns) or not sum(c for _, c in columns):
        return 1.0
    table = [[r for r, _ in columns], [c for _, c in columns]]
    result = _scipy_stats().chi2_contingency(table, correction=False)
    return float(result.pvalue)


def fisher_p(reference: Sequence[int], current: Sequence[int]) -> float:
    """Two-sided p-value of Fisher's exact test on ((events, others) of reference, (events, others) of current)."""
    if len(reference) != 2 or len(current) != 2:
        raise ValueError(f"need (events, others) pairs; got {list(reference)} and {list(current)}")
    result = _scipy_stats().fisher_exact([list(reference), list(current)], alternative="two-sided")
    return float(result.pvalue)
