"""Agents download S3-stored blobs from object storage, not from the control plane.

A real control plane (uvicorn on loopback) keeps its blobs in moto's S3 server behind a TCP proxy that the test can
cut; a real enrolled device fetches its model with the agent's downloader. The control plane answers
``GET /api/v1/blobs/{digest}`` with a 307 to a short-lived presigned URL after the same authorization checks as
before; the download is cut mid-body, fails with a clear error, and resumes with ``Range`` from the bytes it has.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.agent.client import ControlPlaneClient
from slmops.agent.download import BlobWant, DownloadConfig, Downloader
from slmops.config import Settings
from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from slmops.control.settings import ServerSettings
from slmops.core.manifest import ModelFacts, RuntimeHints, Source
from slmops.errors import UnavailableError
from slmops.registry.blobstore import DirectoryBlobStore
from tests.agent.simulator import SimServer
from tests.control.conftest import Device
from tests.s3_server import ACCESS_KEY, SECRET_KEY, MotoServer, TcpProxy

BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: all}
spec:
  priority: 0
  selector: {}
  model: {name: tiny, ref: v1}
  variant: {}
"""
FAST = DownloadConfig(backoff_base_s=0.001, backoff_max_s=0.01, max_attempts=3, disk_margin_bytes=0)


@dataclass
class Stack:
    plane: ControlPlane
    proxy: TcpProxy
    url: str
    admin: dict[str, str]
    want: BlobWant
    data: bytes


@pytest.fixture
def stack(s3: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    bucket = s3.new_bucket()
    moto_port = int(s3.url.rsplit(":", 1)[1])
    proxy = TcpProxy(("127.0.0.1", moto_port)).start()
    for key, value in {
        "SLMOPS_BLOB_URL": f"s3://{bucket}/fleet",
        "SLMOPS_S3_ENDPOINT_URL": proxy.url,
        "SLMOPS_S3_ACCESS_KEY_ID": ACCESS_KEY,
        "SLMOPS_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "SLMOPS_S3_PART_BYTES": str(5 << 20),
    }.items():
        monkeypatch.setenv(key, value)
    plane = ControlPlane.open(ServerSettings(rollout_controller=False, blob_url_expires_s=120))
    plane.registry.keys.ensure_signing_key()
    data = b"GGUF" + secrets.token_bytes(12 << 20)  # three S3 parts
    model = tmp_path / "tiny.gguf"
    model.write_bytes(data)
    envelope = plane.registry.register(
        "tiny",
        "gguf",
        {"tiny.gguf": model},
        facts=ModelFacts(),
        runtime=RuntimeHints(),
        weight_bytes=len(data),
        source=Source(kind="file", origin=str(model)),
    ).envelope
    server = SimServer(create_app(plane.settings, plane)).start()
    admin = {"Authorization": f"Bearer {create_api_token(plane, 'root', 'admin', 'test').token}"}
    assert httpx.post(f"{server.url}/api/v1/blueprints", json={"source": BLUEPRINT}, headers=admin).status_code == 200
    entry = envelope.manifest.files[0]
    yield Stack(plane, proxy, server.url, admin, BlobWant(entry.digest, entry.size), data)
    server.stop()
    proxy.stop()
    plane.close()


def _enrolled(stack: Stack) -> tuple[ControlPlaneClient, str]:
    token = httpx.post(
        f"{stack.url}/api/v1/enrollment-tokens", json={"auto_approve": True}, headers=stack.admin
    ).json()["token"]
    client = ControlPlaneClient(stack.url, timeout_s=10)
    device = Device(Ed25519PrivateKey.generate())
    answer = client.enroll(device.enroll_request(token))
    client.credential = answer.credential
    return client, answer.device_id


def test_the_control_plane_redirects_blob_downloads_to_a_short_lived_url_after_the_same_checks(
    stack: Stack,
) -> None:
    client, _ = _enrolled(stack)
    bearer = {"Authorization": f"Bearer {client.credential}"}
    url = f"{stack.url}/api/v1/blobs/{stack.want.digest}"

    answer = httpx.get(url, headers=bearer)
    anonymous = httpx.get(url)
    not_its_blob = httpx.get(f"{stack.url}/api/v1/blobs/sha256:{'0' * 64}", headers=bearer)
    unknown = httpx.get(f"{stack.url}/api/v1/blobs/sha256:{'0' * 64}", headers=stack.admin)
    cached = httpx.get(url, headers={**bearer, "If-None-Match": f'"{stack.want.digest.removeprefix("sha256:")}"'})

    assert answer.status_code == 307 and answer.headers["cache-control"] == "no-store"
    location = answer.headers["location"]
    assert location.startswith(f"{stack.proxy.url}/") and "X-Amz-Expires=120" in location
    assert anonymous.status_code == 401 and not_its_blob.status_code == 403 and unknown.status_code == 404
    assert cached.status_code == 304
    assert httpx.get(location, headers={"Range": "bytes=0-3"}).content == b"GGUF"
    # the control plane keeps no model bytes on its disk
    assert not Settings().blob_dir.exists() and not list(Settings().blob_cache_dir.rglob("*.gguf"))
    client.close()


def test_a_download_cut_at_object_storage_fails_clearly_then_resumes_with_range(stack: Stack, tmp_path: Path) -> None:
    client, device_id = _enrolled(stack)
    desired = client.desired(device_id)
    assert desired.state is not None and desired.state.model is not None
    assert stack.want.digest in {f.digest for f in desired.state.model.envelope.manifest.files}
    cache = DirectoryBlobStore(tmp_path / "cache")
    cache.initialize()
    cut_at: list[int] = []

    def cut_once(digest: str, received: int) -> None:
        if not cut_at and received >= 1 << 20:
            cut_at.append(received)
            stack.proxy.cut()

    single = DownloadConfig(max_attempts=1, disk_margin_bytes=0)
    first = Downloader(client, cache, tmp_path / "partial", single, on_chunk=cut_once)
    with pytest.raises(UnavailableError) as failed:
        first.fetch([stack.want])
    partial = tmp_path / "partial" / (stack.want.digest.removeprefix("sha256:") + ".partial")
    kept = partial.stat().st_size
    assert 0 < kept < stack.want.size and not cache.has(stack.want.digest)

    report = Downloader(client, cache, tmp_path / "partial", FAST).fetch([stack.want])

    assert stack.want.digest in str(failed.value) and "retrying later" in str(failed.value)
    assert report.resumed_from == {stack.want.digest: kept}
    assert report.bytes_received == stack.want.size - kept
    assert cache.verify(stack.want.digest).digest == stack.want.digest
    assert cache.path(stack.want.digest).read_bytes() == stack.data
    presigned = [r for r in stack.proxy.requests if b"X-Amz-Signature=" in r.split(b"\r\n", 1)[0]]
    assert any(f"range: bytes={kept}-".encode() in r.lower() for r in presigned)
    assert not any(b"bearer" in r.lower() for r in stack.proxy.requests)  # the device credential stays home
    client.close()
