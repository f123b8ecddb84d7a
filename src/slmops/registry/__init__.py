"""The model registry: blob stores, signed manifests, versions, aliases, lineage and air-gap bundles."""

from __future__ import annotations

from slmops.registry.blobstore import BlobRef, BlobStore, DirectoryBlobStore, hash_file, open_blob_store
from slmops.registry.bundle import BundleContents, export_bundle, import_bundle
from slmops.registry.pull import KNOWN_MODELS, pull
from slmops.registry.service import (
    GcReport,
    ImportResult,
    ModelSummary,
    ProgressFactory,
    Registry,
    VerifyProblem,
    VerifyReport,
    parse_ref,
)
from slmops.registry.signing import KeyRing, verify_envelope

__all__ = [
    "KNOWN_MODELS",
    "BlobRef",
    "BlobStore",
    "BundleContents",
    "DirectoryBlobStore",
    "GcReport",
    "ImportResult",
    "KeyRing",
    "ModelSummary",
    "ProgressFactory",
    "Registry",
    "VerifyProblem",
    "VerifyReport",
    "export_bundle",
    "hash_file",
    "import_bundle",
    "open_blob_store",
    "parse_ref",
    "pull",
    "verify_envelope",
]
