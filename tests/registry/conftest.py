from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3_server import MotoServer, moto_server


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto S3 server for the session; each test makes its own bucket (``s3.new_bucket()``)."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server
