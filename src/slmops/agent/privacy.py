"""The device's differential-privacy budget: how much epsilon its reported aggregates spent today (UTC).

A blueprint's ``spec.privacy.dp`` gives ``epsilon_per_window`` (what one closed telemetry window costs) and
``epsilon_per_day`` (the device's budget per UTC day). Each close spends ``epsilon_per_window`` once, however many
version windows it produces: every request is counted in exactly one of them, so they are released over disjoint
data and compose in parallel. When the day's remaining budget is smaller than a window's cost, the window is sent
without aggregates (see :func:`slmops.agent.reporting.liveness_window`) and an event says so, once per day.

The ledger is ``privacy_budget.json`` in the agent's data directory, written atomically *before* the noisy window is
released: a crash between the two loses budget, never spends it twice, and a restart cannot reset the day. A
ledger that cannot be read counts as an exhausted day (fail closed) until the next UTC day.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from slmops.agent._files import atomic_write

__all__ = ["BUDGET_FILE", "BudgetDay", "PrivacyBudget", "utc_day"]

BUDGET_FILE = "privacy_budget.json"
_TOLERANCE = 1e-9  # float sums of per-window epsilons: 24 x 1/24 must fit a budget of 1


def utc_day(now: float) -> str:
    """The UTC calendar day (``YYYY-MM-DD``) of a unix time."""
    return datetime.fromtimestamp(now, UTC).date().isoformat()


@dataclass(frozen=True)
class BudgetDay:
    day: str  # YYYY-MM-DD, UTC
    spent: float  # epsilon spent that day
    windows: int  # windows released with noise that day
    exhausted_noted: bool = False  # the "budget exhausted" event was already sent that day


class PrivacyBudget:
    """The persisted ledger of one agent. ``open()`` reads it; ``try_spend`` decides and persists."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._day: BudgetDay | None = None

    @classmethod
    def in_dir(cls, data_root: Path) -> PrivacyBudget:
        return cls(data_root / BUDGET_FILE)

    def open(self) -> None:
        try:
            raw = json.loads(self.path.read_bytes())
            self._day = BudgetDay(str(raw["day"]), float(raw["spent"]), int(raw["windows"]), bool(raw["noted"]))
        except FileNotFoundError:
            self._day = None
        except (ValueError, KeyError, TypeError):
            # Unreadable: treat today as spent rather than risk spending it twice.
            self._day = BudgetDay(utc_day(datetime.now(UTC).timestamp()), float("inf"), 0)

    def today(self, now: float) -> BudgetDay:
        if self._day is None:
            self.open()
        day = utc_day(now)
        if self._day is None or self._day.day != day:
            return BudgetDay(day, 0.0, 0)
        return self._day

    def remaining(self, now: float, epsilon_per_day: float) -> float:
        return max(0.0, epsilon_per_day - self.today(now).spent)

    def try_spend(self, epsilon: float, *, epsilon_per_day: float, now: float) -> bool:
        """Spend ``epsilon`` from today's ``epsilon_per_day`` and persist it; False (nothing spent) when it does not
        fit."""
        current = self.today(now)
        if current.spent + epsilon > epsilon_per_day + _TOLERANCE:
            return False
        self._save(BudgetDay(current.day, current.spent + epsilon, current.windows + 1, current.exhausted_noted))
        return True

    def note_exhausted(self, now: float) -> bool:
        """Mark today's exhaustion as reported; True the first time today (so the caller sends one event)."""
        current = self.today(now)
        if current.exhausted_noted:
            return False
        self._save(BudgetDay(current.day, current.spent, current.windows, True))
        return True

    def _save(self, day: BudgetDay) -> None:
        record = {"day": day.day, "spent": day.spent, "windows": day.windows, "noted": day.exhausted_noted}
        atomic_write(self.path, json.dumps(record).encode("utf-8"))
        self._day = day
