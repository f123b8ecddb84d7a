"""`slmops cost` against a control plane served by a real uvicorn server on loopback: the table with its sources,
`--json`, and the SVG plot."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_alerts_cli import Control, _json, _out, serve_control
from tests.control.test_costs import TABLE, Served, serve_some

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Control]:
    yield from serve_control(tmp_path, monkeypatch)


@pytest.fixture
def served(control: Control) -> Served:
    result = serve_some(control.plane, control.tmp_path)
    prices = control.tmp_path / "prices.yaml"
    prices.write_text(TABLE.replace("SMALL", result.small))
    control.plane.settings = control.plane.settings.model_copy(update={"price_table_file": prices})
    return result


def test_cost_prints_a_table_with_the_source_of_every_number(
    control: Control, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _out(capsys, ["cost"])

    assert "2025-04-01T00:00:00Z .. 2025-06-01T12:00:00Z" in out
    assert "price table source: test table, 2025-06" in out
    assert "berlin-3" in out and served.small in out and "tiny@v1" in out
    assert "600,000 [" in out and "$1.00 [" in out  # big-cloud: 0.6M x $1 + 0.2M x $2
    sources = [line.strip() for line in out.splitlines() if line.strip().startswith("[")]
    assert any("telemetry: 3 windows of 2 devices, prompt_tokens summed" in s for s in sources)
    assert any("big-cloud price page" in s for s in sources) and any("till spec sheet" in s for s in sources)
    cited = {int(part.split("]")[0]) for part in out.split("[")[1:] if part.split("]")[0].isdigit()}
    assert cited == set(range(1, len(sources) + 1))  # every footnote cited is listed, and none is missing
    assert f"no edge cost for class {served.large}" in out


def test_cost_json_and_the_svg_plot(
    control: Control, served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "cost.svg"

    body = _json(capsys, ["cost", "--since", "2025-06-01T00:00:00Z", "--plot", str(plot)])

    [row] = body["rows"]
    assert row["output_tokens"]["value"] == 200_000 and row["edge_usd"]["unit"] == "USD"
    svg = ET.fromstring(plot.read_text())
    bars = [r for r in svg.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(bars) == 3  # edge, big-cloud, cheap-cloud for the one row
    titles = [r.find(f"{SVG}title").text or "" for r in bars]  # type: ignore[union-attr]
    assert titles[1].startswith("big-cloud: $1.00 -- price table 'big-cloud'")
    assert float(bars[2].get("height", "0")) == pytest.approx(260)  # cheap-cloud, the tallest: $1.10
    assert float(bars[1].get("height", "0")) == pytest.approx(260 * 1.0 / 1.1, abs=0.1)
    assert not list(svg.iter(f"{SVG}script"))
    assert "<" not in _out(capsys, ["cost", "--until", "2025-01-01T00:00:00Z", "--since", "2024-12-01T00:00:00Z"])
