from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmops.core.manifest import Lineage, Recipe, RecipeStep, Source
from slmops.errors import ConflictError, IntegrityError, InvalidModelError, NotFoundError, SignatureError
from slmops.registry import Registry
from slmops.registry.signing import verify_envelope
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "src" / "tiny.gguf")


def _state(registry: Registry) -> tuple[list[str], list[str]]:
    versions = [v.digest for s in registry.models() for v in registry.versions(s.name)]
    return versions, sorted(registry.blobs.digests())


def test_import_reads_facts_from_the_file_and_signs_the_manifest(registry: Registry, tiny: Path) -> None:
    result = registry.import_model(tiny, "tiny")

    m = result.manifest
    assert result.created
    assert (m.name, m.version, m.format) == ("tiny", "v1", "gguf")
    assert m.facts.architecture == "llama"
    assert m.facts.vocab_size == 260
    assert m.facts.context_length == 256
    assert m.facts.quantization == "F32"
    assert m.files[0].path == "tiny.gguf"
    assert m.files[0].size == tiny.stat().st_size
    assert m.requirements.memory_load_bytes > tiny.stat().st_size
    assert [r.context_tokens for r in m.requirements.memory_run] == [256]
    assert result.envelope.digest == m.digest
    assert registry.verify("tiny").ok
    assert registry.aliases("tiny") == {"latest": "v1"}


def test_import_is_idempotent_and_new_content_gets_the_next_label(registry: Registry, tmp_path: Path) -> None:
    a = write_tiny_gguf(tmp_path / "a.gguf", seed=1)
    b = write_tiny_gguf(tmp_path / "b" / "a.gguf", seed=2)

    first = registry.import_model(a, "tiny")
    again = registry.import_model(a, "tiny")
    second = registry.import_model(b, "tiny")

    assert again.created is False
    assert again.envelope == first.envelope
    assert second.manifest.version == "v2"
    assert registry.resolve("tiny").digest == second.envelope.digest
    assert registry.resolve("tiny@v1").digest == first.envelope.digest


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seeds=st.lists(st.integers(0, 3), min_size=1, max_size=6))
def test_import_is_idempotent_for_any_sequence(
    make_registry: Callable[[str], Registry], tmp_path: Path, seeds: list[int]
) -> None:
    registry = make_registry(f"h{os.urandom(4).hex()}")
    files = {s: write_tiny_gguf(tmp_path / f"seed{s}" / "m.gguf", seed=s) for s in set(seeds)}
    digests = {}
    for s in seeds:
        digests.setdefault(s, registry.import_model(files[s], "m").envelope.digest)
        assert registry.import_model(files[s], "m").envelope.digest == digests[s]
    assert len(registry.versions("m")) == len(set(seeds))
    assert [v.manifest.version for v in registry.versions("m")] == [f"v{i + 1}" for i in range(len(set(seeds)))]


def test_references_and_aliases(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.import_model(write_tiny_gguf(tmp_path / "1.gguf", seed=1), "m").envelope
    v2 = registry.import_model(write_tiny_gguf(tmp_path / "2.gguf", seed=2), "m").envelope

    registry.tag("m@v1", "stable")
    assert registry.resolve("m@stable") == v1
    assert registry.resolve(f"m@{v2.digest}") == v2
    assert registry.resolve(v1.digest) == v1
    registry.tag("m@v2", "stable")
    assert registry.resolve("m@stable") == v2
    assert registry.aliases("m") == {"latest": "v2", "stable": "v2"}

    with pytest.raises(NotFoundError, match=r"no version or alias 'v9'; known versions: v1, v2"):
        registry.resolve("m@v9")
    with pytest.raises(NotFoundError, match="no model named 'nope'"):
        registry.resolve("nope")
    with pytest.raises(ConflictError, match="latest"):
        registry.tag("m@v1", "latest")
    with pytest.raises(ConflictError, match="look like a version label"):
        registry.tag("m@v1", "v3")


def test_remove_moves_latest_and_gc_frees_only_unreferenced_blobs(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.import_model(write_tiny_gguf(tmp_path / "1.gguf", seed=1), "m").envelope
    v2 = registry.import_model(write_tiny_gguf(tmp_path / "2.gguf", seed=2), "m").envelope

    registry.remove("m@v2")
    assert registry.aliases("m") == {"latest": "v1"}
    kept = registry.gc(grace_s=3600)
    assert kept.removed == [] and kept.kept_young == 1
    report = registry.gc(grace_s=0)

    assert report.removed == [v2.manifest.files[0].digest]
    assert report.freed_bytes == v2.manifest.files[0].size
    assert sorted(registry.blobs.digests()) == [v1.manifest.files[0].digest]
    assert registry.verify("m@v1").ok


def _variant(registry: Registry, parent_ref: str, path: Path, step: str, **params: object) -> str:
    parent = registry.resolve(parent_ref)
    result = registry.register(
        parent.manifest.name,
        "gguf",
        {path.name: path},
        facts=parent.manifest.facts,
        runtime=parent.manifest.runtime,
        weight_bytes=path.stat().st_size,
        source=Source(kind="derived", origin=parent.digest),
        lineage=Lineage(
            parents=[parent.digest], recipe=Recipe(name="test", steps=[RecipeStep(pass_name=step, params=params)])
        ),
        variant=step,
        metrics={"perplexity": 12.5},
    )
    return result.manifest.version


def test_lineage_tree_and_rm_refuses_parents(registry: Registry, tmp_path: Path) -> None:
    registry.import_model(write_tiny_gguf(tmp_path / "base.gguf", seed=1), "m")
    child = _variant(registry, "m@v1", write_tiny_gguf(tmp_path / "q.gguf", seed=2), "quantize", type="Q8_0")
    grandchild = _variant(registry, f"m@{child}", write_tiny_gguf(tmp_path / "p.gguf", seed=3), "prune", sparsity=0.3)

    roots = registry.lineage("m")

    assert [r.manifest.version for r in roots] == ["v1"]
    assert [c.manifest.version for c in roots[0].children] == [child]
    assert [g.manifest.version for g in roots[0].children[0].children] == [grandchild]
    tree = roots[0].to_json()
    assert tree["children"][0]["step"] == "quantize(type=Q8_0)"
    assert tree["children"][0]["metrics"] == {"perplexity": 12.5}
    with pytest.raises(ConflictError, match="has variants derived from it"):
        registry.remove("m@v1")


def test_verify_names_the_file_and_both_digests_when_a_blob_is_tampered(registry: Registry, tiny: Path) -> None:
    envelope = registry.import_model(tiny, "tiny").envelope
    blob = registry.blob_path(envelope.manifest.files[0].digest)
    os.chmod(blob, 0o644)
    with blob.open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x01")

    report = registry.verify("tiny")

    assert not report.ok
    [problem] = report.problems
    assert problem.path == "tiny.gguf"
    assert problem.expected == envelope.manifest.files[0].digest
    assert problem.actual.startswith("sha256:") and problem.actual != problem.expected
    with pytest.raises(IntegrityError, match=r"tiny.gguf: expected sha256:[0-9a-f]{64}, got sha256:"):
        registry.require_verified("tiny")


def test_verify_fails_for_a_forged_or_untrusted_signature(registry: Registry, tiny: Path) -> None:
    envelope = registry.import_model(tiny, "tiny").envelope
    signature = envelope.signatures[0]
    other = registry.keys.signer().sign(b"some other bytes")
    forged = envelope.model_copy(update={"signatures": [signature.model_copy(update={"value": other.value})]})
    changed = envelope.model_copy(update={"manifest": envelope.manifest.model_copy(update={"version": "v7"})})

    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(forged, registry.keys.trusted())
    with pytest.raises(SignatureError, match="was changed"):
        verify_envelope(changed, registry.keys.trusted())

    (registry.keys.key_dir / "trusted" / f"{signature.key_id}.pub").unlink()
    report = registry.verify("tiny")

    assert report.signed_by is None
    assert "untrusted key" in report.problems[0].actual


def test_rejected_imports_leave_nothing_registered(registry: Registry, tmp_path: Path) -> None:
    good = write_tiny_gguf(tmp_path / "good.gguf")
    truncated = tmp_path / "bad" / "truncated.gguf"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:-100])

    with pytest.raises(InvalidModelError):
        registry.import_model(truncated, "bad")

    assert _state(registry) == ([], [])
