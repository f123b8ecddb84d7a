from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from slmops.core.manifest import Lineage, Recipe, RecipeStep, Source
from slmops.errors import BundleError, ConflictError, IntegrityError, SignatureError
from slmops.registry import Registry, export_bundle, import_bundle
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture
def central(make_registry: Callable[[str], Registry], tmp_path: Path) -> Registry:
    registry = make_registry("central")
    registry.import_model(write_tiny_gguf(tmp_path / "m.gguf", seed=1), "m")
    parent = registry.resolve("m@v1")
    variant = write_tiny_gguf(tmp_path / "v" / "m-q8.gguf", seed=2)
    registry.register(
        "m",
        "gguf",
        {variant.name: variant},
        facts=parent.manifest.facts,
        runtime=parent.manifest.runtime,
        weight_bytes=variant.stat().st_size,
        source=Source(kind="derived"),
        lineage=Lineage(
            parents=[parent.digest],
            recipe=Recipe(name="r", steps=[RecipeStep(pass_name="quantize", params={"type": "Q8_0"})]),
        ),
        variant="q8_0",
    )
    registry.tag("m@v2", "stable")
    return registry


def _state(registry: Registry) -> tuple[list[str], list[str]]:
    versions = [v.digest for s in registry.models() for v in registry.versions(s.name)]
    return versions, sorted(registry.blobs.digests())


def test_round_trip_keeps_manifests_signatures_lineage_and_aliases(
    central: Registry, make_registry: Callable[[str], Registry], tmp_path: Path
) -> None:
    bundle = tmp_path / "b.tar"
    contents = export_bundle(central, ["m@stable"], bundle)
    site = make_registry("site")

    imported = import_bundle(site, bundle, trust_signers=True)

    assert [e.manifest.version for e in contents.manifests] == ["v1", "v2"]  # the variant brings its parent
    assert sorted(imported.added) == sorted(e.digest for e in central.versions("m"))
    assert [e.digest for e in site.versions("m")] == [e.digest for e in central.versions("m")]
    assert site.aliases("m") == {"latest": "v2", "stable": "v2"}
    assert site.resolve("m@v2").manifest.lineage.parents == [site.resolve("m@v1").digest]
    assert [c.manifest.version for c in site.lineage("m")[0].children] == ["v2"]
    assert site.verify("m@v2").ok and site.verify("m@v1").ok
    # idempotent: a second import adds nothing and needs no --trust now that the key is trusted
    again = import_bundle(site, bundle)
    assert again.added == []
    assert len(site.versions("m")) == 2


def test_an_untrusted_signer_is_refused_until_trusted(
    central: Registry, make_registry: Callable[[str], Registry], tmp_path: Path
) -> None:
    bundle = tmp_path / "b.tar"
    export_bundle(central, ["m"], bundle)
    site = make_registry("site")

    with pytest.raises(SignatureError, match="does not trust; check the key id"):
        import_bundle(site, bundle)

    assert _state(site) == ([], [])


def _rewrite(
    bundle: Path,
    out: Path,
    edit: Callable[[tarfile.TarInfo, bytes], tuple[tarfile.TarInfo, bytes] | None],
    extra: list[tuple[tarfile.TarInfo, bytes]] | None = None,
) -> Path:
    with tarfile.open(bundle) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            handle = src.extractfile(member)
            data = handle.read() if handle else b""
            edited = edit(member, data)
            if edited is not None:
                info, payload = edited
                info.size = len(payload)
                dst.addfile(info, io.BytesIO(payload))
        for info, payload in extra or []:
            dst.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return out


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _flip_blob(member: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    if member.name.startswith("blobs/") and len(data) > 1000:
        data = data[:500] + bytes([data[500] ^ 0xFF]) + data[501:]
    return member, data


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("tampered blob", IntegrityError, "corrupt or was tampered with"),
        ("path traversal", BundleError, "unsafe path '../evil'"),
        ("absolute path", BundleError, "unsafe path '/etc/evil'"),
        ("symlink", BundleError, "contains a link"),
        ("hard link", BundleError, "contains a link"),
        ("device file", BundleError, "not a regular file"),
        ("fifo", BundleError, "not a regular file"),
        ("unexpected file", BundleError, "unexpected member"),
        ("truncated", BundleError, "truncated or corrupt"),
        ("tampered manifest", IntegrityError, "manifest m@v1 was changed"),
        ("missing blob", BundleError, "which is missing"),
    ],
)
def test_hostile_bundles_are_refused_and_leave_nothing_behind(
    central: Registry,
    make_registry: Callable[[str], Registry],
    tmp_path: Path,
    case: str,
    error: type[Exception],
    message: str,
) -> None:
    bundle = tmp_path / "b.tar"
    export_bundle(central, ["m"], bundle)
    bad = tmp_path / "bad.tar"
    keep: Callable[[tarfile.TarInfo, bytes], tuple[tarfile.TarInfo, bytes] | None] = lambda m, d: (m, d)  # noqa: E731
    if case == "tampered blob":
        _rewrite(bundle, bad, _flip_blob)
    elif case == "path traversal":
        _rewrite(bundle, bad, keep, [(_member("../evil"), b"x")])
    elif case == "absolute path":
        _rewrite(bundle, bad, keep, [(_member("/etc/evil"), b"x")])
    elif case == "symlink":
        _rewrite(bundle, bad, keep, [(_member("keys/0000000000000000.pub", tarfile.SYMTYPE, "/etc/passwd"), b"")])
    elif case == "hard link":
        _rewrite(
            bundle, bad, keep, [(_member("keys/0000000000000000.pub", tarfile.LNKTYPE, "slmops-bundle.json"), b"")]
        )
    elif case == "device file":
        _rewrite(bundle, bad, keep, [(_member("keys/0000000000000000.pub", tarfile.CHRTYPE), b"")])
    elif case == "fifo":
        _rewrite(bundle, bad, keep, [(_member("keys/0000000000000000.pub", tarfile.FIFOTYPE), b"")])
    elif case == "unexpected file":
        _rewrite(bundle, bad, keep, [(_member("run.sh"), b"#!/bin/sh\n")])
    elif case == "truncated":
        bad.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    elif case == "tampered manifest":
        _rewrite(
            bundle,
            bad,
            lambda m, d: (
                (m, d.replace(b'"created_at":"', b'"created_at":"1')) if m.name.startswith("manifests/") else (m, d)
            ),
        )
    elif case == "missing blob":
        first_blob = central.resolve("m@v1").manifest.files[0].digest.removeprefix("sha256:")
        _rewrite(bundle, bad, lambda m, d: None if m.name.endswith(first_blob) else (m, d))
    site = make_registry("site")
    before = _state(site)

    with pytest.raises(error, match=message):
        import_bundle(site, bad, trust_signers=True)

    assert _state(site) == before
    assert not (tmp_path / "evil").exists()
    assert site.keys.trusted() == {}


def test_a_diverged_label_is_a_conflict(
    central: Registry, make_registry: Callable[[str], Registry], tmp_path: Path
) -> None:
    bundle = tmp_path / "b.tar"
    export_bundle(central, ["m"], bundle)
    site = make_registry("site")
    site.import_model(write_tiny_gguf(tmp_path / "other.gguf", seed=9), "m")

    with pytest.raises(ConflictError, match="diverged"):
        import_bundle(site, bundle, trust_signers=True)

    assert len(site.versions("m")) == 1
