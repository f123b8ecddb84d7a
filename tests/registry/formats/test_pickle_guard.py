"""check_not_pickle: real pickles whose loading would leave a trace are refused under any name, never loaded."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmops.errors import InvalidModelError, UnsafeFormatError, UnsafePathError
from slmops.registry.formats.pickle_guard import (
    PICKLE_SUFFIXES,
    PickleGuardLimits,
    check_not_pickle,
    has_pickle_suffix,
)
from slmops.registry.formats.safetensors import read_safetensors


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where unpickling any payload of this module would create a file; checked again after the whole module."""
    path = tmp_path_factory.mktemp("sentinel") / "unpickled"
    yield path
    assert not path.exists(), "a pickle was loaded: the sentinel file exists"


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch: pytest.MonkeyPatch, sentinel: Path) -> Iterator[None]:
    """Unpickling anything during a test fails loudly, and no test may leave the sentinel behind."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle loading was attempted")

    for name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    yield
    assert not sentinel.exists()


class _Payload:
    """Unpickling this calls open(sentinel, "w"): the sentinel file appears."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.target, "w"))


def payload(sentinel: Path, protocol: int) -> bytes:
    return pickle.dumps({"state_dict": _Payload(sentinel)}, protocol=protocol)


def torch_zip(pickled: bytes, member: str = "archive/data.pkl") -> bytes:
    """The layout of torch.save since PyTorch 1.6: a zip with archive/data.pkl, archive/version, archive/data/0."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(member, pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", b"\0" * 64)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def _refused(path: Path, *fragments: str, limits: PickleGuardLimits | None = None) -> str:
    with pytest.raises(UnsafeFormatError) as caught:
        check_not_pickle(path, limits or PickleGuardLimits())
    message = str(caught.value)
    assert path.name in message
    assert "it was not loaded" in message
    assert "torch.load(path, weights_only=True)" in message and "safetensors.torch.save_file" in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_the_payload_is_real_when_someone_does_load_it(tmp_path: Path) -> None:
    # Control: unpickling the payload in another process does create its sentinel (not this module's one).
    control = tmp_path / "control-sentinel"
    pickled = tmp_path / "payload.pkl"
    pickled.write_bytes(payload(control, 2))

    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())", str(pickled)],
        check=True,
    )

    assert control.exists()


# -- real pickles under every name ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", sorted(PICKLE_SUFFIXES))
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_under_a_pickle_suffix_is_refused(tmp_path: Path, sentinel: Path, suffix: str, protocol: int) -> None:
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(payload(sentinel, protocol))

    _refused(path, f"its name ends in '{suffix}', a suffix of pickle files")


# Explicit ids: the test IDs stay readable and free of "gguf", which CI filters on for the GGUF suite.
_NAMES = {"safetensors": "model.safetensors", "llama-cpp": "model.gguf", "bare": "model", "onnx": "model.onnx"}


@pytest.mark.parametrize("name", [*_NAMES.values(), "config.json", "w.data"], ids=[*_NAMES, "json", "data"])
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_renamed_is_refused_by_content(tmp_path: Path, sentinel: Path, name: str, protocol: int) -> None:
    path = tmp_path / name
    path.write_bytes(payload(sentinel, protocol))

    message = _refused(path)

    if protocol >= 2:
        assert f"it starts with the header of a pickle, protocol {protocol}" in message
    else:
        assert "its bytes parse as a protocol 0/1 pickle that imports 'io open'" in message


@pytest.mark.parametrize("name", list(_NAMES.values())[:3], ids=list(_NAMES)[:3])
@pytest.mark.parametrize("member", ["archive/data.pkl", "data.pkl", "model/weights.pt"])
def test_torch_zip_checkpoint_is_refused_under_any_name(tmp_path: Path, sentinel: Path, name: str, member: str) -> None:
    path = tmp_path / name
    path.write_bytes(torch_zip(payload(sentinel, 2), member))

    _refused(path, f"it is a zip archive (the PyTorch format) with the pickled member {member!r}")


def test_torch_zip_with_data_before_it_is_still_found(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 100 + torch_zip(payload(sentinel, 2)))

    _refused(path, "'archive/data.pkl'")


def test_pickle_bigger_than_the_sniff_window_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "model"
    path.write_bytes(pickle.dumps([_Payload(sentinel)] + [f"w{i}" for i in range(20_000)], protocol=0))

    _refused(path, "protocol 0/1 pickle", limits=PickleGuardLimits(max_sniff_bytes=4096))


def test_compressed_pickle_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pkl.gz"
    path.write_bytes(b"\x1f\x8b")

    _refused(path, "'.pkl.gz'")


def test_names_are_matched_without_regard_to_case_or_trailing_dots() -> None:
    assert has_pickle_suffix("MODEL.PT")
    assert has_pickle_suffix("model.ckpt. ")
    assert has_pickle_suffix("dir\\pytorch_model.bin")
    assert not has_pickle_suffix("model.safetensors")
    assert not has_pickle_suffix("pytorch_model.bin.index.json")
    assert not has_pickle_suffix("model")


def test_numpy_arrays_are_refused_under_any_name(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    path = tmp_path / "embeddings"
    path.write_bytes(buffer.getvalue())

    _refused(path, "NumPy .npy array")


def test_numpy_npz_archive_is_refused_under_any_name(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, weights=np.zeros(3))
    path = tmp_path / "weights.data"
    path.write_bytes(buffer.getvalue())

    _refused(path, "pickled member 'weights.npy'")


def test_zip_whose_directory_cannot_be_read_is_refused(tmp_path: Path, sentinel: Path) -> None:
    archive = torch_zip(payload(sentinel, 2))
    path = tmp_path / "model"
    path.write_bytes(archive[: len(archive) - 30])  # the end record is cut off

    _refused(path, "zip archive (the PyTorch format) whose directory could not be read")


def test_zip_directory_over_the_limit_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "model"
    path.write_bytes(torch_zip(payload(sentinel, 2)))

    _refused(path, "directory is larger than 100 bytes", limits=PickleGuardLimits(max_zip_directory_bytes=100))


def test_zip_end_record_claiming_a_huge_directory_is_refused(tmp_path: Path) -> None:
    end_record = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, 0xFFFFFFF0, 4, 0)
    path = tmp_path / "model"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 60 + end_record)

    _refused(path, "zip archive (the PyTorch format)")


# -- files that are not pickles ------------------------------------------------------------------------------------


def _accepted(path: Path) -> None:
    check_not_pickle(path)  # returns without raising


def test_safetensors_header_that_starts_with_the_pickle_magic_is_accepted(tmp_path: Path) -> None:
    # A header of 0x0380 = 896 bytes: the file starts 0x80 0x03, like a protocol 3 pickle.
    header = json.dumps({"__metadata__": {"pad": "x" * 867}}).encode()
    assert len(header) == 0x380
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert path.read_bytes()[:2] == b"\x80\x03"
    assert read_safetensors(path).header_size == 0x380

    _accepted(path)


_OTHER_FILES = {
    "empty": b"",
    "llama-cpp-header": b"GGUF\x03\x00\x00\x00" + b"\x00" * 64,
    "onnx-header": b"\x08\x08\x12\x07pytorch",
    "json": b'{"model_type": "llama"}',
    "python-imports": b"import os\nimport sys\nimport json\nimport torch\n",
    "word-list": b"cat\ndog\nbird\n",
    "markdown": b"# Model card\n\nThis model ...\n",
    "pickle-of-none-protocol-0": b"N.",  # refers to nothing callable
    "raw-weights-starting-0x80-0x02": b"\x80\x02\x00\x00\x00\x00",
    "random": random.Random(0).randbytes(4096),
}


@pytest.mark.parametrize("content", _OTHER_FILES.values(), ids=_OTHER_FILES.keys())
def test_other_files_are_accepted(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "file.data"
    path.write_bytes(content)

    _accepted(path)


def test_zip_without_pickled_members_is_accepted(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.safetensors", b"\0" * 16)
    path = tmp_path / "bundle.zip"
    path.write_bytes(buffer.getvalue())

    _accepted(path)


def test_missing_file_is_our_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="cannot open"):
        check_not_pickle(tmp_path / "absent")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)

    with pytest.raises(UnsafePathError, match="not a regular file"):
        check_not_pickle(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").mkdir()

    with pytest.raises(UnsafePathError, match="not a regular file"):
        check_not_pickle(tmp_path / "model.safetensors")


# -- properties ----------------------------------------------------------------------------------------------------

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_PICKLABLE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=15,
)


@_FUZZ
@given(value=_PICKLABLE, protocol=st.integers(2, pickle.HIGHEST_PROTOCOL))
def test_every_pickle_of_protocol_2_or_later_is_refused(tmp_path: Path, value: object, protocol: int) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(value, protocol=protocol))

    _refused(path, f"protocol {protocol}")


@_FUZZ
@given(value=_PICKLABLE, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_every_pickle_that_imports_something_is_refused(
    tmp_path: Path, sentinel: Path, value: object, protocol: int
) -> None:
    path = tmp_path / _NAMES["llama-cpp"]
    path.write_bytes(pickle.dumps([value, _Payload(sentinel)], protocol=protocol))

    _refused(path)


@_FUZZ
@given(content=st.binary(max_size=512))
def test_any_bytes_pass_or_raise_only_unsafe_format(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)

    with contextlib.suppress(UnsafeFormatError):
        check_not_pickle(path)


@_FUZZ
@given(data=st.data())
def test_any_byte_flip_of_a_torch_zip_passes_or_raises_only_unsafe_format(
    tmp_path: Path, sentinel: Path, data: st.DataObject
) -> None:
    archive = torch_zip(payload(sentinel, 2))
    position = data.draw(st.integers(0, len(archive) - 1))
    path = tmp_path / "model"
    path.write_bytes(archive[:position] + bytes([data.draw(st.integers(0, 255))]) + archive[position + 1 :])

    with contextlib.suppress(UnsafeFormatError):
        check_not_pickle(path)


def test_zz_the_sentinel_never_appeared(sentinel: Path) -> None:
    assert not sentinel.exists()
