"""The fleet simulator: thousands of simulated edge agents in one process, speaking the real wire protocol.

Used by the tests, the rollout benchmark and the demo; ``slmops sim FLEET_YAML`` runs one from the command line.
"""

from __future__ import annotations

from slmops.sim.agent import SimAgent
from slmops.sim.fleet import DeviceGroup, FleetSpec, RuntimeSpec, load_fleet, parse_fleet
from slmops.sim.profiles import BUILTIN_PROFILES, DeviceProfile
from slmops.sim.run import BackgroundFleet, FleetRun, FleetSummary
from slmops.sim.runtime import Behaviour, RuntimeOverride, RuntimeSample, SimulatedRuntime

__all__ = [
    "BUILTIN_PROFILES",
    "BackgroundFleet",
    "Behaviour",
    "DeviceGroup",
    "DeviceProfile",
    "FleetRun",
    "FleetSpec",
    "FleetSummary",
    "RuntimeOverride",
    "RuntimeSample",
    "RuntimeSpec",
    "SimAgent",
    "SimulatedRuntime",
    "load_fleet",
    "parse_fleet",
]
