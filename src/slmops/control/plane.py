"""``ControlPlane``: what every control-plane operation shares — the database, the registry, settings, the clock and
two caches.

The operations themselves are functions of one module per concept, each taking the plane first and doing one unit
of work (one session, one commit; repositories only flush):

- :mod:`~slmops.control.credentials`: operator API tokens; who a bearer credential belongs to
- :mod:`~slmops.control.enrollment`: enrollment tokens, enrolling a device, claiming its credential
- :mod:`~slmops.control.devices`: the operators' view of devices, their lifecycle, and the heartbeat
- :mod:`~slmops.control.blueprints`: apply, plan and read blueprints
- :mod:`~slmops.control.desired_state`: what a device should run, and which blobs it may download
- :mod:`~slmops.control.rollouts`: releases and the rollout controller
- :mod:`~slmops.control.telemetry`: telemetry windows and their roll-ups

The HTTP routes calling them are the ``routes_*`` modules. The decisions themselves (device classes, blueprint
matching, desired state, variant choice, gates) are pure functions in ``core/``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Engine

from slmops.control.credentials import CredentialCache
from slmops.control.desired_state import WorldCache
from slmops.control.repository import iso
from slmops.control.settings import ServerSettings
from slmops.registry import Registry

__all__ = ["ControlPlane", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class ControlPlane:
    """Devices, tokens, blueprints and releases in the registry's database, next to the registry itself."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        settings: ServerSettings,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self.credential_cache = CredentialCache()
        self.world_cache = WorldCache()

    @classmethod
    def open(cls, settings: ServerSettings | None = None, clock: Callable[[], datetime] = utcnow) -> ControlPlane:
        """Open the registry (which runs the migrations, control-plane tables included) and share its engine."""
        import slmops.control.db  # noqa: F401  (the tables must be on Base.metadata before anything compares it)

        settings = settings or ServerSettings()
        registry = Registry.open(settings.registry_settings())
        return cls(registry.engine, registry, settings, clock)

    def close(self) -> None:
        self.registry.close()

    def now_iso(self) -> str:
        """The clock's time as the control-plane tables store it (RFC 3339 UTC, second precision)."""
        return iso(self.clock())

    def now_epoch(self) -> float:
        """The clock's time in epoch seconds (the release tables' unit)."""
        return self.clock().timestamp()
