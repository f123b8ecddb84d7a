"""The GGUF passes and the evaluation on the real default model (gemma3-270m): run with ``-m integration``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from slmops.optimize._data import read_text
from slmops.optimize.evaluate import perplexity, tokenize_for_eval
from slmops.optimize.passes import get_pass
from slmops.registry.formats.gguf import read_gguf

pytestmark = pytest.mark.integration

_TOKENS = 1024
_CONTEXT = 512


def _noop(done: float, total: float) -> None:
    return None


def _run(name: str, params: dict[str, object], source: Path, workdir: Path) -> Path:
    the_pass = get_pass(name)
    workdir.mkdir()
    return the_pass.run(source, the_pass.parse_params(params), workdir, _noop).output_path


@pytest.fixture(scope="module")
def models(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("gemma-variants")
    f16 = _run("dequantize", {}, gemma_gguf, root / "f16")
    yield {
        "source": gemma_gguf,
        "f16": f16,
        "q8_0": _run("quantize", {"type": "Q8_0"}, f16, root / "q8_0"),
        "q4_k_m": _run("quantize", {"type": "Q4_K_M"}, f16, root / "q4_k_m"),
        "q4_k_m-imat": _run("quantize", {"type": "Q4_K_M", "imatrix": {}}, f16, root / "q4_k_m-imat"),
    }


@pytest.fixture(scope="module")
def ppl(models: dict[str, Path]) -> dict[str, float]:
    tokens = tokenize_for_eval(models["source"], read_text("builtin:eval.txt"), _TOKENS, []).text
    return {name: perplexity(path, tokens, context_tokens=_CONTEXT, threads=2)[0] for name, path in models.items()}


def test_the_f16_copy_keeps_every_key_and_holds_only_f16_and_f32(models: dict[str, Path]) -> None:
    source, f16 = read_gguf(models["source"]), read_gguf(models["f16"])

    assert set(f16.metadata) == set(source.metadata)
    assert f16.metadata["general.file_type"] == 1 and f16.vocab_size == source.vocab_size == 262144
    assert {t.type_name for t in f16.tensors} == {"F16", "F32"}


def test_q8_0_perplexity_is_within_2_percent_of_f16(ppl: dict[str, float]) -> None:
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.02, ppl


def test_the_quality_aware_4_bit_variant_beats_plain_q4_k_m_at_no_larger_size(
    models: dict[str, Path], ppl: dict[str, float]
) -> None:
    plain, imat = models["q4_k_m"].stat().st_size, models["q4_k_m-imat"].stat().st_size

    assert imat <= plain, (imat, plain)
    assert ppl["q4_k_m-imat"] < ppl["q4_k_m"], ppl
