"""Releases and the rollout controller.

A release (``slmops rollout start BLUEPRINT --to REF``) moves one blueprint from the version it resolves to now to a
new one, stage by stage. Everything about it lives in the database: the release row (state, stage, policy), its
cohort (``release_members``: each device recorded when it first entered, so membership never shrinks and no device
flips back) and its events (every decision, with the numbers that led to it). Desired state reads the active
releases: a recorded canary gets the new version, every other device the blueprint as applied.

- :mod:`.releases`: starting a release, reading it, and its state machine (pause, resume, abort, promote)
- :mod:`.cohort`: which devices the current stage takes, recorded as the release's members
- :mod:`.evidence`: per device class, the canaries' and the baseline's telemetry, and failed activations
- :mod:`.controller`: the loop that judges each stage on its evidence and promotes, holds or halts

The HTTP routes are in :mod:`slmops.control.routes_rollouts`; the lease that lets one replica run the controller
is :mod:`slmops.control.lease`.
"""

from __future__ import annotations

from slmops.control.rollouts.cohort import sync_members
from slmops.control.rollouts.controller import CONTROLLER_LEASE, RolloutController
from slmops.control.rollouts.evidence import gather_evidence
from slmops.control.rollouts.releases import (
    abort_release,
    pause_release,
    promote_release,
    release,
    release_events,
    release_members,
    releases,
    resume_release,
    start_release,
)

__all__ = [
    "CONTROLLER_LEASE",
    "RolloutController",
    "abort_release",
    "gather_evidence",
    "pause_release",
    "promote_release",
    "release",
    "release_events",
    "release_members",
    "releases",
    "resume_release",
    "start_release",
    "sync_members",
]
