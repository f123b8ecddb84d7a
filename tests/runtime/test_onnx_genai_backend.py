"""The ONNX Runtime GenAI backend on a tiny exported gemma3 (real runtime), the backend factory, and an ONNX GenAI
version held in A/B slots (imported into a real registry, staged, switched, rolled back, served from the slot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.errors import RuntimeBackendError
from slmops.runtime.backend import Backend, BackendConfig
from slmops.runtime.backends import installed_runtimes, open_backend, runtime_for_format
from slmops.runtime.onnx_genai_backend import OnnxGenAIBackend, split_stop

pytest.importorskip("torch")
pytest.importorskip("onnxruntime_genai")

CONTEXT = 256
GREEDY = {"temperature": 0.0, "top_p": 1.0, "stop": []}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_onnx_genai import export_tiny_onnx_genai

    return export_tiny_onnx_genai(tmp_path_factory.mktemp("onnx-genai"))


@pytest.fixture
def backend(exported: Path) -> OnnxGenAIBackend:
    opened = open_backend(exported, "onnx", BackendConfig(context_tokens=CONTEXT, threads=1), model_id="tiny@v1")
    assert isinstance(opened, OnnxGenAIBackend)
    yield opened
    opened.close()


def test_the_factory_picks_the_runtime_by_format(exported: Path) -> None:
    assert runtime_for_format("gguf") == "llama.cpp" and runtime_for_format("onnx") == "onnxruntime-genai"
    assert "onnxruntime-genai" in installed_runtimes()
    with pytest.raises(RuntimeBackendError, match="no runtime serves"):
        open_backend(exported, "safetensors", BackendConfig())
    with pytest.raises(RuntimeBackendError, match=r"genai_config\.json"):
        open_backend(exported.parent, "onnx", BackendConfig(), model_id="x")
    with pytest.raises(RuntimeBackendError, match="LoRA"):
        open_backend(exported, "onnx", BackendConfig(lora_path=exported / "a.gguf"))
    with pytest.raises(RuntimeBackendError, match="sliding window"):
        open_backend(exported, "onnx", BackendConfig(context_tokens=64))


def test_greedy_generation_is_deterministic_and_counts_tokens(backend: OnnxGenAIBackend) -> None:
    assert isinstance(backend, Backend)
    prompt = "hello world the model"
    n = backend.count_tokens(prompt)
    assert backend.count_tokens("<bos>" + prompt) == n  # the prompt's own BOS is not doubled
    first = backend.complete(prompt, max_tokens=12, **GREEDY)
    second = backend.complete(prompt, max_tokens=12, **GREEDY)
    assert first == second and first.prompt_tokens == n
    assert first.completion_tokens <= 12 and first.finish_reason in ("stop", "length")
    with backend.stream(prompt, max_tokens=12, **GREEDY) as stream:
        assert "".join(stream) == first.text
    assert (stream.completion_tokens, stream.finish_reason) == (first.completion_tokens, first.finish_reason)


def test_max_tokens_is_capped_by_the_context_and_bad_prompts_fail(backend: OnnxGenAIBackend) -> None:
    prompt = "hello"
    room = CONTEXT - backend.count_tokens(prompt)
    done = backend.complete(prompt, max_tokens=10_000, temperature=1.0, top_p=1.0, stop=[], seed=1)
    assert done.completion_tokens <= room
    if done.completion_tokens == room:
        assert done.finish_reason == "length"
    with pytest.raises(RuntimeBackendError, match="shorten the prompt"):
        backend.complete("hello " * CONTEXT, max_tokens=1, **GREEDY)
    with pytest.raises(RuntimeBackendError, match="max_tokens"):
        backend.complete(prompt, max_tokens=0, **GREEDY)


def test_sampling_follows_the_seed(backend: OnnxGenAIBackend) -> None:
    args = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "stop": []}
    assert backend.complete("the", seed=7, **args) == backend.complete("the", seed=7, **args)


def test_stop_strings_end_the_text_before_them(backend: OnnxGenAIBackend) -> None:
    free = backend.complete("hello world", max_tokens=24, **GREEDY).text
    if len(free) < 4:
        pytest.skip("the random model ended at once")
    stop = free[2:4]
    cut = backend.complete("hello world", max_tokens=24, temperature=0.0, top_p=1.0, stop=[stop])
    assert cut.text == free[: free.find(stop)] and cut.finish_reason == "stop"


def test_prompt_nll_is_measured_when_sampled(exported: Path) -> None:
    config = BackendConfig(context_tokens=CONTEXT, threads=1, prompt_nll_sample_rate=1.0, prompt_nll_max_tokens=4)
    backend = OnnxGenAIBackend.load(exported, "tiny", config)
    try:
        stream = backend.stream("hello world the model runs", max_tokens=2, **GREEDY)
        "".join(stream)
        assert stream.prompt_nll is not None and stream.prompt_nll > 0
        assert backend.prompt_nll([2], 4) is None
    finally:
        backend.close()
    with pytest.raises(RuntimeBackendError, match="unloaded"):
        backend.count_tokens("x")


def test_split_stop_holds_back_a_possible_stop_prefix() -> None:
    assert split_stop("abc", ["cd"]) == ("ab", "c", False)
    assert split_stop("abcd e", ["cd"]) == ("ab", "", True)
    assert split_stop("abc", []) == ("abc", "", False)


def test_an_onnx_genai_version_lives_in_ab_slots(exported: Path, registry: object, tmp_path: Path) -> None:
    from slmops.agent.slots import Slots
    from slmops.core.candidates import runtime_of
    from slmops.registry.blobstore import DirectoryBlobStore
    from tests.tiny_gguf import write_tiny_gguf

    gguf = registry.import_model(write_tiny_gguf(tmp_path / "g" / "tiny.gguf", seed=1), "tiny").envelope  # type: ignore[attr-defined]
    onnx = registry.import_model(exported, "tiny").envelope  # type: ignore[attr-defined]
    assert onnx.manifest.format == "onnx" and runtime_of(onnx.manifest) == "onnxruntime-genai"
    cache = DirectoryBlobStore(tmp_path / "cache")
    cache.initialize()
    for envelope in (gguf, onnx):
        for entry in envelope.manifest.files:
            cache.put_file(registry.blob_path(entry.digest), entry.digest)  # type: ignore[attr-defined]
    slots = Slots(tmp_path / "slots", cache)
    slots.stage(gguf)
    slots.stage(onnx)
    slots.verify(onnx.digest)
    assert slots.switch(gguf.digest) is None
    assert slots.switch(onnx.digest) == gguf.digest

    directory = slots.model_file(slots.current() or "")
    assert directory.is_dir() and sorted(p.name for p in directory.iterdir()) == sorted(
        e.path for e in onnx.manifest.files
    )
    served = open_backend(directory, onnx.manifest.format, BackendConfig(context_tokens=CONTEXT, threads=1))
    try:
        assert served.complete("hello", max_tokens=3, **GREEDY).completion_tokens >= 1
    finally:
        served.close()
    assert slots.rollback() == gguf.digest
    assert slots.model_file(gguf.digest).suffix == ".gguf"
