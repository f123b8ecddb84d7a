"""The control plane as a TUF repository, over real HTTP on loopback: the operator's offline roles made and
uploaded with `slmops keys tuf`, the online roles signed and refreshed by the server, read with a device
credential by the device's TUF client, and uploads that do not verify refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from slmops.agent.client import ControlPlaneClient
from slmops.cli import run
from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.enrollment import create_enrollment_token, enroll_device
from slmops.control.plane import ControlPlane
from slmops.control.settings import ServerSettings
from slmops.core.manifest import SignedManifest
from slmops.core.wire import Capabilities, EnrollRequest
from slmops.registry.signing import format_public_key, key_id_for, parse_public_key
from slmops.tuf import metadata as tufmd
from slmops.tuf.client import TufClient, TufRejectedError
from slmops.tuf.keys import load_signer
from slmops.tuf.offline import OfflineRepo
from slmops.tuf.pin import verify_root_pin
from tests.agent.simulator import SimServer
from tests.tiny_gguf import write_tiny_gguf

HWID = "x86_64-8gb"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Served:
    plane: ControlPlane
    url: str
    admin: str
    clock: Clock
    v1: SignedManifest
    v2: SignedManifest

    def http(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=10)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    home = tmp_path / "home"
    monkeypatch.setenv("SLMOPS_HOME", str(home))
    clock = Clock()
    plane = ControlPlane.open(ServerSettings(home=home, rollout_controller=False, ui=False, metrics=False), clock)
    plane.registry.keys.ensure_signing_key()
    v1 = plane.registry.import_model(write_tiny_gguf(tmp_path / "m1" / "tiny.gguf", seed=1), "tiny").envelope
    v2 = plane.registry.import_model(write_tiny_gguf(tmp_path / "m2" / "tiny.gguf", seed=2), "tiny").envelope
    admin = create_api_token(plane, "admin", "admin", "test").token
    server = SimServer(create_app(plane=plane)).start()
    monkeypatch.setenv("SLMOPS_SERVER_URL", server.url)
    monkeypatch.setenv("SLMOPS_TOKEN", admin)
    try:
        yield Served(plane, server.url, admin, clock, v1, v2)
    finally:
        server.stop()
        plane.close()


def _enroll(served: Served) -> tuple[str, list[str]]:
    token = create_enrollment_token(
        served.plane, max_uses=1, expires_in_s=None, auto_approve=True, labels={}, created_by="test"
    ).token
    caps = Capabilities(memory_bytes=8 << 30, disk_free_bytes=1 << 30, cpu_cores=2, arch="x86_64")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = format_public_key(Ed25519PrivateKey.generate().public_key()).strip()
    answer = enroll_device(served.plane, EnrollRequest(token=token, public_key=public, capabilities=caps))
    assert answer.credential is not None
    return answer.credential, answer.trusted_keys


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    code = run(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err + out.out
    return out.out


def _device_client(client: ControlPlaneClient, tmp_path: Path, trusted: list[str]) -> TufClient:
    """The migration path: a device that trusts only its enrollment keys installs the pinned root."""
    pin = client.tuf_root_pin()
    assert pin is not None
    keys = {key_id_for(parse_public_key(k)): parse_public_key(k) for k in trusted}
    tuf = TufClient(tmp_path / "device-tuf", client.tuf_url, client.tuf_fetcher())
    tuf.install_root(verify_root_pin(pin, keys))
    return tuf


def test_tuf_is_off_until_a_root_is_uploaded(served: Served, tmp_path: Path) -> None:
    credential, _ = _enroll(served)
    with served.http(credential) as device:
        assert device.get("/tuf/timestamp.json").status_code == 404
        assert device.get("/tuf/bootstrap").status_code == 404
    with ControlPlaneClient(served.url, credential) as client:
        assert client.tuf_root_pin() is None


def test_offline_roles_from_the_cli_and_online_roles_from_the_server_protect_a_device(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    online = tmp_path / "online.json"
    online.write_text(_cli(capsys, "keys", "tuf", "online-keys"))
    offline = tmp_path / "offline"
    _cli(capsys, "keys", "tuf", "init", str(offline), "--online-keys", str(online), "--root-threshold", "2")
    _cli(capsys, "keys", "tuf", "add-target", str(offline), "tiny@v1", "--hardware-id", HWID)
    uploaded = json.loads(_cli(capsys, "keys", "tuf", "upload", str(offline), "--json"))
    assert [(u["role"], u["version"]) for u in uploaded] == [("root", 1), ("targets", 2)]
    assert not (served.plane.settings.home / "keys" / "tuf-online" / "root-1.key").exists()
    assert sorted(p.name for p in (offline / "keys").iterdir()) == [
        "root-1.key",
        "root-2.key",
        "root-3.key",
        "targets-1.key",
    ]

    credential, trusted = _enroll(served)
    with ControlPlaneClient(served.url, credential) as agent_client:
        _releases_reach_the_device(served, _device_client(agent_client, tmp_path, trusted), credential, offline, capsys)


def _releases_reach_the_device(
    served: Served, device: TufClient, credential: str, offline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verdict = device.check(served.v1.digest, HWID)
    assert (verdict.root_version, verdict.targets_version, verdict.hardware_ids) == (1, 2, [HWID])
    with pytest.raises(TufRejectedError) as caught:
        device.check(served.v2.digest, HWID)
    assert caught.value.check == "not_a_target"

    # the server re-signs the timestamp before it expires; the device accepts the newer one
    with served.http(credential) as http:
        before = http.get("/tuf/timestamp.json").json()["signed"]["version"]
        served.clock.now += timedelta(hours=19)
        after = http.get("/tuf/timestamp.json").json()["signed"]["version"]
        assert after == before + 1
        assert http.get("/tuf/timestamp.json").json()["signed"]["version"] == after  # once, not per read
        assert httpx.get(f"{served.url}/api/v1/tuf/timestamp.json").status_code == 401
    served.clock.now = Clock().now

    # a targets key rotation and a new release: the device walks root v1 -> v2
    _cli(capsys, "keys", "tuf", "rotate", str(offline), "targets")
    _cli(capsys, "keys", "tuf", "add-target", str(offline), "tiny@v2", "--hardware-id", HWID)
    uploaded = json.loads(_cli(capsys, "keys", "tuf", "upload", str(offline), "--json"))
    assert [(u["role"], u["version"]) for u in uploaded] == [("root", 2), ("targets", 3)]
    verdict = TufClient(device.metadata_dir, device.metadata_url, device.fetcher).check(served.v2.digest, HWID)
    assert (verdict.root_version, verdict.targets_version) == (2, 3)

    _cli(capsys, "keys", "tuf", "renew", str(offline), "targets")  # before the 90 days are over
    uploaded = json.loads(_cli(capsys, "keys", "tuf", "upload", str(offline), "--json"))
    assert [(u["role"], u["version"]) for u in uploaded] == [("targets", 4)]
    assert TufClient(device.metadata_dir, device.metadata_url, device.fetcher).check(served.v2.digest, HWID)


def test_uploads_that_do_not_verify_are_refused(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    online = tmp_path / "online.json"
    online.write_text(_cli(capsys, "keys", "tuf", "online-keys"))
    offline = OfflineRepo(tmp_path / "offline")
    now = served.clock()
    offline.init(json.loads(online.read_text()), now, root_keys=3, root_threshold=2)
    with served.http(served.admin) as http:
        below = tufmd.parse(offline.file("root", 1).read_bytes(), "root")
        below.signatures.clear()
        tufmd.sign(below, offline.signers("root")[:1])
        refused = http.put("/tuf/root", content=tufmd.to_bytes(below))
        assert refused.status_code == 422 and "threshold" in refused.json()["message"]
        assert http.put("/tuf/root", content=offline.file("root", 1).read_bytes()).status_code == 200

        forged = offline.add_target(served.v1.manifest.canonical(), [HWID], now)
        forged.signatures.clear()
        tufmd.sign(forged, [load_signer(served.plane.settings.home / "keys" / "tuf-online" / "snapshot.key")])
        refused = http.put("/tuf/targets", content=tufmd.to_bytes(forged))
        assert refused.status_code == 422 and "targets keys" in refused.json()["message"]

        good = offline.file("targets", 2).read_bytes()
        tufmd.sign(forged, offline.signers("targets"))  # re-signed properly: accepted
        assert http.put("/tuf/targets", content=tufmd.to_bytes(forged)).status_code == 200
        stale = http.put("/tuf/targets", content=good)
        assert stale.status_code == 422 and "not newer" in stale.json()["message"]

        unknown = offline.add_target(b'{"not": "a manifest here"}', [HWID], now)
        assert http.put("/tuf/targets", content=tufmd.to_bytes(unknown)).status_code == 404
        assert http.put("/tuf/root", content=b"{not json").status_code == 422

    credential, _ = _enroll(served)
    with served.http(credential) as device:
        assert device.put("/tuf/root", content=offline.file("root", 1).read_bytes()).status_code == 403
        assert device.get("/tuf/online-keys").status_code == 403
        assert device.get("/tuf/1.root.json").content == offline.file("root", 1).read_bytes()
        assert device.get("/tuf/2.root.json").status_code == 404
