"""How much an edge may train: seconds of active fine-tuning per idle window and per day.

Sans-IO: the learner charges the seconds its worker actually ran (paused time is free)
and asks :meth:`TrainingBudget.allows` before starting or resuming. The daily count
rolls over at midnight UTC and is persisted by the caller (:meth:`state`), so a restart
does not hand out a fresh day.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


def utc_day(ts: float) -> str:
    """The UTC date of a Unix time, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


@dataclass
class TrainingBudget:
    """Active training seconds allowed per idle window and per UTC day."""

    window_s: float
    daily_s: float
    day: str = ""
    used_today_s: float = 0.0
    used_window_s: float = 0.0
    clock: Callable[[], float] = time.time

    def open_window(self) -> None:
        """A new idle window starts: its own allowance is full again."""
        self.used_window_s = 0.0

    def _roll(self) -> None:
        today = utc_day(self.clock())
        if today != self.day:
            self.day, self.used_today_s = today, 0.0

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of training against the window and the day."""
        self._roll()
        self.used_window_s += max(0.0, seconds)
        self.used_today_s += max(0.0, seconds)

    def remaining_s(self) -> float:
        """Seconds left now: the smaller of the window's and the day's."""
        self._roll()
        return max(0.0, min(self.window_s - self.used_window_s, self.daily_s - self.used_today_s))

    def allows(self) -> bool:
        return self.remaining_s() > 0.0

    def exhausted(self) -> str | None:
        """``window`` or ``day`` when that allowance is spent, else None."""
        self._roll()
        if self.used_today_s >= self.daily_s:
            return "day"
        if self.used_window_s >= self.window_s:
            return "window"
        return None

    def state(self) -> str:
        """``<day> <seconds used>``: what to persist."""
        self._roll()
        return f"{self.day} {self.used_today_s:.3f}"

    def restore(self, saved: str | None) -> None:
        """Take back a persisted :meth:`state` (ignored if it is from another day)."""
        if not saved:
            return
        day, _, used = saved.partition(" ")
        self._roll()
        if day == self.day:
            try:
                self.used_today_s = max(self.used_today_s, float(used))
            except ValueError:
                return
