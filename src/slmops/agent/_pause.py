"""The test hook that stops a real agent process at a named point, so a test can SIGKILL it exactly there."""

from __future__ import annotations

import os
import sys
import time

__all__ = ["PAUSE_ENV", "pause"]

PAUSE_ENV = "SLMOPS_AGENT_TEST_PAUSE_AT"
"""Test hook: the name of a point at which the agent prints ``SLMOPS_AGENT_PAUSED <point>`` and sleeps (to be
SIGKILLed there). Points: download_chunk, before_switch, after_previous_link, after_switch, before_serve and
after_serve (only for a version on probation), before_commit, before_rollback, after_rollback."""


def pause(point: str) -> None:
    """Print the pause line and sleep forever when :data:`PAUSE_ENV` names ``point``; otherwise return at once."""
    if os.environ.get(PAUSE_ENV) == point:
        sys.stdout.write(f"SLMOPS_AGENT_PAUSED {point}\n")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
