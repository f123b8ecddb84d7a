from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from slmops.tuf.client import HttpxFetcher, TufClient
from tests.agent.conftest import models  # noqa: F401  (the tiny GGUF versions, for the agent tests)
from tests.tuf.repo import Repo, RepoServer

HWID = "x86_64-8gb"


@pytest.fixture
def repo() -> Repo:
    return Repo(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def server(repo: Repo) -> Iterator[RepoServer]:
    with RepoServer(repo).running() as running:
        yield running


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture
def make_client(tmp_path: Path, server: RepoServer, http: httpx.Client, repo: Repo) -> Iterator[object]:
    def make() -> TufClient:
        client = TufClient(tmp_path / "tuf", server.url, HttpxFetcher(http))
        if not client.has_root():
            client.install_root(repo.root_bytes)
        return client

    yield make
