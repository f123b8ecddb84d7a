"""Model-version manifests: immutable, canonical JSON, identified by the sha256 of that JSON.

A manifest says everything an operator or an agent needs to know about one model version without opening its
files: what the files are (path, digest, size), what the files themselves say (architecture, parameter count,
quantization), how to run it (chat template, stop tokens), what it needs (memory), how good it is (metrics) and
where it came from (lineage). Signatures are kept beside the manifest, never inside it, so the digest of the
manifest is its identity and a signature signs exactly those bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "FileEntry",
    "License",
    "Lineage",
    "Manifest",
    "MemoryAtContext",
    "ModelFacts",
    "ModelFormat",
    "Recipe",
    "RecipeStep",
    "Requirements",
    "RuntimeHints",
    "Signature",
    "SignedManifest",
    "Source",
    "canonical_json",
    "digest_bytes",
    "is_digest",
]

MANIFEST_SCHEMA_VERSION = 1
ModelFormat = Literal["gguf", "safetensors", "onnx"]

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_LABEL_RE = re.compile(r"^v[1-9][0-9]{0,8}$")


def canonical_json(value: Any) -> bytes:
    """The one byte encoding of a JSON value that we hash and sign: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(value: str) -> bool:
    return bool(_DIGEST_RE.match(value))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    """One file of a model version: its path inside the version, and the blob that holds its bytes."""

    path: str
    digest: str
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative_posix(cls, value: str) -> str:
        parts = value.split("/")
        if not value or value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"file path {value!r} must be a relative POSIX path without '.', '..' or '//'")
        return value

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not is_digest(value):
            raise ValueError(f"digest {value!r} must look like 'sha256:<64 hex digits>'")
        return value


class ModelFacts(_Frozen):
    """What the model files themselves say, read by the format validators; never typed in by a user."""

    architecture: str | None = None
    parameter_count: int | None = None
    quantization: str | None = None
    vocab_size: int | None = None
    context_length: int | None = None
    # Format-specific facts used for estimates: block_count, embedding_length, head_count, head_count_kv,
    # key_length, value_length, tensor_types (type name -> tensor count), gguf_version, ...
    details: dict[str, Any] = Field(default_factory=dict)


class RuntimeHints(_Frozen):
    chat_template: str | None = None
    stop_tokens: list[str] = Field(default_factory=list)
    bos_token: str | None = None
    eos_token: str | None = None


class MemoryAtContext(_Frozen):
    context_tokens: int = Field(gt=0)
    bytes: int = Field(ge=0)


class Requirements(_Frozen):
    """Estimated memory: to load the weights, and to run with a KV cache of a given context length."""

    memory_load_bytes: int = Field(ge=0)
    memory_run: list[MemoryAtContext] = Field(default_factory=list)
    estimate_method: str = ""


class RecipeStep(_Frozen):
    pass_name: str = Field(alias="pass")
    params: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True)


class Recipe(_Frozen):
    name: str
    steps: list[RecipeStep] = Field(default_factory=list)


class Lineage(_Frozen):
    parents: list[str] = Field(default_factory=list)
    recipe: Recipe | None = None

    @field_validator("parents")
    @classmethod
    def _digests(cls, value: list[str]) -> list[str]:
        for item in value:
            if not is_digest(item):
                raise ValueError(f"parent {item!r} must be a manifest digest 'sha256:<64 hex digits>'")
        return value


class License(_Frozen):
    name: str
    notice: str = ""
    url: str | None = None


class Source(_Frozen):
    """Where the bytes came from: a local file or directory, a package, or a parent version."""

    kind: str
    origin: str = ""


class Manifest(_Frozen):
    schema_version: int = MANIFEST_SCHEMA_VERSION
    name: str
    version: str
    variant: str | None = None
    format: ModelFormat
    files: list[FileEntry]
    facts: ModelFacts = Field(default_factory=ModelFacts)
    runtime: RuntimeHints = Field(default_factory=RuntimeHints)
    requirements: Requirements
    metrics: dict[str, float] = Field(default_factory=dict)
    lineage: Lineage = Field(default_factory=Lineage)
    license: License | None = None
    source: Source
    created_at: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"model name {value!r} must be 1-128 characters of a-z, 0-9, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("version")
    @classmethod
    def _label(cls, value: str) -> str:
        if not _LABEL_RE.match(value):
            raise ValueError(f"version label {value!r} must look like v1, v2, ...")
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, value: list[FileEntry]) -> list[FileEntry]:
        if not value:
            raise ValueError("a model version needs at least one file")
        paths = [f.path for f in value]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths in a manifest must be unique")
        if paths != sorted(paths):
            raise ValueError("file entries must be sorted by path")
        return value

    def to_json_value(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def canonical(self) -> bytes:
        return canonical_json(self.to_json_value())

    @property
    def digest(self) -> str:
        return digest_bytes(self.canonical())

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_canonical(cls, data: bytes) -> Manifest:
        return cls.model_validate(json.loads(data.decode("utf-8")))

    def content_key(self) -> str:
        """Digest of what makes two versions the same model content, whatever their label and time."""
        value = {
            "format": self.format,
            "files": [f.model_dump(mode="json") for f in self.files],
            "variant": self.variant,
            "lineage": self.lineage.model_dump(mode="json", by_alias=True),
        }
        return digest_bytes(canonical_json(value))


class Signature(_Frozen):
    key_id: str
    algorithm: Literal["ed25519"] = "ed25519"
    value: str  # base64 of the signature over Manifest.canonical()


class SignedManifest(_Frozen):
    """The envelope stored and shipped: the manifest, its digest, and its signatures."""

    manifest: Manifest
    digest: str
    signatures: list[Signature] = Field(default_factory=list)

    @classmethod
    def from_json(cls, data: bytes | str) -> SignedManifest:
        return cls.model_validate_json(data)

    def to_json(self) -> str:
        return canonical_json(self.model_dump(mode="json", by_alias=True)).decode("utf-8")
