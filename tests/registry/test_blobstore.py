"""One blob-store suite, run against every backend: the blob directory and S3 (a real moto server on loopback)."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmops.config import Settings
from slmops.errors import IntegrityError, NotFoundError
from slmops.registry.blobstore import BlobStore, DirectoryBlobStore, open_blob_store
from slmops.registry.s3store import S3BlobStore
from tests.s3_server import ACCESS_KEY, SECRET_KEY, MotoServer

PART = 5 << 20  # the smallest multipart part S3 allows: blobs above it go up in several parts


@dataclass
class Backend:
    kind: str
    tmp: pytest.TempPathFactory
    s3: MotoServer | None = None
    bucket: str = ""

    def settings(self) -> Settings:
        """Settings of a fresh, empty store (a new directory, or a new prefix in the test's bucket)."""
        home = self.tmp.mktemp("home")
        if self.s3 is None:
            return Settings(home=home)
        return Settings(
            home=home,
            blob_url=f"s3://{self.bucket}/run-{secrets.token_hex(4)}",
            s3_endpoint_url=self.s3.url,
            s3_access_key_id=ACCESS_KEY,
            s3_secret_access_key=SECRET_KEY,
            s3_part_bytes=PART,
        )

    def open(self, chosen: Settings | None = None) -> BlobStore:
        store = open_blob_store(chosen or self.settings())
        store.initialize()
        return store

    @staticmethod
    def env(chosen: Settings) -> dict[str, str]:
        """The SLMOPS_ variables that open the same store in another process."""
        values = chosen.model_dump(exclude_defaults=True)
        env = {f"SLMOPS_{key.upper()}": str(value) for key, value in values.items()}
        if chosen.s3_secret_access_key is not None:
            env["SLMOPS_S3_SECRET_ACCESS_KEY"] = chosen.s3_secret_access_key.get_secret_value()
        return env

    def leftovers(self, store: BlobStore) -> list[str]:
        """What unfinished writes left behind: temp files, and (S3) incomplete multipart uploads."""
        if isinstance(store, DirectoryBlobStore):
            return [p.name for p in (store.root / "sha256").iterdir() if p.name.startswith(".tmp-")]
        assert isinstance(store, S3BlobStore) and self.s3 is not None
        found = [p.name for p in (store.root / "sha256").iterdir() if p.name.startswith(".tmp-")]
        found += [p.name for p in store.root.iterdir() if p.name.startswith(".spool-")]
        answer = self.s3.client().list_multipart_uploads(Bucket=self.bucket, Prefix=store.config.prefix)
        return found + [u["Key"] for u in answer.get("Uploads", [])]


@pytest.fixture(params=["directory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    if request.param == "directory":
        return Backend("directory", tmp_path_factory)
    server: MotoServer = request.getfixturevalue("s3")
    return Backend("s3", tmp_path_factory, server, server.new_bucket())


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3 << 20))
def test_a_stored_blob_is_named_by_its_sha256_and_reads_back(backend: Backend, data: bytes) -> None:
    store = backend.open()
    ref = store.put_stream(io.BytesIO(data))
    assert ref.digest == _digest(data)
    assert ref.size == len(data)
    with store.open(ref.digest) as handle:
        assert handle.read() == data
    assert list(store.digests()) == [ref.digest]
    assert store.has(ref.digest) and store.size(ref.digest) == len(data)


@pytest.mark.parametrize("size", [4, 2 * PART + 123], ids=["one-part", "multipart"])
def test_a_wrong_expected_digest_stores_nothing(backend: Backend, size: int) -> None:
    store = backend.open()
    evil = os.urandom(size)
    with pytest.raises(IntegrityError, match="does not match"):
        store.put_stream(io.BytesIO(evil), expected_digest=_digest(b"good"))
    assert list(store.digests()) == []
    assert not store.has(_digest(b"good")) and not store.has(_digest(evil))
    assert backend.leftovers(store) == []


def test_large_blobs_round_trip_and_files_are_not_uploaded_twice(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(2 * PART + 4567)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    store = backend.open()
    seen: list[int] = []

    first = store.put_file(source, progress=seen.append)
    again = store.put_file(source, expected_digest=first.digest, progress=seen.append)

    assert first.digest == again.digest == _digest(data) and first.size == again.size == len(data)
    assert sum(seen) == 2 * len(data)
    assert store.verify(first.digest).digest == first.digest
    assert store.local_path(first.digest).read_bytes() == data
    with store.open(first.digest) as handle:
        assert handle.read(10) == data[:10] and handle.read() == data[10:]
    assert abs(store.modified_at(first.digest) - time.time()) < 60
    assert backend.leftovers(store) == []


def test_delete_removes_the_blob_and_is_idempotent(backend: Backend) -> None:
    store = backend.open()
    ref = store.put_stream(io.BytesIO(b"to be deleted"))
    store.local_path(ref.digest)

    store.delete(ref.digest)
    store.delete(ref.digest)

    assert not store.has(ref.digest) and list(store.digests()) == []
    with pytest.raises(NotFoundError):
        store.local_path(ref.digest)


def test_unknown_blob_is_a_clear_not_found(backend: Backend) -> None:
    store = backend.open()
    missing = _digest(b"x")
    for call in (store.open, store.size, store.local_path, store.verify, store.modified_at):
        with pytest.raises(NotFoundError, match="is not in"):
            call(missing)
    assert not store.has(missing)
    with pytest.raises(NotFoundError, match="not a blob digest"):
        store.open("md5:abc")


def _write_same(chosen: Settings, data: bytes) -> str:
    return open_blob_store(chosen).put_stream(io.BytesIO(data)).digest


def test_two_processes_writing_the_same_blob_both_succeed(backend: Backend) -> None:
    chosen = backend.settings()
    store = backend.open(chosen)
    data = os.urandom(PART + 1000)
    with ProcessPoolExecutor(max_workers=2) as pool:
        digests = list(pool.map(_write_same, [chosen] * 4, [data] * 4))
    assert set(digests) == {_digest(data)}
    assert store.verify(_digest(data)).digest == _digest(data)
    assert list(store.digests()) == [_digest(data)]
    assert backend.leftovers(store) == []


_SLOW_WRITER = """
import io, sys, time
from slmops.config import Settings
from slmops.registry.blobstore import open_blob_store

class Slow(io.RawIOBase):
    def __init__(self):
        self.left = 64
    def readable(self):
        return True
    def read(self, n=-1):
        if self.left == 0:
            return b""
        self.left -= 1
        if self.left == 60:
            print("writing", flush=True)
        time.sleep(0.05)
        return b"x" * 131072

store = open_blob_store(Settings())
store.put_stream(Slow(), expected_digest=sys.argv[1])
print("done", flush=True)
"""


@pytest.mark.parametrize("kill_after_s", [0.0, 0.3, 1.5, 5.0])
def test_a_writer_killed_mid_write_leaves_the_blob_absent_or_complete(backend: Backend, kill_after_s: float) -> None:
    chosen = backend.settings()
    store = backend.open(chosen)
    expected = _digest(b"x" * 131072 * 64)  # 8 MiB: more than one S3 part
    with subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, expected],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **backend.env(chosen)},
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(kill_after_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    present = list(store.digests())
    assert present in ([], [expected])
    if present:
        assert store.verify(expected).digest == expected
    else:
        assert not store.has(expected)
    # what the dead writer left is never listed, and sweeping removes it
    store.sweep_temporary(older_than_s=0, now=time.time() + 5)
    assert backend.leftovers(store) == []


def test_sweeping_spares_young_leftovers(backend: Backend) -> None:
    chosen = backend.settings()
    store = backend.open(chosen)
    if isinstance(store, S3BlobStore):
        assert backend.s3 is not None
        client, key = backend.s3.client(), store._key(_digest(b"young"))
        upload = client.create_multipart_upload(Bucket=backend.bucket, Key=key)["UploadId"]
        # with a part: moto reports every upload as initiated in 2010, but its parts' times are real
        client.upload_part(Bucket=backend.bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"half")
    else:
        (store.root / "sha256" / ".tmp-young").write_bytes(b"half")

    assert store.sweep_temporary(older_than_s=3600) == 0
    assert len(backend.leftovers(store)) == 1
    assert store.sweep_temporary(older_than_s=0, now=time.time() + 5) == 1
    assert backend.leftovers(store) == []


def test_stored_blobs_are_read_only(tmp_path: Path) -> None:
    store = DirectoryBlobStore(tmp_path)
    store.initialize()
    ref = store.put_stream(io.BytesIO(b"abc"))
    assert store.path(ref.digest).stat().st_mode & 0o222 == 0
    assert store.presigned_url(ref.digest, 60) is None  # the control plane serves directory blobs itself
