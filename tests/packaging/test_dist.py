"""`python -m build` makes an sdist and a wheel that carry everything slmops reads at run time.

The wheel is built from the sdist (what `python -m build` does), so a file missing from either is caught: every file
under ``src/slmops`` (migrations, templates, the dashboard's static files, optimize/ and telemetry/ data) must be in
the wheel, because the code loads them through importlib.resources or ``Path(__file__)``.
"""

from __future__ import annotations

import email
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.packaging._env import REPO, build_dists, wheel_names


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_dists(tmp_path_factory.mktemp("dist"))


def _source_files() -> set[str]:
    root = REPO / "src"
    return {
        p.relative_to(root).as_posix()
        for p in (root / "slmops").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_the_wheel_holds_every_source_and_data_file(dists: tuple[Path, Path]) -> None:
    wheel, _sdist = dists
    names = wheel_names(wheel)

    missing = sorted(_source_files() - names)

    assert not missing, f"files under src/slmops missing from {wheel.name} (add them to package-data): {missing}"
    for needed in (
        "slmops/registry/migrations/env.py",
        "slmops/registry/migrations/script.py.mako",
        "slmops/ui/static/ui.css",
        "slmops/ui/templates/base.html",
        "slmops/optimize/data/calibration.txt",
        "slmops/telemetry/data/prices.example.yaml",
        "slmops/py.typed",
    ):
        assert needed in names
    assert any(re.fullmatch(r"slmops/registry/migrations/versions/0001_.*\.py", n) for n in names)
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


def test_the_sdist_holds_the_sources_and_the_project_file(dists: tuple[Path, Path]) -> None:
    _wheel, sdist = dists
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}

    missing = sorted(f"src/{name}" for name in _source_files() if f"src/{name}" not in members)

    assert not missing, f"missing from {sdist.name}: {missing}"
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= members


def test_the_metadata_declares_the_agent_extra_and_keeps_the_makefile_extras(dists: tuple[Path, Path]) -> None:
    wheel, _sdist = dists
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    extras = set(metadata.get_all("Provides-Extra") or [])
    makefile_extras = re.search(r"^EXTRAS := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert makefile_extras is not None
    requires = metadata.get_all("Requires-Dist") or []
    agent = {re.split(r"[<>=!\[; ]", r)[0].lower() for r in requires if 'extra == "agent"' in r}
    base = {re.split(r"[<>=!\[; ]", r)[0].lower() for r in requires if "extra ==" not in r}

    assert set(makefile_extras.group(1).split(",")) <= extras
    assert "agent" in extras
    assert {"llama-cpp-python", "fastapi", "uvicorn", "prometheus-client"} <= agent
    assert not ({"torch", "scipy", "transformers", "psycopg"} & (agent | base))
    assert "slmops = slmops.cli:main" in entry_points
