"""`slmops alerts`: firing and resolved alerts of the control plane."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from slmops.cli._common import console, print_result
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client
from slmops.control.alerting import AlertPublic
from slmops.errors import ConfigError

__all__ = ["app", "delivery_text"]

app = typer.Typer(help="Alerts evaluated by the control plane.", no_args_is_help=True)

_STATUSES = ("pending", "firing", "resolved")
_STYLES = {"firing": "bold red", "pending": "yellow", "resolved": "green"}


def delivery_text(alert: AlertPublic) -> str:
    """Per webhook and transition: delivered, pending (attempts so far) or refused."""
    parts = []
    for d in alert.deliveries:
        if d.status == "delivered":
            parts.append(f"{d.webhook} {d.kind}: delivered ({d.attempts} attempts)")
        elif d.status == "refused":
            parts.append(f"{d.webhook} {d.kind}: refused ({d.last_error})")
        else:
            tried = f", last error {d.last_error}" if d.last_error else ""
            parts.append(f"{d.webhook} {d.kind}: pending ({d.attempts} attempts{tried})")
    return "; ".join(parts) or "-"


def _print(alerts: list[AlertPublic]) -> None:
    if not alerts:
        console.print("no alerts")
        return
    table = Table("status", "severity", "rule", "labels", "since", "value", "summary", "deliveries")
    for a in alerts:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
        since = a.resolved_at if a.status == "resolved" and a.resolved_at else (a.fired_at or a.active_since)
        table.add_row(
            Text(a.status, style=_STYLES[a.status]),
            a.severity,
            a.rule,
            labels,
            since,
            f"{a.value:.4g}",
            a.summary,
            delivery_text(a),
        )
    console.print(table)


@app.command("list")
def list_(
    status: str | None = typer.Option(None, "--status", help="Only alerts in this status: firing, pending, resolved."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List alerts: firing first (the most severe first), then pending, then recently resolved.

    Example: slmops alerts list --status firing
    """
    if status is not None and status not in _STATUSES:
        raise ConfigError(f"--status must be one of {', '.join(_STATUSES)}; got {status!r}")
    params = {"status": status} if status else {}
    with client(server_url, token) as api:
        found = api._many(AlertPublic, "/alerts", params=params)
    print_result(found, json_out, _print)
