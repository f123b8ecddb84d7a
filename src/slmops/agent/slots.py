"""Model slots: one directory per staged version, and an atomic ``current`` / ``previous`` symlink pair.

``slots/<hex>/`` holds ``manifest.json`` (the signed envelope) and ``files/<path>`` for every file of the version,
hard-linked from the blob cache (copied when the filesystem cannot link). A slot is built under a temporary name
and renamed into place, so a slot directory that exists is complete. ``slots/current`` points at the active slot
and ``slots/previous`` at the one to roll back to; each is replaced with ``os.replace`` of a fresh symlink followed
by an fsync of the directory, so at every moment ``current`` names a whole slot, old or new.

A version of several files in directories (an ONNX Runtime GenAI model: ``genai_config.json``, ``model.onnx``,
``model.onnx.data``, the tokenizer) is held the same way, every file under ``files/`` at its manifest path, so the
atomic switch and rollback are the same for a directory model as for one GGUF file; :meth:`Slots.model_file` returns
the directory to load.

The slot of an adapter version (:mod:`slmops.core.adapters`) holds the pair: ``manifest.json`` and ``files/`` are
the adapter's, ``base.json`` and ``base/<path>`` its base's. Every slot has its own hard links, so removing one slot
(a base-only slot after a pair was committed, say) never takes files from another, and a pair staged over a base
that is already in the blob cache needs only the adapter's blobs.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path

from slmops.agent._files import atomic_write, fsync_dir
from slmops.core.adapters import adapter_base
from slmops.core.manifest import SignedManifest
from slmops.errors import IntegrityError, NotFoundError
from slmops.registry.blobstore import DirectoryBlobStore, hash_file

GENAI_CONFIG_FILE = "genai_config.json"  # slmops.registry.formats.onnx_genai.GENAI_CONFIG_FILE (agent stays light)

__all__ = ["Slots"]

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP = ".tmp-"


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


class Slots:
    def __init__(self, root: Path, cache: DirectoryBlobStore) -> None:
        self.root = root
        self.cache = cache

    def path(self, digest: str) -> Path:
        return self.root / _hex(digest)

    def staged(self) -> frozenset[str]:
        if not self.root.is_dir():
            return frozenset()
        return frozenset(
            "sha256:" + entry.name
            for entry in os.scandir(self.root)
            if _HEX_RE.match(entry.name) and entry.is_dir(follow_symlinks=False)
        )

    def manifest(self, digest: str) -> SignedManifest:
        try:
            return SignedManifest.from_json((self.path(digest) / "manifest.json").read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"version {digest} has no slot in {self.root}") from None

    def base_manifest(self, digest: str) -> SignedManifest | None:
        """The base's envelope when the slot of ``digest`` holds an adapter version, else None."""
        try:
            return SignedManifest.from_json((self.path(digest) / "base.json").read_bytes())
        except FileNotFoundError:
            return None

    @staticmethod
    def _first_gguf(envelope: SignedManifest, directory: Path) -> Path:
        manifest = envelope.manifest
        for entry in manifest.files:
            if entry.path.endswith(".gguf"):
                return directory / entry.path
        raise NotFoundError(f"{manifest.name}@{manifest.version} has no .gguf file; this agent serves GGUF only")

    @staticmethod
    def _model_location(envelope: SignedManifest, directory: Path) -> Path:
        """A GGUF version's first GGUF file; an ONNX version's directory holding ``genai_config.json`` (the one
        nearest the top when there are several), which is what ONNX Runtime GenAI loads."""
        manifest = envelope.manifest
        if manifest.format == "onnx":
            configs = sorted(
                (e.path for e in manifest.files if e.path.rsplit("/", 1)[-1] == GENAI_CONFIG_FILE),
                key=lambda p: (p.count("/"), p),
            )
            if not configs:
                raise NotFoundError(
                    f"{manifest.name}@{manifest.version} is ONNX without {GENAI_CONFIG_FILE}; the agent serves ONNX "
                    "through ONNX Runtime GenAI only (export it with the export_onnx_genai pass)"
                )
            return (directory / configs[0]).parent
        return Slots._first_gguf(envelope, directory)

    def model_file(self, digest: str) -> Path:
        """What a runtime loads: the first GGUF file of the version (sorted by path), or for an ONNX GenAI version
        its model directory (see :func:`slmops.runtime.backends.open_backend`, which picks the backend by the
        manifest's format); for an adapter version, its base's."""
        base = self.base_manifest(digest)
        if base is not None:
            return self._model_location(base, self.path(digest) / "base")
        return self._model_location(self.manifest(digest), self.path(digest) / "files")

    def adapter_file(self, digest: str) -> Path | None:
        """The GGUF LoRA adapter a runtime loads over :meth:`model_file` for an adapter version; None otherwise."""
        if self.base_manifest(digest) is None:
            return None
        return self._first_gguf(self.manifest(digest), self.path(digest) / "files")

    def _link_files(self, envelope: SignedManifest, files: Path) -> None:
        for entry in envelope.manifest.files:
            source = self.cache.path(entry.digest)
            if not source.is_file():
                raise NotFoundError(f"blob {entry.digest} of {entry.path} is not in the cache; download it first")
            target = files / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
                with target.open("rb+") as handle:
                    os.fsync(handle.fileno())
            if target.stat().st_size != entry.size:
                raise IntegrityError(f"{entry.path} has {target.stat().st_size} bytes, expected {entry.size}")

    def stage(self, envelope: SignedManifest, base: SignedManifest | None = None) -> Path:
        """Build the slot of a version from cached blobs (with ``base``, the base of an adapter version, the pair);
        a no-op when it exists already."""
        final = self.path(envelope.digest)
        if final.is_dir():
            return final
        wanted = adapter_base(envelope.manifest)
        if wanted != (base.digest if base is not None else None):
            m = envelope.manifest
            raise IntegrityError(
                f"{m.name}@{m.version} names the base {wanted or 'none'}, but the base given is "
                f"{base.digest if base is not None else 'none'}; the desired state is inconsistent"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{_TMP}{_hex(envelope.digest)[:16]}-{secrets.token_hex(4)}"
        try:
            files = tmp / "files"
            files.mkdir(parents=True)
            self._link_files(envelope, files)
            directories = {files}
            if base is not None:
                (tmp / "base").mkdir()
                self._link_files(base, tmp / "base")
                atomic_write(tmp / "base.json", base.to_json().encode("utf-8"), 0o644)
                directories.add(tmp / "base")
            atomic_write(tmp / "manifest.json", envelope.to_json().encode("utf-8"), 0o644)
            for top in list(directories):
                directories |= {p.parent for p in top.rglob("*")}
            for directory in sorted(directories | {tmp}, key=lambda p: -len(p.parts)):
                fsync_dir(directory)
            os.rename(tmp, final)
            fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def verify(self, digest: str) -> None:
        """Re-hash every file of a slot (a pair: the base's too) against its manifest; raises IntegrityError on the
        first mismatch."""
        parts = [(self.manifest(digest), "files")]
        base = self.base_manifest(digest)
        if base is not None:
            parts.append((base, "base"))
        for envelope, directory in parts:
            for entry in envelope.manifest.files:
                ref = hash_file(self.path(digest) / directory / entry.path)
                if ref.digest != entry.digest or ref.size != entry.size:
                    raise IntegrityError(
                        f"{directory}/{entry.path} in slot {_hex(digest)[:12]}: expected {entry.digest}, "
                        f"got {ref.digest}"
                    )

    def _link(self, name: str) -> str | None:
        try:
            target = os.readlink(self.root / name)
        except (FileNotFoundError, OSError):
            return None
        base = os.path.basename(target)
        return "sha256:" + base if _HEX_RE.match(base) else None

    def current(self) -> str | None:
        return self._link("current")

    def previous(self) -> str | None:
        return self._link("previous")

    def _set_link(self, name: str, digest: str | None) -> None:
        link = self.root / name
        if digest is None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        else:
            if not self.path(digest).is_dir():
                raise NotFoundError(f"cannot point {name} at {digest}: it has no slot; stage it first")
            tmp = self.root / f"{_TMP}link-{name}-{secrets.token_hex(4)}"
            os.symlink(_hex(digest), tmp)
            os.replace(tmp, link)
        fsync_dir(self.root)

    def switch(self, digest: str) -> str | None:
        """Make ``digest`` current; the old current becomes previous. Returns the old current."""
        old = self.current()
        if old == digest:
            return old
        if old is not None:
            self._set_link("previous", old)
        self._set_link("current", digest)
        return old

    def set_previous(self, digest: str | None) -> None:
        self._set_link("previous", digest)

    def rollback(self) -> str | None:
        """Make previous current again (or nothing current when there is no previous); returns the new current."""
        target = self.previous()
        if target is not None and self.path(target).is_dir():
            self._set_link("current", target)
        else:
            target = None
            self._set_link("current", None)
        self._set_link("previous", None)
        return target

    def gc(self, keep: set[str]) -> list[str]:
        """Remove slots not in ``keep`` (and leftovers of interrupted staging); returns the removed digests.

        A pair slot holds its own links to its base's files, so removing the base's own slot is safe."""
        removed: list[str] = []
        keep = keep | {d for d in (self.current(), self.previous()) if d is not None}
        if not self.root.is_dir():
            return removed
        for entry in os.scandir(self.root):
            if entry.name.startswith(_TMP):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
            elif _HEX_RE.match(entry.name) and "sha256:" + entry.name not in keep:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append("sha256:" + entry.name)
        return removed
