from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.errors import IntegrityError, NotFoundError
from slmops.registry.blobstore import DirectoryBlobStore


def _store(root: Path) -> DirectoryBlobStore:
    store = DirectoryBlobStore(root)
    store.initialize()
    return store


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=3 << 20))
def test_a_stored_blob_is_named_by_its_sha256_and_reads_back(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    store = _store(tmp_path_factory.mktemp("blobs"))
    ref = store.put_stream(io.BytesIO(data))
    assert ref.digest == _digest(data)
    assert ref.size == len(data)
    with store.open(ref.digest) as handle:
        assert handle.read() == data
    assert list(store.digests()) == [ref.digest]


def test_a_wrong_expected_digest_stores_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(IntegrityError, match="does not match"):
        store.put_stream(io.BytesIO(b"evil"), expected_digest=_digest(b"good"))
    assert list(store.digests()) == []
    assert list((tmp_path / "sha256").iterdir()) == []


def test_unknown_blob_is_a_clear_not_found(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(NotFoundError, match="is not in"):
        store.open(_digest(b"x"))
    with pytest.raises(NotFoundError, match="not a blob digest"):
        store.open("md5:abc")


def _write_same(root: str, data: bytes) -> str:
    store = DirectoryBlobStore(Path(root))
    return store.put_stream(io.BytesIO(data)).digest


def test_two_processes_writing_the_same_blob_both_succeed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    data = os.urandom(4 << 20)
    with ProcessPoolExecutor(max_workers=2) as pool:
        digests = list(pool.map(_write_same, [str(tmp_path)] * 6, [data] * 6))
    assert set(digests) == {_digest(data)}
    assert store.verify(_digest(data)).digest == _digest(data)
    assert [p.name for p in (tmp_path / "sha256").iterdir()] == [_digest(data).removeprefix("sha256:")]


_SLOW_WRITER = """
import io, sys, time
from pathlib import Path
from slmops.registry.blobstore import DirectoryBlobStore

class Slow(io.RawIOBase):
    def __init__(self):
        self.left = 64
    def readable(self):
        return True
    def read(self, n=-1):
        if self.left == 0:
            return b""
        self.left -= 1
        if self.left == 60:
            print("writing", flush=True)
        time.sleep(0.05)
        return b"x" * 65536

store = DirectoryBlobStore(Path(sys.argv[1]))
store.put_stream(Slow())
print("done", flush=True)
"""


@pytest.mark.parametrize("kill_after_s", [0.0, 0.3, 1.0, 5.0])
def test_a_writer_killed_mid_write_leaves_the_blob_absent_or_complete(tmp_path: Path, kill_after_s: float) -> None:
    store = _store(tmp_path)
    with subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(kill_after_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    expected = _digest(b"x" * 65536 * 64)
    present = list(store.digests())
    assert present in ([], [expected])
    if present:
        assert store.verify(expected).digest == expected
    # the dead writer's temp file is never listed, and sweeping removes it
    store.sweep_temporary(older_than_s=0)
    assert [p for p in (tmp_path / "sha256").iterdir() if p.name.startswith(".tmp-")] == []


def test_stored_blobs_are_read_only(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ref = store.put_stream(io.BytesIO(b"abc"))
    assert store.path(ref.digest).stat().st_mode & 0o222 == 0
