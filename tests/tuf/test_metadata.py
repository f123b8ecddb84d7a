"""The pure part: targets by digest with hardware ids, version chains, and the checks on uploads."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner

from slmops.tuf import metadata as tufmd

NOW = datetime(2026, 1, 1, tzinfo=UTC)
HWIDS = st.lists(st.from_regex(r"[a-z0-9_]{1,12}-[0-9]{1,3}gb", fullmatch=True), min_size=1, max_size=5)


@given(manifest=st.binary(min_size=1, max_size=512), hardware_ids=HWIDS)
def test_a_target_round_trips_with_its_digest_path_and_hardware_ids(manifest: bytes, hardware_ids: list[str]) -> None:
    targets = tufmd.new_targets(NOW)
    target = tufmd.add_target(targets, manifest, hardware_ids, name="tiny", version="v1")

    parsed = tufmd.parse(tufmd.to_bytes(targets), "targets").signed.targets[target.path]

    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert target.path == tufmd.target_path(digest) and parsed.length == len(manifest)
    assert parsed.hashes == {"sha256": digest.removeprefix("sha256:")}
    assert tufmd.hardware_ids_of(parsed) == sorted(set(hardware_ids))
    assert tufmd.remove_target(targets, digest) and not tufmd.remove_target(targets, digest)


def test_a_target_needs_a_hardware_id_and_a_path_needs_a_digest() -> None:
    with pytest.raises(tufmd.TufMetadataError, match="hardware id"):
        tufmd.add_target(tufmd.new_targets(NOW), b"{}", [" "])
    with pytest.raises(tufmd.TufMetadataError, match="sha256:<64 hex"):
        tufmd.target_path("sha256:abc")


def _root(signers: dict[str, list[CryptoSigner]], threshold: int = 2) -> tufmd.Metadata:  # type: ignore[type-arg]
    keys = {role: [s.public_key for s in group] for role, group in signers.items()}
    return tufmd.new_root(keys, {"root": threshold}, NOW)


@pytest.fixture
def signers() -> dict[str, list[CryptoSigner]]:
    return {
        "root": [CryptoSigner.generate_ed25519() for _ in range(3)],
        **{role: [CryptoSigner.generate_ed25519()] for role in ("targets", "snapshot", "timestamp")},
    }


def test_a_root_chain_needs_the_threshold_of_the_old_and_the_new_keys(signers: dict[str, list[CryptoSigner]]) -> None:
    v1 = tufmd.sign(_root(signers), signers["root"][:2])
    trusted = tufmd.check_new_root(None, tufmd.to_bytes(v1), NOW)
    new_root_keys = [CryptoSigner.generate_ed25519() for _ in range(3)]
    v2 = _root({**signers, "root": new_root_keys})
    v2.signed.version = 2

    tufmd.sign(v2, new_root_keys[:2])
    with pytest.raises(tufmd.TufMetadataError, match="threshold of root v1"):
        tufmd.check_new_root(trusted, tufmd.to_bytes(v2), NOW)
    tufmd.sign(v2, signers["root"][:1])
    with pytest.raises(tufmd.TufMetadataError, match="threshold of root v1"):
        tufmd.check_new_root(trusted, tufmd.to_bytes(v2), NOW)
    tufmd.sign(v2, signers["root"][1:2])
    assert tufmd.check_new_root(trusted, tufmd.to_bytes(v2), NOW).signed.version == 2
    with pytest.raises(tufmd.TufMetadataError, match="must be version 2"):
        tufmd.check_new_root(trusted, tufmd.to_bytes(v1), NOW)
    with pytest.raises(tufmd.TufMetadataError, match="expired"):
        tufmd.check_new_root(trusted, tufmd.to_bytes(v2), NOW + timedelta(days=400))


def test_targets_need_the_targets_keys_and_a_higher_version(signers: dict[str, list[CryptoSigner]]) -> None:
    root = tufmd.sign(_root(signers), signers["root"])
    targets = tufmd.new_targets(NOW)
    tufmd.sign(targets, signers["snapshot"])
    with pytest.raises(tufmd.TufMetadataError, match="targets keys"):
        tufmd.check_targets(root, None, tufmd.to_bytes(targets), NOW)
    tufmd.sign(targets, signers["targets"])
    assert tufmd.check_targets(root, None, tufmd.to_bytes(targets), NOW).signed.version == 1
    with pytest.raises(tufmd.TufMetadataError, match="not newer"):
        tufmd.check_targets(root, 1, tufmd.to_bytes(targets), NOW)
    with pytest.raises(tufmd.TufMetadataError, match="expected targets metadata"):
        tufmd.check_targets(root, None, tufmd.to_bytes(root), NOW)


def test_snapshot_and_timestamp_follow_their_previous_versions() -> None:
    snapshot = tufmd.next_snapshot(4, None, NOW)
    again = tufmd.next_snapshot(5, snapshot, NOW)
    data = tufmd.to_bytes(again)
    timestamp = tufmd.next_timestamp(data, None, NOW)
    later = tufmd.next_timestamp(data, timestamp, NOW)

    assert (again.signed.version, again.signed.meta["targets.json"].version) == (2, 5)
    assert (later.signed.version, later.signed.snapshot_meta.version) == (2, 2)
    assert later.signed.snapshot_meta.hashes == {"sha256": hashlib.sha256(data).hexdigest()}
    assert timestamp.signed.expires == NOW + timedelta(days=1)
