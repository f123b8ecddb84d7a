"""Durable writes for the optimizer: a reader never sees half a file, and a rename survives a crash."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "replace_durably"]


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
