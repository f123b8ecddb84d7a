"""Durable writes for the optimizer: a reader never sees half a file, and a rename survives a crash."""

from __future__ import annotations

import os
from pathlib import Path

from slmops.core.manifest import canonical_json, digest_bytes
from slmops.registry.blobstore import hash_file

__all__ = ["digest_path", "fsync_dir", "replace_durably"]


def digest_path(path: Path) -> str:
    """sha256 of a file, or of a directory's (relative path, file digest) list: the cache key of an input."""
    if path.is_file():
        return hash_file(path).digest
    entries = sorted((p.relative_to(path).as_posix(), hash_file(p).digest) for p in path.rglob("*") if p.is_file())
    return digest_bytes(canonical_json(entries))


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (new names, renames) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(temp: Path, destination: Path) -> Path:
    """fsync the finished file ``temp``, rename it to ``destination`` and fsync the directory; return
    ``destination``."""
    with temp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, destination)
    fsync_dir(destination.parent)
    return destination
