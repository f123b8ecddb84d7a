"""Control-plane fixtures: the database (``engine``, on the shared ``database_url``: SQLite, and PostgreSQL when
SLMOPS_TEST_POSTGRES_URL is set), a controllable clock, a control plane over a real registry, and variants registered
in it.

``plane`` runs each test on every backend: use it for whatever touches the database (repository, plane, rollouts,
API). ``file_plane`` is a SQLite file only, for the few tests that do not exercise the database (the OpenAPI
document, the metrics exposition format).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import Engine

import slmops.control.db  # noqa: F401  (control tables on Base.metadata)
from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from slmops.control.settings import ServerSettings
from slmops.core.manifest import Lineage, ModelFacts, RuntimeHints, SignedManifest, Source
from slmops.core.wire import Capabilities, EnrollRequest, claim_message
from slmops.registry import DirectoryBlobStore, KeyRing, Registry
from slmops.registry.db import make_engine, migrate
from slmops.registry.signing import format_public_key

GiB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The migrated database of ``database_url`` (tests/conftest.py): each test runs on SQLite and PostgreSQL."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_plane(engine: Engine, home: Path, clock: Clock) -> ControlPlane:
    registry = Registry(engine, DirectoryBlobStore(home / "blobs"), KeyRing(home / "keys"), clock=clock)
    registry.initialize()
    registry.keys.ensure_signing_key()
    settings = ServerSettings(home=home, device_offline_after_s=60, device_offline_grace_s=30)
    return ControlPlane(engine, registry, settings, clock)


@pytest.fixture
def plane(engine: Engine, tmp_path: Path, clock: Clock) -> ControlPlane:
    """A control plane on each backend."""
    return make_plane(engine, tmp_path / "home", clock)


@pytest.fixture
def file_plane(tmp_path: Path, clock: Clock) -> Iterator[ControlPlane]:
    """A control plane on a SQLite file only: for tests that do not exercise the database (use ``plane``)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    migrate(engine)
    yield make_plane(engine, tmp_path / "home", clock)
    engine.dispose()


@dataclass
class Device:
    key: Ed25519PrivateKey
    memory_bytes: int = 8 * GiB

    @property
    def public_key(self) -> str:
        return format_public_key(self.key.public_key()).strip()

    def enroll_request(self, token: str, labels: dict[str, str] | None = None) -> EnrollRequest:
        caps = Capabilities(
            memory_bytes=self.memory_bytes, disk_free_bytes=64 * GiB, cpu_cores=4, cpu_flags=["avx2"], arch="x86_64"
        )
        return EnrollRequest(token=token, public_key=self.public_key, capabilities=caps, labels=labels or {})

    def claim_body(self, device_id: str, timestamp: int) -> dict[str, object]:
        signature = base64.b64encode(self.key.sign(claim_message(device_id, timestamp))).decode()
        return {"device_id": device_id, "timestamp": timestamp, "signature": signature}


@pytest.fixture
def new_device() -> Callable[..., Device]:
    def factory(memory_gib: float = 8) -> Device:
        return Device(Ed25519PrivateKey.generate(), int(memory_gib * GiB))

    return factory


@dataclass
class Variants:
    base: SignedManifest  # needs 6 GiB, perplexity 10
    q8: SignedManifest  # needs 3 GiB, perplexity 11
    q4: SignedManifest  # needs 0.8 GiB, perplexity 13


def register_variants(registry: Registry, tmp_path: Path, name: str = "tiny") -> Variants:
    """A base version and two variants derived from it, with measured peak memory and perplexity."""

    def one(tag: str, peak: float, ppl: float, parent: SignedManifest | None, variant: str | None) -> SignedManifest:
        path = tmp_path / f"{name}-{tag}.gguf"
        path.write_bytes(b"GGUF" + secrets.token_bytes(3000))
        result = registry.register(
            name,
            "gguf",
            {f"{name}.gguf": path},
            facts=ModelFacts(),
            runtime=RuntimeHints(),
            weight_bytes=path.stat().st_size,
            source=Source(kind="file", origin=str(path)),
            lineage=Lineage(parents=[parent.digest]) if parent else None,
            variant=variant,
            metrics={"peak_rss_bytes": peak * GiB, "perplexity": ppl},
        )
        return result.envelope

    base = one("base", 6, 10.0, None, None)
    return Variants(base, one("q8", 3, 11.0, base, "q8_0"), one("q4", 0.8, 13.0, base, "q4_k_m"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(plane: ControlPlane) -> Iterator[TestClient]:
    """The control plane's HTTP API on ``plane`` (in-process)."""
    with TestClient(create_app(plane.settings, plane), base_url="http://control") as client:
        yield client


@pytest.fixture
def admin(plane: ControlPlane) -> dict[str, str]:
    """An admin operator's Authorization header."""
    return bearer(create_api_token(plane, "root", "admin", "test").token)
