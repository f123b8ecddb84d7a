"""Dataset versions in the registry: content-addressed, versioned, resolvable, exported byte for byte."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.config import Settings
from slmops.core.manifest import digest_bytes
from slmops.errors import ConfigError, IntegrityError, NotFoundError
from slmops.registry import Registry
from slmops.registry.datasets import DatasetLineage, DatasetManifest, DatasetRegistry

LINEAGE = DatasetLineage(versions=["sha256:" + "a" * 64], device_classes=["cpu-8g"], releases=["r1"])


@pytest.fixture
def datasets(tmp_path: Path) -> DatasetRegistry:
    registry = Registry.open(Settings(home=tmp_path / "home"))
    registry.clock = lambda: datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    return DatasetRegistry.of(registry)


def register(datasets: DatasetRegistry, train: bytes, heldout: bytes = b"", **curation: object) -> str:
    result = datasets.register(
        "support",
        {"train.jsonl": train, "heldout.jsonl": heldout},
        records={"train.jsonl": train.count(b"\n"), "heldout.jsonl": heldout.count(b"\n")},
        counts={"train": train.count(b"\n")},
        curation=dict(curation),
        lineage=LINEAGE,
        created_by="operator:test",
    )
    return result.version.digest


def test_register_resolve_and_export_round_trip(datasets: DatasetRegistry, tmp_path: Path) -> None:
    first = register(datasets, b'{"a":1}\n', b'{"b":2}\n', heldout_fraction=0.1)
    same = register(datasets, b'{"a":1}\n', b'{"b":2}\n', heldout_fraction=0.1)
    second = register(datasets, b'{"a":1}\n{"c":3}\n', b'{"b":2}\n', heldout_fraction=0.1)
    written = datasets.export("support@v1", tmp_path / "out")

    assert first == same != second
    assert [v.manifest.version for v in datasets.versions("support")] == ["v1", "v2"]
    assert datasets.resolve("support").digest == datasets.resolve("support@latest").digest == second
    assert datasets.resolve("support@v1").digest == datasets.resolve(first).digest == first
    assert datasets.resolve(f"support@{first}").manifest.lineage == LINEAGE
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == b'{"a":1}\n'
    assert (tmp_path / "out" / "heldout.jsonl").read_bytes() == b'{"b":2}\n'
    exported = json.loads((tmp_path / "out" / "manifest.json").read_bytes())
    assert exported["digest"] == first and digest_bytes(DatasetManifest(**exported["manifest"]).canonical()) == first
    assert len(written) == 3
    summary = datasets.datasets()
    assert [(s.name, s.versions, s.latest, s.latest_digest) for s in summary] == [("support", 2, "v2", second)]


def test_unknown_references_and_bad_names_say_what_exists(datasets: DatasetRegistry) -> None:
    register(datasets, b"{}\n")

    with pytest.raises(NotFoundError, match="known versions: v1"):
        datasets.resolve("support@v7")
    with pytest.raises(NotFoundError, match="known datasets: support"):
        datasets.resolve("nothing@v1")
    with pytest.raises(ConfigError, match="not valid"):
        datasets.register("Bad Name", {"train.jsonl": b""}, records={})
    with pytest.raises(ConfigError, match="plain name"):
        datasets.register("ok", {"../train.jsonl": b""}, records={})


def test_a_corrupt_blob_is_detected_on_read(datasets: DatasetRegistry) -> None:
    digest = register(datasets, b'{"a":1}\n')
    entry = datasets.resolve(digest).manifest.file("train.jsonl")
    path = datasets.blobs.path(entry.digest)
    path.chmod(0o644)
    path.write_bytes(b'{"a":2}\n')

    with pytest.raises(IntegrityError):
        datasets.read(digest, "train.jsonl")


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200), st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 9)))
def test_the_digest_depends_only_on_the_content(train: bytes, counts: dict[str, int]) -> None:
    def manifest(order: list[str]) -> DatasetManifest:
        files = {"train.jsonl": train, "heldout.jsonl": b"x"}
        entries = [
            {"path": p, "digest": digest_bytes(files[p]), "size": len(files[p]), "records": 0} for p in sorted(order)
        ]
        return DatasetManifest.model_validate(
            {"name": "d", "version": "v1", "files": entries, "counts": dict(sorted(counts.items()))}
        )

    one, other = manifest(["train.jsonl", "heldout.jsonl"]), manifest(["heldout.jsonl", "train.jsonl"])

    assert one.digest == other.digest
    assert DatasetManifest.model_validate_json(one.canonical()).digest == one.digest
    assert one.content_key() == one.model_copy(update={"version": "v9"}).content_key()
