from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from slmops.core.manifest import (
    FileEntry,
    Lineage,
    Manifest,
    ModelFacts,
    Recipe,
    RecipeStep,
    Requirements,
    RuntimeHints,
    SignedManifest,
    Source,
    canonical_json,
)

hexdigest = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)
segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
relpath = st.lists(segment, min_size=1, max_size=3).map("/".join)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=20))
json_value = st.recursive(
    json_scalar,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    paths = sorted(set(draw(st.lists(relpath, min_size=1, max_size=4))))
    files = [FileEntry(path=p, digest=draw(hexdigest), size=draw(st.integers(0, 2**40))) for p in paths]
    steps = draw(
        st.lists(
            st.builds(
                RecipeStep,
                pass_name=st.sampled_from(["quantize", "prune", "lora"]),
                params=st.dictionaries(st.text(min_size=1, max_size=8), json_scalar, max_size=3),
            ),
            max_size=3,
        )
    )
    return Manifest(
        name=draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)),
        version=f"v{draw(st.integers(1, 10_000))}",
        variant=draw(st.none() | st.text(min_size=1, max_size=16)),
        format=draw(st.sampled_from(["gguf", "safetensors", "onnx"])),
        files=files,
        facts=ModelFacts(
            architecture=draw(st.none() | st.text(max_size=12)),
            parameter_count=draw(st.none() | st.integers(0, 10**11)),
            details=draw(st.dictionaries(st.text(max_size=10), json_value, max_size=4)),
        ),
        runtime=RuntimeHints(
            chat_template=draw(st.none() | st.text(max_size=200)),
            stop_tokens=draw(st.lists(st.text(max_size=10), max_size=3)),
        ),
        requirements=Requirements(memory_load_bytes=draw(st.integers(0, 2**40))),
        metrics=draw(
            st.dictionaries(
                st.text(min_size=1, max_size=10), st.floats(allow_nan=False, allow_infinity=False), max_size=4
            )
        ),
        lineage=Lineage(
            parents=draw(st.lists(hexdigest, max_size=2)), recipe=Recipe(name="r", steps=steps) if steps else None
        ),
        source=Source(kind="file", origin=draw(st.text(max_size=30))),
        created_at="2026-11-28T08:00:00Z",
    )


@given(manifests())
def test_manifest_round_trips_through_canonical_json_with_a_stable_digest(manifest: Manifest) -> None:
    data = manifest.canonical()
    again = Manifest.from_canonical(data)

    assert again == manifest
    assert again.canonical() == data
    assert again.digest == manifest.digest
    # canonical means: sorted keys, no whitespace, the same bytes whatever order the keys came in
    shuffled = json.dumps(dict(reversed(list(json.loads(data).items()))))
    assert Manifest.model_validate_json(shuffled).digest == manifest.digest


@given(manifests())
def test_signed_envelope_round_trips(manifest: Manifest) -> None:
    envelope = SignedManifest(manifest=manifest, digest=manifest.digest, signatures=[])
    assert SignedManifest.from_json(envelope.to_json()) == envelope


def test_any_change_changes_the_digest() -> None:
    base = Manifest(
        name="m",
        version="v1",
        format="gguf",
        files=[FileEntry(path="m.gguf", digest="sha256:" + "0" * 64, size=1)],
        requirements=Requirements(memory_load_bytes=1),
        source=Source(kind="file"),
        created_at="2026-11-28T08:00:00Z",
    )
    assert base.model_copy(update={"version": "v2"}).digest != base.digest
    assert base.content_key() == base.model_copy(update={"version": "v2", "created_at": "x"}).content_key()


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", ""])
def test_file_paths_must_stay_inside_the_version(path: str) -> None:
    with pytest.raises(ValidationError, match="relative POSIX path"):
        FileEntry(path=path, digest="sha256:" + "0" * 64, size=0)


@pytest.mark.parametrize("name", ["", "Gemma", "-x", "a b", "a/b", "x" * 129])
def test_model_names_are_restricted(name: str) -> None:
    with pytest.raises(ValidationError, match="model name"):
        Manifest(
            name=name,
            version="v1",
            format="gguf",
            files=[FileEntry(path="m.gguf", digest="sha256:" + "0" * 64, size=1)],
            requirements=Requirements(memory_load_bytes=1),
            source=Source(kind="file"),
            created_at="t",
        )


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
