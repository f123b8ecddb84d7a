"""What only the S3 store has: presigned URLs, the upload protocol, a verified local cache, and its error messages.
Everything runs against moto's standalone S3 server on loopback (tests/registry/conftest.py)."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path

import httpx
import pytest

from slmops.config import Settings
from slmops.errors import ConfigError, IntegrityError, MissingExtraError, UnavailableError
from slmops.registry import Registry
from slmops.registry.blobstore import open_blob_store
from slmops.registry.s3store import S3BlobStore, parse_s3_url
from tests.s3_server import ACCESS_KEY, SECRET_KEY, MotoServer, moto_server
from tests.servers import free_port
from tests.tiny_gguf import write_tiny_gguf

PART = 5 << 20


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _settings(tmp_path: Path, url: str, endpoint: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "home": tmp_path / "home",
        "blob_url": url,
        "s3_endpoint_url": endpoint,
        "s3_access_key_id": ACCESS_KEY,
        "s3_secret_access_key": SECRET_KEY,
        "s3_part_bytes": PART,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def bucket(s3: MotoServer) -> str:
    return s3.new_bucket()


@pytest.fixture
def store(s3: MotoServer, bucket: str, tmp_path: Path) -> S3BlobStore:
    opened = open_blob_store(_settings(tmp_path, f"s3://{bucket}/models/", s3.url))
    assert isinstance(opened, S3BlobStore)
    opened.initialize()
    return opened


def test_blob_urls_name_a_bucket_and_a_prefix() -> None:
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_s3_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b/")
    for bad in ("s3://", "s3://UPPER/x", "http://bucket/x", "s3://a"):
        with pytest.raises(ConfigError, match="expected s3://BUCKET"):
            parse_s3_url(bad)
    with pytest.raises(ConfigError, match=r"expected s3://BUCKET/PREFIX .* or file:///DIR"):
        open_blob_store(Settings(blob_url="ftp://somewhere"))


def test_blobs_live_under_the_prefix_by_digest(store: S3BlobStore, s3: MotoServer, bucket: str) -> None:
    ref = store.put_stream(io.BytesIO(b"hello"))

    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"models/sha256/{ref.digest.removeprefix('sha256:')}"]


def test_nothing_is_visible_under_the_key_until_the_digest_matched(
    store: S3BlobStore, s3: MotoServer, bucket: str
) -> None:
    data = os.urandom(2 * PART + 10)
    digest = _digest(data)
    seen: list[tuple[bool, int, int]] = []

    class Watched(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            if self.tell() > PART:  # the first part is up: look from outside
                listed = s3.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0)
                uploads = len(s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))
                seen.append((store.has(digest), listed, uploads))
            return super().read(n)

    store.put_stream(Watched(data), expected_digest=digest)

    assert seen and all(entry == (False, 0, 1) for entry in seen)
    assert store.has(digest) and store.verify(digest).digest == digest


def test_a_presigned_url_serves_ranges_without_any_credential(store: S3BlobStore) -> None:
    data = os.urandom(100_000)
    ref = store.put_stream(io.BytesIO(data))
    url = store.presigned_url(ref.digest, 60)

    whole = httpx.get(url)
    tail = httpx.get(url, headers={"Range": "bytes=1000-"})

    assert "X-Amz-Expires=60" in url and "X-Amz-Signature=" in url
    assert whole.status_code == 200 and whole.content == data
    assert tail.status_code == 206 and tail.content == data[1000:]
    assert tail.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"


def test_a_presign_endpoint_names_the_host_devices_reach(s3: MotoServer, bucket: str, tmp_path: Path) -> None:
    chosen = _settings(tmp_path, f"s3://{bucket}", s3.url, s3_presign_endpoint_url="https://blobs.example.org")
    store = open_blob_store(chosen)
    store.initialize()
    ref = store.put_stream(io.BytesIO(b"x"))

    url = store.presigned_url(ref.digest, 60)

    assert url is not None and url.startswith(f"https://blobs.example.org/{bucket}/sha256/")


def test_a_tampered_object_never_reaches_the_local_cache(store: S3BlobStore, s3: MotoServer, bucket: str) -> None:
    ref = store.put_stream(io.BytesIO(b"the real bytes"))
    s3.client().put_object(Bucket=bucket, Key=store._key(ref.digest), Body=b"evil bytes")

    with pytest.raises(IntegrityError, match="does not match"):
        store.local_path(ref.digest)

    assert list(store.cache.digests()) == []
    assert store.verify(ref.digest).digest == _digest(b"evil bytes")


def test_a_missing_bucket_says_how_to_create_it(s3: MotoServer, tmp_path: Path) -> None:
    store = open_blob_store(_settings(tmp_path, "s3://no-such-bucket/x", s3.url))
    with pytest.raises(ConfigError, match=r"bucket 'no-such-bucket' does not exist .* create it"):
        store.initialize()


def test_an_endpoint_that_is_down_is_unavailable_and_names_the_setting(tmp_path: Path) -> None:
    chosen = _settings(tmp_path, "s3://bucket", f"http://127.0.0.1:{free_port()}", s3_max_attempts=1)
    store = open_blob_store(chosen)
    with pytest.raises(UnavailableError, match=r"cannot reach object storage .* SLMOPS_S3_ENDPOINT_URL"):
        store.initialize()
    with pytest.raises(UnavailableError, match="cannot reach object storage"):
        store.has(_digest(b"x"))


def test_wrong_credentials_are_a_config_error_that_names_the_settings(tmp_path: Path) -> None:
    with moto_server(tmp_path / "moto.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as strict:
        store = open_blob_store(_settings(tmp_path, "s3://some-bucket", strict.url, s3_secret_access_key="wrong"))
        with pytest.raises(ConfigError, match=r"refused the credentials .* SLMOPS_S3_ACCESS_KEY_ID"):
            store.initialize()


def test_half_a_credential_and_a_missing_extra_are_clear(
    s3: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="only one of SLMOPS_S3_ACCESS_KEY_ID and SLMOPS_S3_SECRET_ACCESS_KEY"):
        open_blob_store(_settings(tmp_path, "s3://bucket", s3.url, s3_secret_access_key=None))
    store = open_blob_store(_settings(tmp_path, "s3://bucket", s3.url))
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'slmops\[s3\]'"):
        store.initialize()


def test_the_registry_runs_on_s3_from_the_environment(
    s3: MotoServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {
        "SLMOPS_BLOB_URL": f"s3://{bucket}/reg",
        "SLMOPS_S3_ENDPOINT_URL": s3.url,
        "SLMOPS_S3_ACCESS_KEY_ID": ACCESS_KEY,
        "SLMOPS_S3_SECRET_ACCESS_KEY": SECRET_KEY,
    }.items():
        monkeypatch.setenv(key, value)
    registry = Registry.open()
    try:
        registry.keys.init()
        source = write_tiny_gguf(tmp_path / "m" / "tiny.gguf", seed=1)
        envelope = registry.import_model(source, "tiny").envelope
        stray = registry.blobs.put_stream(io.BytesIO(b"nobody refers to me"))
        digest = envelope.manifest.files[0].digest

        assert registry.verify("tiny").ok
        assert not (Settings().blob_dir).exists()  # nothing in the blob directory: the bytes are in the bucket
        local = registry.blob_path(digest)  # a runtime needs a file: a verified copy in the cache
        assert local.read_bytes() == source.read_bytes() and local.is_relative_to(Settings().blob_cache_dir)
        report = registry.gc(grace_s=0)
        assert report.removed == [stray.digest] and report.freed_bytes == len(b"nobody refers to me")
        assert sorted(registry.blobs.digests()) == [digest]
    finally:
        registry.close()
