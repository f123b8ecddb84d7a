"""Charts drawn on the server as SVG (no script, no library): the Pareto plot of size against perplexity, a drift
signal's PSI per step against its reference, and cloud against edge cost as bars.

Every text in a chart is escaped; the SVG is returned as :class:`markupsafe.Markup` so templates embed it as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from markupsafe import Markup, escape

from slmops.optimize.report import pareto_frontier

__all__ = ["Bar", "ParetoPoint", "PointStatus", "bars_svg", "pareto_svg", "psi_svg"]

PointStatus = Literal["frontier", "dominated", "too big"]
_COLOURS = {"frontier": "#c0392b", "dominated": "#7f8c8d", "too big": "#d5d8dc"}


@dataclass(frozen=True)
class ParetoPoint:
    label: str
    size_bytes: int
    perplexity: float
    fits: bool = True  # fits the class's memory budget
    running: int = 0  # devices of the class running it now


def statuses(points: Sequence[ParetoPoint]) -> list[PointStatus]:
    """Each point's status: on the frontier of the points that fit, dominated by one, or too big for the class."""
    fitting = [i for i, p in enumerate(points) if p.fits]
    frontier = {fitting[k] for k in pareto_frontier([(points[i].size_bytes, points[i].perplexity) for i in fitting])}
    return ["too big" if not p.fits else "frontier" if i in frontier else "dominated" for i, p in enumerate(points)]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def pareto_svg(points: Sequence[ParetoPoint], title: str, width: int = 560, height: int = 320) -> Markup:
    """Size on disk (MiB, x) against perplexity (y, lower is better); the frontier joined by a line."""
    left, right, top, bottom = 60, 20, 30, 45
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'preserveAspectRatio="xMidYMid meet" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{left}" y="18" class="chart-title">{escape(title)}</text>',
    ]
    if not points:
        parts.append(f'<text x="{left}" y="{top + plot_h / 2:.0f}">no evaluated variant</text></svg>')
        return Markup("".join(parts))
    xs = [p.size_bytes / (1 << 20) for p in points]
    ys = [p.perplexity for p in points]
    x_low, x_high = min(0.0, min(xs)), max(xs) * 1.1 or 1.0
    y_pad = (max(ys) - min(ys)) * 0.15 or max(abs(max(ys)) * 0.1, 0.5)
    y_low, y_high = min(ys) - y_pad, max(ys) + y_pad

    def sx(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y_low) / (y_high - y_low) * plot_h

    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="chart-frame"/>')
    for x in _ticks(x_low, x_high):
        parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{top + plot_h}" class="grid"/>')
        parts.append(
            f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">{_fmt(x)}</text>'
        )
    for y in _ticks(y_low, y_high):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" class="tick" text-anchor="end">{_fmt(y)}</text>')
    parts.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle" class="axis">'
        "size on disk (MiB)</text>"
    )
    parts.append(
        f'<text x="14" y="{top + plot_h / 2:.0f}" text-anchor="middle" class="axis" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.0f})">perplexity (lower is better)</text>'
    )
    status = statuses(points)
    line = sorted((xs[i], ys[i]) for i in range(len(points)) if status[i] == "frontier")
    if len(line) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
        parts.append(f'<polyline points="{path}" class="frontier" stroke="{_COLOURS["frontier"]}"/>')
    for i, point in enumerate(points):
        colour = _COLOURS[status[i]]
        cx, cy = sx(xs[i]), sy(ys[i])
        tip = f"{point.label}: {xs[i]:.1f} MiB, perplexity {ys[i]:.4g} ({status[i]})"
        if point.running:
            tip += f"; {point.running} devices run it"
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="9" class="running"/>')
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{colour}" class="point" data-status="{status[i]}">'
            f"<title>{escape(tip)}</title></circle>"
        )
        parts.append(f'<text x="{cx + 8:.1f}" y="{cy - 7:.1f}" class="point-label">{escape(point.label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _open(title: str, width: int, height: int, left: int) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'preserveAspectRatio="xMidYMid meet" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{left}" y="18" class="chart-title">{escape(title)}</text>',
    ]


def psi_svg(
    values: Sequence[float | None],
    labels: Sequence[str],
    title: str,
    *,
    warn: float,
    alert: float,
    began: int | None = None,
    width: int = 560,
    height: int = 200,
) -> Markup:
    """PSI per monitored step (``None``: too few samples, drawn as a gap), the warn and alert thresholds as dashed
    lines, and the step where the shift began (``began``, an index into ``values``) as a vertical line."""
    left, right, top, bottom = 50, 20, 30, 35
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = _open(title, width, height, left)
    known = [v for v in values if v is not None]
    if not known:
        parts.append(f'<text x="{left}" y="{top + plot_h / 2:.0f}">no step with enough samples yet</text></svg>')
        return Markup("".join(parts))
    y_high = max(max(known), alert) * 1.15
    step = plot_w / max(len(values) - 1, 1)

    def sx(i: int) -> float:
        return left + i * step if len(values) > 1 else left + plot_w / 2

    def sy(y: float) -> float:
        return top + plot_h - min(y, y_high) / y_high * plot_h

    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="chart-frame"/>')
    for y in _ticks(0.0, y_high, 4):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" class="tick" text-anchor="end">{_fmt(y)}</text>')
    for name, level in (("warn", warn), ("alert", alert)):
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(level):.1f}" y2="{sy(level):.1f}" '
            f'class="threshold-{name}"/>'
        )
        x, anchor = (left + plot_w - 4, "end") if name == "alert" else (left + 4, "start")
        parts.append(f'<text x="{x}" y="{sy(level) - 3:.1f}" class="tick" text-anchor="{anchor}">{name}</text>')
    if began is not None and 0 <= began < len(values):
        parts.append(f'<line x1="{sx(began):.1f}" x2="{sx(began):.1f}" y1="{top}" y2="{top + plot_h}" class="began"/>')
    run: list[str] = []
    for i, value in enumerate([*values, None]):
        if value is None:
            if len(run) > 1:
                parts.append(f'<polyline points="{" ".join(run)}" class="series"/>')
            run = []
            continue
        run.append(f"{sx(i):.1f},{sy(value):.1f}")
        tip = f"{labels[i] if i < len(labels) else i}: PSI {value:.3g}"
        parts.append(
            f'<circle cx="{sx(i):.1f}" cy="{sy(value):.1f}" r="3" class="series-point">'
            f"<title>{escape(tip)}</title></circle>"
        )
    for i in (0, len(values) - 1):
        if i < len(labels):
            anchor = "start" if i == 0 else "end"
            parts.append(
                f'<text x="{sx(i):.1f}" y="{height - 12}" class="tick" text-anchor="{anchor}">'
                f"{escape(labels[i])}</text>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    kind: str  # a CSS class: "cloud" or "edge"
    note: str = ""  # where the number came from, shown as the bar's tooltip


def bars_svg(bars: Sequence[Bar], title: str, unit: str, width: int = 640) -> Markup:
    """Horizontal bars, one per value, labelled with the value; the tooltip says where each number came from."""
    left, right, top, row = 230, 90, 30, 24
    height = top + row * max(len(bars), 1) + 16
    plot_w = width - left - right
    parts = _open(title, width, height, 10)
    if not bars:
        parts.append(f'<text x="10" y="{top + 16}">nothing to show yet</text></svg>')
        return Markup("".join(parts))
    high = max(b.value for b in bars) or 1.0
    for i, bar in enumerate(bars):
        y = top + i * row
        length = max(bar.value, 0.0) / high * plot_w
        tip = f"{bar.label}: {bar.value:.4g} {unit}" + (f" ({bar.note})" if bar.note else "")
        parts.append(f'<text x="{left - 8}" y="{y + 15}" class="tick" text-anchor="end">{escape(bar.label)}</text>')
        parts.append(
            f'<rect x="{left}" y="{y + 3}" width="{length:.1f}" height="{row - 8}" class="bar bar-{escape(bar.kind)}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        parts.append(
            f'<text x="{left + length + 6:.1f}" y="{y + 15}" class="tick">{bar.value:.4g} {escape(unit)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
