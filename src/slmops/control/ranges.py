"""HTTP byte ranges for blob downloads: one range, validated against the blob's size (pure, no I/O).

Supported forms of ``Range``: ``bytes=START-END``, ``bytes=START-`` and ``bytes=-SUFFIX``. Anything else —
another unit, several ranges, a malformed or unsatisfiable range — is refused with ``416`` and
``Content-Range: bytes */SIZE``, so a client never receives bytes it did not ask for. ``If-Range`` with a validator
other than the blob's strong ETag means the client's partial copy is of a different file: the whole blob is sent
with ``200``, never a splice of two files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ByteRange", "RangeNotSatisfiable", "etag_matches", "parse_range"]

_RANGE_RE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


class RangeNotSatisfiable(ValueError):
    """The Range header cannot be served for this size."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str, size: int) -> ByteRange:
    """The single byte range ``header`` asks for in a blob of ``size`` bytes, or :class:`RangeNotSatisfiable`."""
    match = _RANGE_RE.match(header.strip().replace(" ", ""))
    if match is None:
        raise RangeNotSatisfiable(f"expected one range 'bytes=START-END', 'bytes=START-' or 'bytes=-N', got {header!r}")
    first, last = match.group(1), match.group(2)
    if not first and not last:
        raise RangeNotSatisfiable("a range needs a start or a suffix length")
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"suffix range of {suffix} bytes cannot be served from {size} bytes")
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(f"range {start}-{last} is outside the {size} bytes of the blob")
    return ByteRange(start, min(end, size - 1))


def etag_matches(header: str | None, etag: str, *, weak: bool) -> bool:
    """Whether an ``If-None-Match`` (weak comparison) or ``If-Range`` (strong) header names ``etag``."""
    if header is None:
        return False
    if weak:
        candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
        return "*" in candidates or etag in candidates
    return header.strip() == etag
