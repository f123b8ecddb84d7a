"""Refuse pickle checkpoints by name and by content, without ever unpickling them.

Unpickling runs arbitrary code chosen by whoever wrote the file, so a registry that hands models to a fleet must not
accept pickles at all: ``torch.load`` on a ``pytorch_model.bin`` from the internet is remote code execution. This
module never imports :mod:`pickle`; it looks at file names and at a bounded number of bytes:

* the name: a suffix in :data:`PICKLE_SUFFIXES` (also under a compression suffix, ``model.pkl.gz``);
* the first bytes: the PROTO opcode of pickle protocols 2-5 (``0x80 0x02``..``0x80 0x05``; the legacy ``torch.save``
  format starts this way) followed by valid opcodes, the magic string of a NumPy ``.npy`` array, or a protocol 0/1
  stream that imports something; opcodes are read with :func:`pickletools.genops`, a parser that executes nothing;
* the zip central directory: an entry whose name has a pickle suffix, such as ``archive/data.pkl`` in the zip format
  that ``torch.save`` has written since PyTorch 1.6, or ``.npy`` members of a NumPy ``.npz``.

Reads are bounded by :class:`PickleGuardLimits`; the only errors raised are :class:`~slmops.errors.UnsafeFormatError`
for a pickle, :class:`~slmops.errors.UnsafePathError` for something that is not a regular file, and
:class:`~slmops.errors.InvalidModelError` when the file cannot be read at all.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from slmops.errors import InvalidModelError, UnsafeFormatError, UnsafePathError
from slmops.registry.formats._io import open_regular

__all__ = ["PICKLE_SUFFIXES", "PickleGuardLimits", "check_not_pickle", "has_pickle_suffix"]

# Names that pickle-based tools write. ``.bin`` is pytorch_model.bin (transformers' legacy torch.save format);
# ``.npy``/``.npz`` are refused too: a NumPy array with dtype=object is stored as a pickle after the .npy header, and
# ``np.load(..., allow_pickle=True)`` runs it. We cannot tell a safe .npy from an unsafe one without parsing its
# header, and no runtime we ship needs .npy weights, so refusing them costs nothing. ``.dill``, ``.joblib`` and
# PaddlePaddle's ``.pdparams`` are pickles under other names.
PICKLE_SUFFIXES: frozenset[str] = frozenset(
    {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".dill", ".npy", ".npz", ".pdparams"}
)
# A pickle compressed as a whole keeps its pickle suffix before one of these (model.pkl.gz).
_COMPRESSION_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".lzma", ".zst", ".lz4", ".z", ".zip"})

_PICKLE_PROTO = 0x80
_PICKLE_PROTOCOLS = range(2, 6)
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_LOCAL_HEADER = b"PK\x03\x04"
# First bytes of a protocol 0/1 pickle (opcodes defined in protocols 0 and 1); anything else is not worth parsing.
_OLD_PROTOCOL_OPCODES = frozenset(ord(op.code) for op in pickletools.opcodes if op.proto <= 1)

_HOW_TO_CONVERT = (
    "it was not loaded, because unpickling runs arbitrary code. To convert it, load it in a trusted, isolated "
    "environment with `torch.load(path, weights_only=True)` and save it with "
    "`safetensors.torch.save_file(state_dict, 'model.safetensors')`, or use "
    "`model.save_pretrained(dir, safe_serialization=True)` in transformers; then import the safetensors file"
)


@dataclass(frozen=True)
class PickleGuardLimits:
    max_sniff_bytes: int = 1024 * 1024  # bytes parsed from the start when looking for a protocol 0/1 pickle
    max_zip_directory_bytes: int = 32 * 1024 * 1024  # bytes zipfile may read to list an archive's entries


def has_pickle_suffix(name: str) -> bool:
    """True if a file name says pickle: ``model.pt``, ``pytorch_model.bin``, ``weights.pkl.gz``."""
    return _pickle_suffix(name) is not None


def _pickle_suffix(name: str) -> str | None:
    # Windows drops trailing dots and spaces, so "model.pkl. " is model.pkl there.
    suffixes = [s.lower() for s in PurePosixPath(name.replace("\\", "/").rstrip(". ") or "_").suffixes]
    if suffixes and suffixes[-1] in PICKLE_SUFFIXES:
        return suffixes[-1]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSION_SUFFIXES and suffixes[-2] in PICKLE_SUFFIXES:
        return "".join(suffixes[-2:])
    return None


def check_not_pickle(path: Path, limits: PickleGuardLimits = PickleGuardLimits()) -> None:
    """Raise :class:`UnsafeFormatError` if the file at ``path`` is, or may be, a pickle; return None otherwise."""
    suffix = _pickle_suffix(path.name)
    if suffix is not None:
        raise _refuse(path, f"its name ends in '{suffix}', a suffix of pickle files")
    try:
        opened = open_regular(path)
    except OSError as exc:
        raise InvalidModelError(
            f"cannot open '{path}' to check that it is not a pickle: {exc.strerror or exc}; "
            "check the path and its permissions"
        ) from None
    if opened is None:
        raise UnsafePathError(
            f"'{path.name}' is not a regular file; a model directory may only hold regular files "
            "(replace links and special files with copies of the files themselves)"
        )
    handle, size = opened
    try:
        with handle:
            reason = _sniff(handle, size, limits)
    except OSError as exc:
        raise InvalidModelError(
            f"cannot read '{path}' to check that it is not a pickle: {exc.strerror or exc}"
        ) from None
    if reason is not None:
        raise _refuse(path, reason)


def _refuse(path: Path, reason: str) -> UnsafeFormatError:
    return UnsafeFormatError(f"'{path.name}' is refused as a pickle checkpoint: {reason}; {_HOW_TO_CONVERT}")


def _sniff(handle: BinaryIO, file_size: int, limits: PickleGuardLimits) -> str | None:
    head = handle.read(min(file_size, limits.max_sniff_bytes))
    truncated = file_size > len(head)
    if len(head) >= 2 and head[0] == _PICKLE_PROTO and head[1] in _PICKLE_PROTOCOLS:
        # Two bytes alone would refuse one in 16384 files of raw weights (and safetensors headers of some sizes):
        # the opcodes that follow must parse too. Unpickling runs opcodes as it reads them, so a valid prefix is
        # enough to be dangerous; three opcodes are the fewest that can call anything.
        walk = _walk_opcodes(head)
        if walk.stopped or walk.count >= 3:
            return f"it starts with the header of a pickle, protocol {head[1]}"
    elif head.startswith(_NPY_MAGIC):
        return "it is a NumPy .npy array, which may hold pickled objects"
    elif head and head[0] in _OLD_PROTOCOL_OPCODES:
        # Protocols 0 and 1 can reach code only through GLOBAL or INST; text files rarely parse that far.
        walk = _walk_opcodes(head)
        complete = walk.stopped or (truncated and walk.count >= 16 and walk.last_pos >= len(head) - 4096)
        if complete and walk.imports:
            return f"its bytes parse as a protocol 0/1 pickle that imports {walk.imports[0]!r}"
    return _zip_pickle_entry(handle, file_size, head.startswith(_ZIP_LOCAL_HEADER), limits)


@dataclass
class _Walk:
    count: int = 0  # valid opcodes read
    last_pos: int = -1
    stopped: bool = False  # reached STOP
    imports: list[str] = field(default_factory=list)  # "module name" of GLOBAL/INST with identifier-shaped args


def _walk_opcodes(head: bytes) -> _Walk:
    """Parse ``head`` as pickle opcodes with :func:`pickletools.genops`, which reads and never executes."""
    walk = _Walk()
    try:
        for opcode, arg, pos in pickletools.genops(io.BytesIO(head)):
            walk.count += 1
            walk.last_pos = pos if pos is not None else walk.last_pos
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str) and _is_import(arg):
                walk.imports.append(arg)
            if opcode.name == "STOP":
                walk.stopped = True
                break
    except Exception:  # genops raises ValueError and others where the bytes stop being a pickle: that is the answer
        pass
    return walk


def _is_import(arg: str) -> bool:
    module, _, name = arg.partition(" ")
    return all(part.isidentifier() for part in module.split(".")) and all(p.isidentifier() for p in name.split("."))


class _DirectoryTooLargeError(Exception):
    pass


class _BoundedReader:
    """A read-only, seekable view of a file that refuses to read more than ``budget`` bytes in total."""

    def __init__(self, handle: BinaryIO, size: int, budget: int) -> None:
        self._handle = handle
        self._size = size
        self._pos = 0
        self._budget = budget

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        target = base + offset
        if target < 0:
            raise OSError("seek before the start of the file")
        self._pos = target
        return target

    def read(self, size: int | None = -1) -> bytes:
        n = max(0, self._size - self._pos) if size is None or size < 0 else min(size, max(0, self._size - self._pos))
        if n > self._budget:
            raise _DirectoryTooLargeError
        self._budget -= n
        self._handle.seek(self._pos)
        data = self._handle.read(n)
        self._pos += len(data)
        return data


def _zip_pickle_entry(handle: BinaryIO, file_size: int, starts_as_zip: bool, limits: PickleGuardLimits) -> str | None:
    reader = _BoundedReader(handle, file_size, limits.max_zip_directory_bytes)
    try:
        # ZipFile reads only the end record and the central directory; it never decompresses a member here.
        with zipfile.ZipFile(reader) as archive:
            names = archive.namelist()
    except _DirectoryTooLargeError:
        if starts_as_zip:
            return (
                f"it is a zip archive whose directory is larger than {limits.max_zip_directory_bytes} bytes, "
                "so it could not be checked for pickled members"
            )
        return None
    except Exception:  # zipfile raises a dozen exception types on hostile input
        if starts_as_zip:
            return "it is a zip archive (the PyTorch format) whose directory could not be read, so it may hold a pickle"
        return None  # not a zip archive at all: the common case for safetensors, GGUF, ONNX and JSON files
    for name in names:
        if has_pickle_suffix(name):
            return f"it is a zip archive (the PyTorch format) with the pickled member {name[:200]!r}"
    return None
