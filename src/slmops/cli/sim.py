"""`slmops sim`: run a simulated fleet against a real control plane and print what it did."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import typer
from rich.table import Table

from slmops.cli._common import console, print_json
from slmops.errors import ConfigError

__all__ = ["sim"]


def sim(
    fleet_yaml: Path = typer.Argument(..., help="The fleet file: device groups {profile, count, labels}."),
    server: str = typer.Option(..., "--server", help="The control plane's URL."),
    enroll_token: str = typer.Option(..., "--enroll-token", help="An enrollment token with enough uses."),
    duration_s: float | None = typer.Option(None, "--duration-s", help="Stop after this many seconds (default: ^C)."),
    poll_interval_s: float | None = typer.Option(
        None, "--poll-interval-s", help="Mean seconds between polls (default: the fleet file's, else 5)."
    ),
    max_connections: int = typer.Option(64, "--max-connections", help="HTTP connections shared by all devices."),
    enroll_spread_s: float = typer.Option(0.0, "--enroll-spread-s", help="Spread enrollments over this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run thousands of simulated devices in one process: real enrollment, desired-state polls and status reports,
    simulated downloads (no blob is fetched) and a simulated runtime.

    Example: slmops sim examples/fleet.yaml --server http://127.0.0.1:8080 --enroll-token T --duration-s 60
    """
    from slmops.sim import FleetRun, load_fleet

    if duration_s is not None and duration_s <= 0:
        raise ConfigError(f"--duration-s must be positive, got {duration_s}")
    if max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {max_connections}")
    spec = load_fleet(fleet_yaml)
    fleet = FleetRun(
        spec,
        server,
        enroll_token,
        max_connections=max_connections,
        poll_interval_s=poll_interval_s,
        enroll_spread_s=enroll_spread_s,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, stop.set)
        try:
            await fleet.run(stop, duration_s)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)

    asyncio.run(main())
    summary = fleet.summary()
    if as_json:
        print_json(summary.to_json())
        return
    console.print(
        f"{summary.enrolled}/{summary.devices} devices enrolled"
        + (f" in {summary.enroll_s:.1f} s" if summary.enroll_s is not None else "")
        + f"; {summary.elapsed_s:.1f} s; {summary.requests_per_s:.0f} requests/s"
    )
    table = Table("profile", "devices", "active version", "on it")
    for profile, versions in summary.by_version.items():
        for i, (label, count) in enumerate(versions.items()):
            shown = (profile, str(summary.by_profile[profile])) if i == 0 else ("", "")
            table.add_row(*shown, label, str(count))
    console.print(table)
    console.print("requests: " + ", ".join(f"{k}={v}" for k, v in summary.requests.items()))
    for name, error in summary.errors.items():
        console.print(f"[red]{name}[/]: {error}")
