"""The pass interface: one model file (or directory) in, one out, with a report of what was done.

How to write a pass (for example a GGUF pass; the torch passes that edit a model in memory derive from
:class:`~slmops.optimize.torch_passes.ModelEditPass`, which loads and saves it and asks only for ``edit``)::

    from pydantic import Field
    from slmops.optimize.passes import Pass, PassParams, PassProgress, register_pass

    class ShrinkParams(PassParams):
        ratio: float = Field(gt=0, lt=1)

    @register_pass
    class Shrink(Pass[ShrinkParams]):
        name = "shrink"
        input_format = "gguf"
        output_format = "gguf"
        params_model = ShrinkParams
        version = 1                      # bump when the same params start giving different bytes

        def variant_label(self, params: ShrinkParams) -> str:
            return f"shrink{round(params.ratio * 100)}"

        def apply(self, input_path, params, output, progress) -> dict[str, Any]:
            import gguf                  # heavy imports inside apply(), never at module level
            ...                          # write the new model at `output`
            progress(done, total)        # any unit; the CLI draws one bar per pass
            return {"ratio": params.ratio, "per_tensor": {...}}

and add the module's import path to :data:`PASS_MODULES` (``slmops.optimize.torch_passes``) so that
:func:`get_pass` finds it. :meth:`Pass.run` does the common part around ``apply``: it checks that the input is a
file (GGUF, ONNX) or a directory (safetensors) as ``input_format`` says, names the output
(:meth:`Pass.output_path`: ``workdir/model`` for safetensors, ``workdir/model-<label>.gguf`` for a file) and builds
the :class:`PassResult`. The contract:

- ``run`` reads ``input_path`` (a file or a directory in ``input_format``) and writes its output *inside*
  ``workdir`` (a fresh, empty directory that the runner owns and moves into the cache when ``run`` returns); it never
  modifies its input, never writes elsewhere, and returns the output's path (file or directory, in
  ``output_format``). ``apply`` writes exactly at the ``output`` it is given.
- ``params`` is already validated by ``params_model`` (frozen pydantic, ``extra="forbid"``): typos in a recipe are
  errors, not silently ignored. Defaults are written out by :meth:`Pass.canonical_params`, which is what the cache
  key and the lineage record, so adding a new field with a default that keeps the old behaviour is safe.
- The result must depend only on (input bytes, pass name, ``version``, canonical params): the runner caches it under
  that key (:meth:`Pass.cache_key`), and a re-run with the same key does no work.
- ``report`` is JSON-serialisable; it is shown by the CLI and kept beside the cached output (for example: which
  tensors fell back to another type, the achieved sparsity per tensor).
- Raise an :class:`slmops.errors.SLMOpsError` subclass with a message that says what was expected, what was found
  and what to do (``InvalidModelError`` for an input it cannot handle, ``MissingExtraError`` for a missing optional
  dependency, ``RuntimeBackendError`` when the backend fails).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from slmops.core.manifest import canonical_json, digest_bytes
from slmops.errors import BlueprintError, InvalidModelError

__all__ = [
    "PASS_MODULES",
    "ModelFileFormat",
    "Pass",
    "PassParams",
    "PassProgress",
    "PassResult",
    "get_pass",
    "pass_names",
    "register_pass",
]

ModelFileFormat = Literal["gguf", "safetensors", "onnx"]
PassProgress = Callable[[float, float], None]
"""Called as ``progress(done, total)`` in any unit the pass likes; cheap, may be called often."""

PASS_MODULES: tuple[str, ...] = (
    "slmops.optimize.gguf_passes",
    "slmops.optimize.torch_passes",
    "slmops.optimize.lora",
    "slmops.optimize.gguf_lora",
    "slmops.optimize.distill",
    "slmops.optimize.export_onnx_genai",
)
"""Modules that define the built-in passes; imported (cheaply: no heavy imports at module level) on first lookup."""


class PassParams(BaseModel):
    """Base class of every pass's parameters: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


P = TypeVar("P", bound=PassParams)


@dataclass(frozen=True)
class PassResult:
    output_path: Path
    report: dict[str, Any] = field(default_factory=dict)


class Pass(ABC, Generic[P]):
    """One optimization step. Subclasses set the class attributes and implement :meth:`apply`; :meth:`run` wraps it
    in what every pass shares (input check, output naming, the result)."""

    name: ClassVar[str]
    input_format: ClassVar[ModelFileFormat]
    output_format: ClassVar[ModelFileFormat]
    params_model: type[P]
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""

    def parse_params(self, raw: Mapping[str, Any] | None) -> P:
        """Validate recipe parameters; a :class:`BlueprintError` that names the pass and the bad field otherwise."""
        try:
            return self.params_model.model_validate(dict(raw or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(params)'}: {e['msg']}" for e in exc.errors()
            )
            fields = ", ".join(self.params_model.model_fields) or "none"
            raise BlueprintError(
                f"invalid parameters for pass '{self.name}': {problems}; its parameters are: {fields}"
            ) from None

    def canonical_params(self, params: P) -> dict[str, Any]:
        """Every parameter including defaults, as JSON values: what the cache key and the lineage record."""
        return params.model_dump(mode="json")

    def cache_key(self, input_digest: str, params: P) -> str:
        """sha256 (hex) of (input digest, pass name, ``version``, canonical params): where the runner caches the
        output of this step."""
        canonical = self.canonical_params(params)
        key = {"input": input_digest, "pass": self.name, "version": self.version, "params": canonical}
        return digest_bytes(canonical_json(key)).removeprefix("sha256:")

    def variant_label(self, params: P) -> str:
        """A short name for what this step makes, e.g. ``q4_k_m``; used when a recipe names no variant."""
        return self.name

    def output_stem(self, params: P) -> str:
        """The ``<stem>`` of an output file ``model-<stem>.gguf``; the variant label unless a pass says otherwise."""
        return self.variant_label(params)

    def output_path(self, workdir: Path, params: P) -> Path:
        """``workdir/model`` for a safetensors directory, ``workdir/model-<stem>.<format>`` for a single file."""
        if self.output_format == "safetensors":
            return workdir / "model"
        return workdir / f"model-{self.output_stem(params)}.{self.output_format}"

    def check_input(self, input_path: Path) -> None:
        """An :class:`InvalidModelError` unless ``input_path`` is what ``input_format`` reads: a directory for
        safetensors, a file for GGUF and ONNX."""
        wants_directory = self.input_format == "safetensors"
        if input_path.is_dir() if wants_directory else input_path.is_file():
            return
        wanted = "a safetensors model directory" if wants_directory else f"a {self.input_format.upper()} file"
        found = "a file" if input_path.is_file() else "a directory" if input_path.is_dir() else "nothing"
        raise InvalidModelError(
            f"pass '{self.name}' reads {wanted}, found {found} at {input_path}; each pass of a recipe reads what the "
            "one before it writes (hf_from_gguf turns a GGUF into safetensors, export_gguf turns it back)"
        )

    def run(self, input_path: Path, params: P, workdir: Path, progress: PassProgress) -> PassResult:
        """Transform ``input_path`` into a new model inside ``workdir``; see the module docstring."""
        self.check_input(input_path)
        output = self.output_path(workdir, params)
        return PassResult(output, self.apply(input_path, params, output, progress))

    @abstractmethod
    def apply(self, input_path: Path, params: P, output: Path, progress: PassProgress) -> dict[str, Any]:
        """Write the model made from ``input_path`` at ``output`` (in ``output_format``); return the report."""


_PASSES: dict[str, type[Pass[Any]]] = {}
_loaded = False

T = TypeVar("T", bound=type[Pass[Any]])


def register_pass(cls: T) -> T:
    """Class decorator: make a pass available to recipes under ``cls.name``."""
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"pass name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _PASSES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        for module in PASS_MODULES:
            importlib.import_module(module)
        _loaded = True


def pass_names() -> list[str]:
    _load_builtin()
    return sorted(_PASSES)


def get_pass(name: str) -> Pass[Any]:
    """An instance of the pass called ``name``; a :class:`BlueprintError` listing the known passes otherwise."""
    _load_builtin()
    cls = _PASSES.get(name)
    if cls is None:
        raise BlueprintError(f"unknown pass '{name}'; known passes: {', '.join(sorted(_PASSES))}")
    return cls()
