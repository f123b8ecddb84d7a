from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slmops.runtime import BackendConfig, LlamaCppBackend, ModelInfo
from tests.runtime._models import good_model

CONTEXT = 256


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return good_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture
def load() -> Iterator[Callable[..., tuple[LlamaCppBackend, ModelInfo]]]:
    """Load a GGUF with llama.cpp (1 thread); every backend still open is closed after the test."""
    opened: list[LlamaCppBackend] = []

    def factory(
        path: Path, model_id: str = "tiny@v1", chat_template: str | None = None, stop_tokens: list[str] | None = None
    ) -> tuple[LlamaCppBackend, ModelInfo]:
        backend = LlamaCppBackend.load(path, model_id, BackendConfig(context_tokens=CONTEXT, threads=1))
        opened.append(backend)
        info = ModelInfo.from_gguf(path, context_tokens=CONTEXT, model_id=model_id)
        if chat_template is not None or stop_tokens is not None:
            info = ModelInfo(
                model_id=model_id,
                digest=None,
                chat_template=chat_template if chat_template is not None else info.chat_template,
                stop_tokens=stop_tokens if stop_tokens is not None else info.stop_tokens,
                bos_token=info.bos_token,
                eos_token=info.eos_token,
                context_tokens=CONTEXT,
            )
        return backend, info

    yield factory
    for backend in opened:
        backend.close()
