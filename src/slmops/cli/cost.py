"""`slmops cost`: tokens served on the edge priced against hosted models, beside the edge's own cost."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import typer
from rich.table import Table

from slmops.cli._common import console, print_json
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client
from slmops.control.costs import CostReportPublic, CostRowPublic, FigurePublic

__all__ = ["cost", "render_svg"]

_COLORS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7")
_EDGE_COLOR = "#2f4b2f"


class _Sources:
    """Footnotes: each distinct source gets a number, each number cell shows it."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def cite(self, figure: FigurePublic | None, text: str) -> str:
        if figure is None:
            return "-"
        number = self.numbers.setdefault(figure.source, len(self.numbers) + 1)
        return f"{text} [{number}]"


def _usd(value: float) -> str:
    if value == 0 or abs(value) >= 1:
        return f"${value:,.2f}"
    return f"${value:,.4f}" if abs(value) >= 0.01 else f"${value:.3g}"


def _label(row: CostRowPublic) -> str:
    return f"{row.month} {row.site} {row.device_class} {row.version}"


def _print(report: CostReportPublic) -> None:
    console.print(f"telemetry windows starting {report.since} .. {report.until}; prices: {report.price_table}")
    console.print(f"price table source: {report.source}")
    if not report.rows:
        console.print("no telemetry in this time range")
        return
    models = list(report.cloud_usd)
    sources = _Sources()
    table = Table("month", "site", "class", "version", "devices", "requests", "input tok", "output tok", "busy s")
    table.add_column("edge $")
    for name in models:
        table.add_column(f"cloud $ {name}")
    for r in report.rows:
        cells = [
            r.month,
            r.site,
            r.device_class,
            r.version,
            sources.cite(r.devices, f"{r.devices.value:,.0f}"),
            sources.cite(r.requests, f"{r.requests.value:,.0f}"),
            sources.cite(r.input_tokens, f"{r.input_tokens.value:,.0f}"),
            sources.cite(r.output_tokens, f"{r.output_tokens.value:,.0f}"),
            sources.cite(r.busy_s, f"{r.busy_s.value:,.1f}"),
        ]
        edge = "-"
        if r.edge_usd is not None and r.edge_hardware_usd is not None and r.edge_energy_usd is not None:
            hardware = sources.cite(r.edge_hardware_usd, _usd(r.edge_hardware_usd.value))
            energy = sources.cite(r.edge_energy_usd, _usd(r.edge_energy_usd.value))
            edge = f"{_usd(r.edge_usd.value)} = {hardware} hw + {energy} energy"
        cells.append(edge)
        cells.extend(sources.cite(r.cloud_usd.get(name), _usd(r.cloud_usd[name].value)) for name in models)
        table.add_row(*cells)
    totals = ["total", "", "", "", "", "", "", "", ""]
    totals.append(sources.cite(report.edge_usd, _usd(report.edge_usd.value)) if report.edge_usd else "-")
    totals.extend(sources.cite(report.cloud_usd[name], _usd(report.cloud_usd[name].value)) for name in models)
    table.add_row(*totals, style="bold")
    console.print(table)
    console.print("where each number comes from:")
    for text, number in sources.numbers.items():
        console.print(f"  [{number}] {text}", markup=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)


def render_svg(report: CostReportPublic) -> str:
    """A bar chart, one group per (month, site, class, version): the edge's cost beside each hosted model's price.
    Static SVG (no script); each bar's tooltip (``<title>``) names the number's source."""
    models = list(report.cloud_usd)
    series = ["edge", *models]
    colors = {"edge": _EDGE_COLOR, **{m: _COLORS[i % len(_COLORS)] for i, m in enumerate(models)}}
    bar_w, gap, left, top, plot_h = 18, 24, 80, 50, 260
    group_w = bar_w * len(series) + gap
    width = left + max(1, len(report.rows)) * group_w + 40
    height = top + plot_h + 150 + 18 * len(series)
    values = [f.value for r in report.rows for f in [r.edge_usd, *r.cloud_usd.values()] if f is not None]
    top_value = max([v for v in values if v > 0], default=1.0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>slmops cost {escape(report.since)} .. {escape(report.until)}</title>",
        f'<text x="{left}" y="20" font-size="14">Edge cost vs hosted models (USD), telemetry windows '
        f"{escape(report.since)} .. {escape(report.until)}</text>",
        f'<text x="{left}" y="36" fill="#555">prices: {escape(report.price_table)} ({escape(report.source)})</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 20}" y2="{top + plot_h}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>',
    ]
    for i in range(5):
        value = top_value * i / 4
        y = top + plot_h - plot_h * i / 4
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(_usd(value))}</text>')
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 20}" y2="{y:.1f}" stroke="#ddd"/>')
    for g, row in enumerate(report.rows):
        x0 = left + gap / 2 + g * group_w
        figures: list[FigurePublic | None] = [row.edge_usd, *(row.cloud_usd.get(m) for m in models)]
        for s, (name, figure) in enumerate(zip(series, figures, strict=True)):
            if figure is None:
                continue
            h = max(0.0, figure.value) / top_value * plot_h
            x, y = x0 + s * bar_w, top + plot_h - h
            tip = escape(f"{name}: {_usd(figure.value)} -- {figure.source}")
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2}" height="{h:.1f}" fill="{colors[name]}">'
                f"<title>{tip}</title></rect>"
            )
        cx, cy = x0 + bar_w * len(series) / 2, top + plot_h + 12
        out.append(
            f'<text x="{cx:.1f}" y="{cy}" text-anchor="end" transform="rotate(-35 {cx:.1f} {cy})">'
            f"{escape(_label(row))}</text>"
        )
    legend_y = top + plot_h + 130
    for s, name in enumerate(series):
        y = legend_y + 18 * s
        text = (
            "edge: device price amortized + energy (price table x telemetry busy time)"
            if name == "edge"
            else (f"cloud {name}: tokens served x price table")
        )
        out.append(f'<rect x="{left}" y="{y - 10}" width="12" height="12" fill="{colors[name]}"/>')
        out.append(f'<text x="{left + 18}" y="{y}">{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def cost(
    since: str | None = typer.Option(
        None, "--since", help="RFC 3339 start (default the first day of the month two months before --until)."
    ),
    until: str | None = typer.Option(None, "--until", help="RFC 3339 end (default now)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a bar chart (SVG) of edge vs cloud cost here."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """What serving on the edge cost per site, class, version and month, against hosted models' prices.

    Tokens and busy time come from telemetry; prices and device costs from the server's price table
    (SLMOPS_PRICE_TABLE_FILE, or the shipped example). Every number cites its source.

    Example: slmops cost --since 2025-06-01T00:00:00Z --plot cost.svg
    """
    params = {**({"since": since} if since else {}), **({"until": until} if until else {})}
    with client(server_url, token) as api:
        report = api._one(CostReportPublic, "GET", "/cost", params=params)
    if plot is not None:
        tmp = plot.with_name(plot.name + ".tmp")
        tmp.write_text(render_svg(report), encoding="utf-8")
        tmp.replace(plot)
    if json_out:
        print_json(report.model_dump(mode="json"))
        return
    _print(report)
    if plot is not None:
        console.print(f"wrote {plot}")
