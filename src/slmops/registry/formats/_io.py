"""File opening shared by the format readers."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["open_regular"]


def open_regular(path: Path) -> tuple[BinaryIO, int] | None:
    """Open ``path`` for reading: (handle, size), or None if it is not a regular file. Raises OSError.

    O_NONBLOCK, so that a FIFO planted under a file's name cannot hang us on open.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        handle = os.fdopen(fd, "rb") if stat.S_ISREG(st.st_mode) else None
    except BaseException:
        os.close(fd)
        raise
    if handle is None:
        os.close(fd)
        return None
    return handle, st.st_size
