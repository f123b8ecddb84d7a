"""The slmops error tree.

Every error a user can cause or fix derives from :class:`SLMOpsError`. Messages say what was expected, what was
found, and what to do. The CLI prints ``str(error)`` and exits with ``error.exit_code``; the HTTP layer maps
``error.code`` to a status and a public message.

::

    SLMOpsError
    ├── ConfigError                 bad settings, missing signing key, unusable SLMOPS_HOME
    ├── MissingExtraError           an optional dependency group is not installed
    ├── NotFoundError               a model, version, alias, blob or key that does not exist
    ├── ConflictError               a label or alias already taken, a version still referenced
    ├── InvalidModelError           a model file or directory failed validation
    │   ├── InvalidGGUFError
    │   ├── InvalidSafetensorsError
    │   ├── InvalidONNXError
    │   ├── UnsafeFormatError       pickle checkpoints: refused, never loaded
    │   └── UnsafePathError         symlinks, special files, paths escaping the model directory
    ├── IntegrityError              bytes whose digest or size is not what the manifest says
    │   └── SignatureError          a missing, untrusted or wrong signature
    ├── BundleError                 a malformed or unsafe air-gap bundle
    ├── BlueprintError              a blueprint or recipe that does not parse or refers to nothing
    ├── AuthenticationError         no or bad credential (HTTP 401)
    ├── PermissionDeniedError       a credential that may not do this (HTTP 403)
    ├── UnavailableError            a server or device that cannot be reached now; retry later
    └── RuntimeBackendError         an inference backend that failed to load or generate
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BlueprintError",
    "BundleError",
    "ConfigError",
    "ConflictError",
    "IntegrityError",
    "InvalidGGUFError",
    "InvalidModelError",
    "InvalidONNXError",
    "InvalidSafetensorsError",
    "MissingExtraError",
    "NotFoundError",
    "PermissionDeniedError",
    "RuntimeBackendError",
    "SLMOpsError",
    "SignatureError",
    "UnavailableError",
    "UnsafeFormatError",
    "UnsafePathError",
]


class SLMOpsError(Exception):
    """Root of every error slmops raises on purpose."""

    code: str = "error"
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(SLMOpsError):
    code = "config"
    exit_code = 2


class MissingExtraError(SLMOpsError):
    code = "missing_extra"
    exit_code = 2

    def __init__(self, extra: str, purpose: str, module: str) -> None:
        super().__init__(
            f"{purpose} needs the optional dependency '{module}', which is not installed; "
            f"run `pip install 'slmops[{extra}]'`"
        )
        self.extra = extra
        self.module = module


class NotFoundError(SLMOpsError):
    code = "not_found"
    exit_code = 3


class ConflictError(SLMOpsError):
    code = "conflict"
    exit_code = 4


class InvalidModelError(SLMOpsError):
    code = "invalid_model"
    exit_code = 5


class InvalidGGUFError(InvalidModelError):
    code = "invalid_gguf"


class InvalidSafetensorsError(InvalidModelError):
    code = "invalid_safetensors"


class InvalidONNXError(InvalidModelError):
    code = "invalid_onnx"


class UnsafeFormatError(InvalidModelError):
    code = "unsafe_format"


class UnsafePathError(InvalidModelError):
    code = "unsafe_path"


class IntegrityError(SLMOpsError):
    code = "integrity"
    exit_code = 6


class SignatureError(IntegrityError):
    code = "signature"


class BundleError(SLMOpsError):
    code = "bundle"
    exit_code = 7


class BlueprintError(SLMOpsError):
    code = "invalid_blueprint"
    exit_code = 8


class AuthenticationError(SLMOpsError):
    code = "unauthenticated"
    exit_code = 9


class PermissionDeniedError(SLMOpsError):
    code = "forbidden"
    exit_code = 9


class UnavailableError(SLMOpsError):
    code = "unavailable"
    exit_code = 10


class RuntimeBackendError(SLMOpsError):
    code = "runtime_backend"
    exit_code = 11
