"""`slmops drift show|pin|unpin`: drift of each (model version, device class) against its reference window."""

from __future__ import annotations

from collections.abc import Sequence

import typer
from rich.console import Group, RenderableType
from rich.table import Column, Table
from rich.text import Text

from slmops.cli._common import console, print_json, print_result
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client
from slmops.control.drift_schemas import DriftEntryPublic, DriftPin, DriftReferencePublic
from slmops.errors import ConfigError

__all__ = ["app", "render_entries"]

app = typer.Typer(
    help=(
        "Drift of what the fleet serves, per model version and device class: prompt and completion lengths, finish "
        "reasons, empty outputs, input surprise (prompt NLL) and latency against a reference window, with PSI and "
        "a two-sample test.\n\nExample: slmops drift show"
    ),
    no_args_is_help=True,
)
LEVEL_STYLE = {"ok": "green", "warn": "yellow", "alert": "bold red", "insufficient": "dim"}
VersionArg = typer.Argument(..., help="A version digest (sha256:...) or reference (NAME@VERSION, NAME@ALIAS).")
ClassArg = typer.Argument(..., help="A device class, as `slmops drift show` lists it.")


def _short_time(text: str | None) -> str:
    """``2026-01-03T02:00:00Z`` -> ``2026-01-03 02:00`` (steps start on the minute)."""
    return "-" if text is None else text.replace("T", " ")[:16]


def _reference(entry: DriftEntryPublic) -> str:
    ref = entry.reference
    kind = f"pinned by {ref.pinned_by}" if ref.kind == "pinned" else "first days"
    return f"reference {_short_time(ref.since)} .. {_short_time(ref.until)} ({kind}, {entry.reference_steps} steps)"


def render_entries(entries: Sequence[DriftEntryPublic]) -> Group | str:
    """What ``slmops drift show`` prints: per (version, class) a heading (level, shift start, reference) and a table
    of its signals (level, PSI, p-value, when that signal's shift began). No I/O."""
    if not entries:
        return "no drift summaries in the last days (agents report them with their telemetry windows)"
    parts: list[RenderableType] = []
    for e in entries:
        version = f"{e.model}@{e.version}" if e.model and e.version else e.version_digest[:19]
        heading = Text.assemble(
            (f"{version}  {e.device_class}  ", "bold"),
            (e.level, LEVEL_STYLE[e.level]),
            f"  shift began {_short_time(e.shift_began)}\n" if e.shift_began else "\n",
            (_reference(e), "dim"),
        )
        table = Table(
            Column("signal", no_wrap=True),
            "level",
            Column("PSI", justify="right"),
            Column("p", justify="right"),
            Column("shift began", no_wrap=True),
        )
        for s in e.signals:
            table.add_row(
                s.signal,
                Text(s.level, style=LEVEL_STYLE[s.level]),
                "-" if s.psi is None else f"{s.psi:.3f}",
                "-" if s.p_value is None else f"{s.p_value:.2g}",
                _short_time(s.shift_began),
            )
        parts += [heading, table]
    return Group(*parts)


@app.command("show")
def show(
    version: str | None = typer.Argument(None, help="Only this version (digest or NAME@REF); needs CLASS too."),
    device_class: str | None = typer.Argument(None, help="Only this device class."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show per (version, class) each signal's level, PSI and p-value, when a shift began, and the reference.

    Example: slmops drift show tiny@v2 cpu-8g --json
    """
    if (version is None) != (device_class is None):
        raise ConfigError("give both VERSION and CLASS, or neither (e.g. `slmops drift show tiny@v2 cpu-8g`)")
    with client(server_url, token) as api:
        if version is not None and device_class is not None:
            entries = [api._one(DriftEntryPublic, "GET", f"/drift/{version}/{device_class}")]
        else:
            entries = api._many(DriftEntryPublic, "/drift")
    print_result(entries, json_out, lambda found: console.print(render_entries(found)))
    if version is not None and not json_out:
        for signal in entries[0].signals:
            console.print(f"{signal.signal}: {signal.reason}", highlight=False)


@app.command("pin")
def pin(
    version: str = VersionArg,
    device_class: str = ClassArg,
    start: str = typer.Option(..., "--start", help="RFC 3339 start of the reference (inclusive)."),
    end: str = typer.Option(..., "--end", help="RFC 3339 end of the reference (exclusive)."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Pin the reference of (version, class) to the windows starting in [START, END); replaces an earlier pin.

    Example: slmops drift pin tiny@v2 cpu-8g --start 2025-06-01T00:00:00Z --end 2025-06-03T00:00:00Z
    """
    body = {"version": version, "device_class": device_class, "start": start, "end": end}
    try:
        DriftPin.model_validate(body)
    except ValueError as exc:
        raise ConfigError(
            f"--start and --end must be RFC 3339 times with a zone, e.g. 2025-06-01T00:00:00Z ({exc})"
        ) from None
    with client(server_url, token) as api:
        pinned = api._one(DriftReferencePublic, "PUT", "/drift/reference", json=body)
    if json_out:
        print_json(pinned.model_dump(mode="json"))
        return
    console.print(f"pinned the reference of {version} on {device_class}: {pinned.since} .. {pinned.until}")


@app.command("unpin")
def unpin(
    version: str = VersionArg,
    device_class: str = ClassArg,
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Remove the pinned reference of (version, class): the version's first days are its reference again.

    Example: slmops drift unpin tiny@v2 cpu-8g
    """
    params = {"version": version, "device_class": device_class}
    with client(server_url, token) as api:
        removed = api._one(DriftReferencePublic, "DELETE", "/drift/reference", params=params)
    if json_out:
        print_json(removed.model_dump(mode="json"))
        return
    console.print(f"unpinned {version} on {device_class} (was {removed.since} .. {removed.until})")
