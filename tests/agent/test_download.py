from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.agent.client import ControlPlaneClient
from slmops.agent.download import BlobWant, DownloadConfig, Downloader, full_jitter_delay
from slmops.core.wire import Capabilities, ClaimRequest, EnrollRequest
from slmops.errors import ConflictError, IntegrityError, UnavailableError
from slmops.registry.blobstore import DirectoryBlobStore
from slmops.registry.signing import format_public_key
from tests.agent.conftest import Models
from tests.agent.simulator import BlobBehavior, RunningSim, free_port

FAST = DownloadConfig(backoff_base_s=0.001, backoff_max_s=0.01, max_attempts=3, disk_margin_bytes=0)


@pytest.fixture
def client(sim: RunningSim) -> Iterator[ControlPlaneClient]:
    sim.sim.tokens.add("t")
    with ControlPlaneClient(sim.url, timeout_s=5) as c:
        caps = Capabilities(memory_bytes=1, disk_free_bytes=1, cpu_cores=1)
        key = format_public_key(Ed25519PrivateKey.generate().public_key()).strip()
        c.credential = c.enroll(EnrollRequest(token="t", public_key=key, capabilities=caps)).credential
        yield c


def _want(models: Models) -> BlobWant:
    entry = models.v1.manifest.files[0]
    return BlobWant(entry.digest, entry.size)


def _downloader(client: ControlPlaneClient, tmp_path: Path, **kwargs: object) -> Downloader:
    cache = DirectoryBlobStore(tmp_path / "cache")
    cache.initialize()
    return Downloader(client, cache, tmp_path / "partial", kwargs.pop("config", FAST), **kwargs)  # type: ignore[arg-type]


def test_a_cut_connection_resumes_from_the_last_good_offset(
    sim: RunningSim, models: Models, client: ControlPlaneClient, tmp_path: Path
) -> None:
    want = _want(models)
    cut = 3 * sim.sim.chunk_bytes + 1234
    sim.sim.behaviors[want.digest] = BlobBehavior(cut_after=cut, cuts=1)
    downloader = _downloader(client, tmp_path, rng=random.Random(0))

    report = downloader.fetch([want])

    assert downloader.cache.has(want.digest)
    assert downloader.cache.verify(want.digest).digest == want.digest
    blob_requests = sim.sim.requests_to("/blobs/")
    assert [r.headers.get("range") for r in blob_requests] == [None, f"bytes={cut}-"]
    assert blob_requests[1].headers["if-range"] == f'"{want.digest.removeprefix("sha256:")}"'
    assert blob_requests[1].status == 206
    assert report.resumed_from == {want.digest: cut}
    assert report.bytes_received == want.size
    assert not list((tmp_path / "partial").iterdir())


def test_a_changed_file_restarts_from_zero_and_is_never_spliced(
    sim: RunningSim, models: Models, client: ControlPlaneClient, tmp_path: Path
) -> None:
    want = _want(models)
    good = sim.sim.blob_bytes(want.digest)
    sim.sim.behaviors[want.digest] = BlobBehavior(
        data=b"X" * len(good), etag='"old"', cut_after=2 * sim.sim.chunk_bytes, cuts=1
    )
    downloader = _downloader(client, tmp_path)
    with pytest.raises(UnavailableError):
        _fetch_once(downloader, want)  # one attempt: cut mid-body
    sim.sim.behaviors.pop(want.digest)  # the server now has the right file, under another ETag

    downloader.fetch([want])

    last = sim.sim.requests_to("/blobs/")[-1]
    assert last.headers["range"] == f"bytes={2 * sim.sim.chunk_bytes}-" and last.headers["if-range"] == '"old"'
    assert last.status == 200  # If-Range did not match: the whole new file, written from 0
    assert downloader.cache.verify(want.digest).digest == want.digest


def _fetch_once(downloader: Downloader, want: BlobWant) -> None:
    single = Downloader(downloader.client, downloader.cache, downloader.partial_dir, DownloadConfig(max_attempts=1))
    single.fetch([want])


def test_a_tampered_blob_never_enters_the_cache(
    sim: RunningSim, models: Models, client: ControlPlaneClient, tmp_path: Path
) -> None:
    want = _want(models)
    tampered = bytearray(sim.sim.blob_bytes(want.digest))
    tampered[-10] ^= 0xFF
    sim.sim.behaviors[want.digest] = BlobBehavior(data=bytes(tampered))
    downloader = _downloader(client, tmp_path)

    with pytest.raises(IntegrityError, match="does not match"):
        downloader.fetch([want])

    assert not downloader.cache.has(want.digest)
    assert list(downloader.cache.digests()) == []
    assert len(sim.sim.requests_to("/blobs/")) == FAST.max_attempts
    assert not list((tmp_path / "partial").glob("*.partial"))


def test_cached_blobs_are_not_downloaded_again_and_blobs_download_in_parallel(
    sim: RunningSim, models: Models, client: ControlPlaneClient, tmp_path: Path
) -> None:
    wants = [BlobWant(f.digest, f.size) for m in (models.v1, models.v2) for f in m.manifest.files]
    downloader = _downloader(client, tmp_path)

    first = downloader.fetch(wants)
    second = downloader.fetch(wants)

    assert sorted(first.fetched) == sorted(w.digest for w in wants)
    assert second.fetched == [] and second.attempts == 0
    assert len(sim.sim.requests_to("/blobs/")) == 2


def test_the_free_disk_check_runs_before_any_request(
    sim: RunningSim, models: Models, client: ControlPlaneClient, tmp_path: Path
) -> None:
    want = _want(models)
    downloader = _downloader(client, tmp_path, disk_free=lambda _path: want.size - 1)

    with pytest.raises(UnavailableError, match="not enough free disk"):
        downloader.fetch([want])

    assert sim.sim.requests_to("/blobs/") == []


def test_an_unreachable_server_is_retried_with_backoff_then_fails(models: Models, tmp_path: Path) -> None:
    sleeps: list[float] = []
    with ControlPlaneClient(f"http://127.0.0.1:{free_port()}", "cred", timeout_s=2) as client:
        downloader = _downloader(client, tmp_path, sleep=sleeps.append, rng=random.Random(1))
        with pytest.raises(UnavailableError, match="cannot reach"):
            downloader.fetch([_want(models)])
    assert len(sleeps) == FAST.max_attempts - 1
    assert all(0 <= s <= FAST.backoff_max_s for s in sleeps)


def test_full_jitter_stays_within_the_exponential_envelope() -> None:
    rng = random.Random(3)
    for attempt in range(1, 12):
        delays = [full_jitter_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        cap = min(30.0, 0.5 * 2 ** (attempt - 1))
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # spread over the whole range, not a fixed delay


def test_a_409_answer_is_a_conflict_the_caller_can_tell_apart() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"detail": "claim not newer than the last accepted one"})

    claim = ClaimRequest(device_id="dev-1", timestamp=1_700_000_000, signature="c2ln")
    client = ControlPlaneClient("http://cp.test", transport=httpx.MockTransport(refuse))
    with client, pytest.raises(ConflictError, match=r"\(409\): claim not newer"):
        client.claim(claim)
