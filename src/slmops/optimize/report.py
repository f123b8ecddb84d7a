"""The variant report: one row per version in a model's lineage, and a Pareto plot of size against perplexity.

Rows of every runtime sit together: a GGUF variant and an ONNX Runtime GenAI export of the same source are measured
on the same token ids (see :mod:`slmops.optimize.evaluate`), and ``runtime`` says which one serves each row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmops.config import Settings
from slmops.core.candidates import runtime_of
from slmops.core.lineage import LineageNode, step_summary
from slmops.errors import MissingExtraError
from slmops.registry.service import Registry

__all__ = ["ReportRow", "pareto_frontier", "report_rows", "write_pareto_png"]


@dataclass(frozen=True)
class ReportRow:
    name: str
    version: str
    digest: str
    variant: str | None
    quantization: str | None
    step: str
    size_bytes: int
    perplexity: float | None
    delta_perplexity_pct: float | None  # vs the root (source) version of the lineage
    accuracy: float | None
    peak_rss_bytes: float | None
    decode_tokens_per_s: float | None
    is_source: bool
    metrics_from: str  # "manifest", "last optimize run" (a source's manifest cannot change) or "none"
    runtime: str | None = "llama.cpp"  # what serves it: llama.cpp (GGUF), onnxruntime-genai, or None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _flatten(nodes: Sequence[LineageNode]) -> list[tuple[LineageNode, LineageNode]]:
    """(node, its root) for every node, depth first."""
    out: list[tuple[LineageNode, LineageNode]] = []

    def walk(node: LineageNode, root: LineageNode) -> None:
        out.append((node, root))
        for child in node.children:
            walk(child, root)

    for root in nodes:
        walk(root, root)
    return out


def report_rows(registry: Registry, name: str, settings: Settings | None = None) -> list[ReportRow]:
    from slmops.optimize.runner import source_metrics_for

    def metrics_of(node: LineageNode) -> tuple[dict[str, float], str]:
        if node.manifest.metrics:
            return dict(node.manifest.metrics), "manifest"
        recorded = source_metrics_for(node.envelope.digest, settings)
        if recorded is not None:
            return dict(recorded["metrics"]), "last optimize run"
        return {}, "none"

    rows: list[ReportRow] = []
    for node, root in _flatten(registry.lineage(name)):
        metrics, origin = metrics_of(node)
        root_ppl = metrics_of(root)[0].get("perplexity")
        ppl = metrics.get("perplexity")
        delta = (ppl / root_ppl - 1) * 100 if ppl is not None and root_ppl else None
        m = node.manifest
        rows.append(
            ReportRow(
                name=m.name,
                version=m.version,
                digest=node.envelope.digest,
                variant=m.variant,
                quantization=m.facts.quantization,
                step=step_summary(m),
                size_bytes=m.total_size,
                perplexity=ppl,
                delta_perplexity_pct=delta,
                accuracy=metrics.get("accuracy"),
                peak_rss_bytes=metrics.get("peak_rss_bytes"),
                decode_tokens_per_s=metrics.get("decode_tokens_per_s"),
                is_source=node is root,
                metrics_from=origin,
                runtime=runtime_of(m),
            )
        )
    return rows


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better on both), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    frontier: list[int] = []
    best_y = float("inf")
    for i in order:
        if points[i][1] < best_y:
            frontier.append(i)
            best_y = points[i][1]
    return frontier


def write_pareto_png(rows: Sequence[ReportRow], path: Path, title: str) -> int:
    """Size (MiB) against perplexity, the frontier marked; returns how many variants were plotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise MissingExtraError("optimize", "drawing the Pareto plot", "matplotlib") from None

    plotted = [r for r in rows if r.perplexity is not None]
    points = [(r.size_bytes / (1 << 20), float(r.perplexity or 0.0)) for r in plotted]
    frontier = pareto_frontier(points)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        others = [i for i in range(len(points)) if i not in frontier]
        ax.scatter([points[i][0] for i in others], [points[i][1] for i in others], color="#999999", s=40,
                   label="dominated", zorder=2)  # fmt: skip
        ax.plot([points[i][0] for i in frontier], [points[i][1] for i in frontier], "-o", color="#d62728",
                markersize=7, label="Pareto frontier", zorder=3)  # fmt: skip
        crowded: list[float] = []  # x of labels already placed, to stack labels of near-equal sizes
        for i in sorted(range(len(plotted)), key=lambda k: (points[k][0], -points[k][1])):
            label = plotted[i].variant or f"{plotted[i].version} (source)"
            stacked = sum(1 for x in crowded if abs(x - points[i][0]) <= 0.04 * max(x, 1.0))
            crowded.append(points[i][0])
            ax.annotate(label, points[i], textcoords="offset points", xytext=(6, 6 - 13 * stacked), fontsize=9)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel("perplexity, log scale (lower is better)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
    return len(plotted)
