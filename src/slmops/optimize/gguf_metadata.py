"""GGUF metadata that travels with a model through the torch passes.

A model that came from a GGUF keeps its source's ``tokenizer.*`` and ``general.*`` keys in
:data:`GGUF_METADATA_FILE`, a GGUF without tensors beside its safetensors (written by :func:`write_gguf_metadata`);
the exporter copies them back key for key (:func:`copy_gguf_metadata`), so the tokenizer survives the round trip
exactly. The ``gguf`` package is imported inside the functions (:func:`import_gguf`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slmops.errors import InvalidModelError, MissingExtraError
from slmops.optimize._files import replace_durably

__all__ = ["GGUF_METADATA_FILE", "copy_gguf_metadata", "import_gguf", "write_gguf_metadata"]

GGUF_METADATA_FILE = "gguf_metadata.gguf"


def import_gguf(purpose: str) -> Any:
    """The ``gguf`` package, or a :class:`MissingExtraError` naming the ``llama`` extra."""
    try:
        import gguf
    except ImportError:
        raise MissingExtraError("llama", purpose, "gguf") from None
    return gguf


def copy_gguf_metadata(reader: Any, writer: Any, prefixes: tuple[str, ...], *, skip: Iterable[str] = ()) -> list[str]:
    """Copy every key of ``reader`` that starts with one of ``prefixes`` into ``writer``, types and all."""
    gguf = import_gguf("copying GGUF metadata")
    skipped = set(skip)
    copied = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skipped or not key.startswith(prefixes):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise InvalidModelError(f"GGUF key {key} is a nested array, which the exporter cannot copy")
            writer.add_key_value(key, field.contents(), vtype, sub_type=gguf.GGUFValueType(field.types[1]))
        else:
            writer.add_key_value(key, field.contents(), vtype)
        copied.append(key)
    return copied


def write_gguf_metadata(
    gguf_path: Path, destination: Path, prefixes: tuple[str, ...] = ("tokenizer.", "general.")
) -> Path:
    """Write a tensor-less GGUF at ``destination`` with the metadata keys of ``gguf_path`` under ``prefixes``."""
    gguf = import_gguf("copying GGUF metadata")
    reader = gguf.GGUFReader(str(gguf_path))
    arch = str(reader.fields["general.architecture"].contents())
    destination = Path(destination)
    temp = destination.with_name(f".{destination.name}.tmp")
    writer = gguf.GGUFWriter(str(temp), arch)
    copy_gguf_metadata(reader, writer, prefixes, skip=("general.architecture",))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return replace_durably(temp, destination)
