"""The device's TUF client (``tuf.ngclient`` + the httpx fetcher) against a static repository on loopback,
mirroring python-tuf's attack tests: rollback, freeze, mix-and-match, fast-forward recovery, root threshold,
another hardware id, and a body longer than declared."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from tuf.ngclient._internal import trusted_metadata_set

from slmops.errors import UnavailableError
from slmops.tuf import metadata as tufmd
from slmops.tuf.client import HttpxFetcher, TufClient, TufRejectedError
from tests.tuf.conftest import HWID
from tests.tuf.repo import Misbehave, Repo, RepoServer

MakeClient = Callable[[], TufClient]


def _manifest(n: int) -> bytes:
    return json.dumps({"name": "tiny", "version": f"v{n}", "files": []}, sort_keys=True).encode()


def _refused(client: TufClient, digest: str, check: str, hwid: str = HWID) -> TufRejectedError:
    with pytest.raises(TufRejectedError) as caught:
        client.check(digest, hwid)
    assert caught.value.check == check, caught.value.message
    return caught.value


def test_a_current_target_for_the_hardware_id_is_accepted_and_fetched(
    repo: Repo, server: RepoServer, make_client: MakeClient, tmp_path: Path
) -> None:
    digest = repo.add(_manifest(1), [HWID, "aarch64-4gb"])
    repo.publish()

    verdict = make_client().check(digest, HWID)

    assert verdict.hardware_ids == ["aarch64-4gb", HWID]
    assert (verdict.targets_version, verdict.snapshot_version, verdict.timestamp_version) == (2, 2, 2)
    fetched = tmp_path / "tuf" / "targets" / f"manifests%2F{digest.removeprefix('sha256:')}.json"
    assert fetched.read_bytes() == _manifest(1)
    paths = [p for p, _ in server.requests]
    assert paths[:4] == ["2.root.json", "timestamp.json", "2.snapshot.json", "2.targets.json"]  # consistent snapshot


def test_a_manifest_that_is_not_a_current_target_is_refused(
    repo: Repo, server: RepoServer, make_client: MakeClient
) -> None:
    old = repo.add(_manifest(1), [HWID])
    repo.publish()
    assert make_client().check(old, HWID)
    tufmd.remove_target(repo.targets, old)  # v1 withdrawn when v2 was released
    repo.add(_manifest(2), [HWID])
    repo.publish()

    error = _refused(make_client(), old, "not_a_target")
    assert "replayed" in error.message


def test_a_target_for_another_hardware_id_is_refused(repo: Repo, server: RepoServer, make_client: MakeClient) -> None:
    digest = repo.add(_manifest(1), ["aarch64-2gb"])
    repo.publish()

    error = _refused(make_client(), digest, "hardware_id")
    assert "aarch64-2gb" in error.message and HWID in error.message


@pytest.mark.parametrize("role", ["timestamp", "snapshot"])
def test_an_older_timestamp_or_snapshot_is_refused_as_a_rollback(
    role: str, repo: Repo, server: RepoServer, make_client: MakeClient
) -> None:
    digest = repo.add(_manifest(1), [HWID])
    repo.publish()
    old_files = dict(repo.files)
    repo.add(_manifest(2), [HWID])
    repo.publish()
    assert make_client().check(digest, HWID).timestamp_version == 3  # the device saw the newest

    if role == "timestamp":  # the attacker serves the timestamp from before
        server.overrides["timestamp.json"] = old_files["timestamp.json"]
    else:  # a fresh timestamp that points at an older snapshot version
        repo.snapshot_version -= 2
        repo.publish_timestamp()
    error = _refused(make_client(), digest, "version")
    assert role in error.message


def test_expired_metadata_installs_nothing_when_the_clock_moves_past_the_timestamp(
    repo: Repo, server: RepoServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = repo.add(_manifest(1), [HWID])
    repo.publish()
    client = make_client()
    assert client.check(digest, HWID)
    later = repo.now + dt.timedelta(days=2)  # past the 1-day timestamp, the server did not re-sign (a freeze)
    fake = SimpleNamespace(datetime=SimpleNamespace(now=lambda tz=None: later), timezone=dt.timezone)
    monkeypatch.setattr(trusted_metadata_set, "datetime", fake)

    error = _refused(make_client(), digest, "expired")
    assert "timestamp" in error.message


def test_targets_that_do_not_match_the_snapshot_are_refused_as_mix_and_match(
    repo: Repo, server: RepoServer, make_client: MakeClient
) -> None:
    digest = repo.add(_manifest(1), [HWID])
    repo.publish()
    v2_targets = repo.files["2.targets.json"]
    repo.add(_manifest(2), [HWID])
    repo.publish()  # targets v3, snapshot v3 naming it
    server.overrides["3.targets.json"] = v2_targets  # an old targets file served where v3 should be

    error = _refused(make_client(), digest, "version")
    assert "targets" in error.message


def test_fast_forward_recovery_after_the_timestamp_key_is_rotated(
    repo: Repo, server: RepoServer, make_client: MakeClient
) -> None:
    digest = repo.add(_manifest(1), [HWID])
    repo.publish()
    repo.timestamp_version = 999  # an attacker with the timestamp key fast-forwards the device
    repo.publish_timestamp()
    assert make_client().check(digest, HWID).timestamp_version == 1000
    repo.timestamp_version = 0  # the legitimate repository is still far below

    repo.publish_timestamp()
    _refused(make_client(), digest, "version")  # before the rotation: refused, the device trusts v1000
    repo.rotate("timestamp")  # root v2 with a new timestamp key
    repo.publish_timestamp()

    verdict = make_client().check(digest, HWID)
    assert (verdict.root_version, verdict.timestamp_version) == (2, 2)


def test_a_root_signed_below_its_threshold_is_refused(repo: Repo, server: RepoServer, make_client: MakeClient) -> None:
    digest = repo.add(_manifest(1), [HWID])
    repo.publish()
    client = make_client()
    repo.rotate("root", sign_with=1)  # 1 of the old 3 root keys where 2 are required

    _refused(client, digest, "threshold")
    with pytest.raises(TufRejectedError) as caught:  # nor is a first root that does not meet its own threshold
        TufClient(client.metadata_dir.with_name("fresh"), server.url, client.fetcher).install_root(
            _resigned(repo.root_bytes, repo, 1)
        )
    assert caught.value.check == "threshold"


def _resigned(root_bytes: bytes, repo: Repo, count: int) -> bytes:
    md = tufmd.parse(root_bytes, "root")
    md.signatures.clear()
    tufmd.sign(md, repo.signers["root"][:count])
    return tufmd.to_bytes(md)


def test_a_root_rotation_signed_to_threshold_moves_the_device_forward(
    repo: Repo, server: RepoServer, make_client: MakeClient
) -> None:
    digest = repo.add(_manifest(1), [HWID])
    repo.publish()
    make_client().check(digest, HWID)
    repo.rotate("root")
    repo.rotate("targets")
    repo.publish()

    assert make_client().check(digest, HWID).root_version == 3


def test_more_bytes_than_declared_are_aborted_at_the_cap(
    repo: Repo, server: RepoServer, make_client: MakeClient, http: httpx.Client
) -> None:
    digest = repo.add(_manifest(1), [HWID])
    repo.publish()
    path = f"targets/{tufmd.target_path(digest)}"
    server.misbehave[path] = Misbehave(endless=True)

    error = _refused(make_client(), digest, "length")
    assert "stopped at the cap" in error.message
    assert server.sent[path] < 8 << 20  # the server could send 64 MiB; the client hung up long before

    fetcher = HttpxFetcher(http)  # a body announced longer than allowed is refused before its first byte
    server.overrides["big"] = b"y" * 5000
    with pytest.raises(Exception, match="announces 5000 bytes"), fetcher.download_file(server.url + "big", 100):
        pass
    assert fetcher.received == 0


def test_a_cut_download_resumes_with_a_range_request(repo: Repo, server: RepoServer, http: httpx.Client) -> None:
    server.overrides["blob"] = bytes(range(256)) * 400
    server.misbehave["blob"] = Misbehave(cut_after=30_000)
    fetcher = HttpxFetcher(http)

    with fetcher.download_file(server.url + "blob", 102_400) as handle:
        assert handle.read() == bytes(range(256)) * 400
    assert fetcher.resumed_from == [30_000]
    assert [r for p, r in server.requests if p == "blob"] == [None, "bytes=30000-"]


def test_an_unreachable_repository_is_a_retry_not_a_refusal(repo: Repo, tmp_path: Path, http: httpx.Client) -> None:
    client = TufClient(tmp_path / "tuf", "http://127.0.0.1:9/tuf/", HttpxFetcher(http, max_attempts=1))
    client.install_root(repo.root_bytes)
    with pytest.raises(UnavailableError):
        client.check("sha256:" + "0" * 64, HWID)
