"""Prompt NLL on the real default model: gibberish surprises gemma3-270m more than ordinary sentences do."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from slmops.runtime.backend import BackendConfig, LlamaCppBackend

pytestmark = pytest.mark.integration

NATURAL = [
    "The train to the airport leaves every twenty minutes from the second platform, and tickets can be bought at",
    "Please remind me to call the dentist tomorrow morning and to pick up the groceries on the way home from work",
    "Our shop opens at nine on weekdays and at ten on Saturdays; on Sundays and public holidays we stay closed",
    "The patient reported a mild headache after lunch, so the nurse measured her blood pressure and wrote it down",
]


@pytest.fixture(scope="module")
def gemma(gemma_gguf: Path) -> Iterator[LlamaCppBackend]:
    config = BackendConfig(context_tokens=512, threads=2, prompt_nll_sample_rate=1.0, prompt_nll_max_tokens=32)
    backend = LlamaCppBackend.load(gemma_gguf, "gemma3-270m@v1", config)
    yield backend
    backend.close()


def _nll(backend: LlamaCppBackend, prompt: str) -> float:
    with backend.stream(prompt, max_tokens=1, temperature=0.0, top_p=1.0, stop=[]) as pieces:
        "".join(pieces)
        assert pieces.prompt_nll is not None and math.isfinite(pieces.prompt_nll)
        return pieces.prompt_nll


def test_random_tokens_score_a_higher_nll_than_natural_text(gemma: LlamaCppBackend) -> None:
    rng = random.Random(0)
    vocab = gemma._require_open().n_vocab()
    gibberish = [
        gemma._require_open().detokenize([rng.randrange(1000, vocab) for _ in range(40)]).decode("utf-8", "replace")
        for _ in NATURAL
    ]

    natural = [_nll(gemma, text) for text in NATURAL]
    surprising = [_nll(gemma, text) for text in gibberish]

    assert all(0 < v < 20 for v in natural + surprising)
    assert max(natural) < min(surprising)
    assert sum(surprising) / len(surprising) > sum(natural) / len(natural) + 2.0  # nats per token
