"""`slmops telemetry …`: what devices report about a model version, summed per device class (aggregates only)."""

from __future__ import annotations

import typer
from rich.table import Column, Table

from slmops.cli._common import console, print_json
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client
from slmops.core.wire import Histogram
from slmops.telemetry.aggregate import histogram_samples
from slmops.telemetry.schemas import TelemetryRollup

__all__ = ["app", "quantile_ms"]

app = typer.Typer(help="Fleet telemetry: counters and latency histograms per version and device class.")


def quantile_ms(histogram: Histogram, q: float) -> float | None:
    """The ``q`` quantile of a histogram, to bucket resolution (bucket midpoints); None when it is empty."""
    samples = histogram_samples(histogram)
    if not samples:
        return None
    return samples[min(len(samples) - 1, int(q * len(samples)))]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


@app.command("rollup")
def rollup_(
    version: str = typer.Argument(..., help="A version digest (sha256:...) or reference (NAME@VERSION, NAME@ALIAS)."),
    since: str | None = typer.Option(None, "--since", help="RFC 3339 start (default 24 hours before --until)."),
    until: str | None = typer.Option(None, "--until", help="RFC 3339 end (default now)."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Sum a version's telemetry windows per device class: requests, errors, crashes, latency quantiles.

    Example: slmops telemetry rollup tiny@stable --since 2025-06-01T00:00:00Z
    """
    params = {"version": version, **({"since": since} if since else {}), **({"until": until} if until else {})}
    with client(server_url, token) as api:
        result = api._one(TelemetryRollup, "GET", "/telemetry/rollup", params=params)
    if json_out:
        print_json(result.model_dump(mode="json"))
        return
    console.print(f"{result.version_digest}  {result.since} .. {result.until}")
    table = Table(Column("class", no_wrap=True), "devices", "windows", "requests", "errors", "crashes", "rollbacks")
    table.add_column("p50 ms", no_wrap=True)
    table.add_column("p95 ms", no_wrap=True)
    for c in result.classes:
        rate = f"{c.errors} ({c.error_rate:.2%})" if c.error_rate is not None else str(c.errors)
        table.add_row(
            c.device_class,
            str(c.devices),
            str(c.windows),
            str(c.requests),
            rate,
            str(c.crashes),
            str(c.rollbacks),
            _ms(quantile_ms(c.latency_ms, 0.5)),
            _ms(quantile_ms(c.latency_ms, 0.95)),
        )
    console.print(table if result.classes else "no telemetry for this version in this time range")
