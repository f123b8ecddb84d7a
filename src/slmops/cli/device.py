"""`slmops device …`: enrolled devices, their state, labels and what they run (over the control-plane API)."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.table import Column, Table

from slmops.cli._common import console, human_bytes, print_json
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client, list_command, parse_labels
from slmops.control.client import OperatorClient
from slmops.control.schemas import DevicePublic

__all__ = ["app"]

app = typer.Typer(help="Enrolled devices: list, show, approve, label, revoke.", no_args_is_help=True)


def _labels(labels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _runs(device: DevicePublic) -> str:
    if device.active_version:
        return device.active_version
    return device.active_digest.removeprefix("sha256:")[:12] if device.active_digest else "-"


def _table(devices: list[DevicePublic]) -> Table:
    table = Table("state", "class", "labels", "runs", "phase", "health", "seen")
    table.columns.insert(0, Column("id", no_wrap=True))
    for d in devices:
        seen = "online" if d.online else ("offline" if d.state == "approved" else "-")
        table.add_row(d.id, d.state, d.device_class, _labels(d.labels), _runs(d), d.phase or "-", d.health or "-", seen)
    return table


def _print_table(devices: list[DevicePublic]) -> None:
    console.print(_table(devices))


list_ = app.command("list")(
    list_command(
        OperatorClient.devices,
        _print_table,
        "Only devices in this state (pending, approved, ...).",
        """List devices: state, class, labels, what each runs, its phase, health, online or offline.

    Example: slmops device list --state pending
    """,
    )
)


@app.command()
def show(
    device_id: str = typer.Argument(..., help="The device id (dev-...)."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show one device: capabilities, labels, what it runs, what it should run, recent events.

    Example: slmops device show dev-0123456789abcdef
    """
    with client(server_url, token) as api:
        device = api.device(device_id)
        desired = api.desired(device_id) if device.state == "approved" else None
        events = api.device_events(device_id, limit=10)
    if json_out:
        print_json(
            {
                **device.model_dump(mode="json"),
                "desired": desired.model_dump(mode="json", exclude={"model": {"envelope"}}) if desired else None,
                "events": [e.model_dump(mode="json") for e in events],
            }
        )
        return
    console.print(_table([device]))
    caps = device.capabilities
    if caps is not None:
        flags = ", ".join(caps.cpu_flags) or "-"
        console.print(
            f"capabilities: {human_bytes(caps.memory_bytes)} RAM, {human_bytes(caps.disk_free_bytes)} free disk, "
            f"{caps.cpu_cores} cores, {caps.arch or '?'} {caps.os}, flags {flags}, "
            f"accelerator {caps.accelerator or '-'}"
        )
    if desired is not None:
        target = f"{desired.model.name}@{desired.model.version}" if desired.model else "nothing"
        console.print(f"should run: {target} (blueprint {desired.blueprint or '-'}); {desired.reason}")
    if device.last_error:
        console.print(f"last error: {device.last_error}")
    for event in events:
        console.print(f"  {event.time} {event.kind} {event.version_digest or ''}")


def _transition(name: str, change: Callable[[OperatorClient, str], DevicePublic], summary: str) -> None:
    """Register ``slmops device NAME DEVICE_ID``: move one device to another state, then print that state."""

    def command(
        device_id: str = typer.Argument(..., help="The device id."),
        server_url: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        with client(server_url, token) as api:
            device = change(api, device_id)
        console.print(f"device {device.id} is {device.state}")

    command.__doc__ = f"{summary}\n\nExample: slmops device {name} dev-0123456789abcdef"
    app.command(name)(command)


_transition("approve", OperatorClient.approve, "Approve a pending device; it claims its credential on its next poll.")


@app.command()
def label(
    device_id: str = typer.Argument(..., help="The device id."),
    labels: list[str] = typer.Argument(None, help="KEY=VALUE to set, or KEY- to remove."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Set or remove device labels (like kubectl label).

    Example: slmops device label dev-0123456789abcdef ring=canary site-
    """
    items = labels or []
    remove = [item[:-1] for item in items if item.endswith("-") and "=" not in item]
    to_set = parse_labels([item for item in items if not (item.endswith("-") and "=" not in item)])
    with client(server_url, token) as api:
        device = api.label(device_id, to_set, remove)
    console.print(f"device {device.id} labels: {_labels(device.labels)}")


_transition(
    "revoke",
    OperatorClient.revoke,
    "Revoke a device: its credential stops working at once; it must enroll again with a new key.",
)
_transition("decommission", OperatorClient.decommission, "Retire a device for good.")
