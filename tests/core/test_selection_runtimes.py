"""The variant chooser with runtimes: a device runs only what it has, a second runtime wins where it is measured
faster (fastest_within) or is the only one, and every rejection says why."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from slmops.core.candidates import runtime_of
from slmops.core.manifest import FileEntry, Manifest
from slmops.core.selection import VariantCandidate, VariantPolicy, choose_variant

GIB = 1 << 30


def _candidate(
    digest: str, runtime: str | None, ppl: float, speed: float | None, size: int = 300 << 20
) -> VariantCandidate:
    return VariantCandidate(
        digest=digest, label=digest, size_bytes=size, memory_bytes=500 << 20, perplexity=ppl,
        decode_tokens_per_s=speed, runtime=runtime,
    )  # fmt: skip


GGUF = _candidate("a-gguf", "llama.cpp", 21.4, 60.0, size=253 << 20)
ONNX = _candidate("b-onnx", "onnxruntime-genai", 21.6, 80.0, size=268 << 20)


def test_a_device_without_the_runtime_rejects_its_variant_with_a_reason() -> None:
    choice = choose_variant([GGUF, ONNX], 8 * GIB, VariantPolicy("fastest_within"))  # default: llama.cpp only
    assert choice.chosen == GGUF
    (rejected,) = choice.rejected
    assert rejected.digest == ONNX.digest
    assert "needs the runtime onnxruntime-genai; the device has llama.cpp" in rejected.reason


def test_the_second_runtime_wins_where_it_is_measured_faster() -> None:
    both = ["llama.cpp", "onnxruntime-genai"]
    choice = choose_variant([GGUF, ONNX], 8 * GIB, VariantPolicy("fastest_within"), runtimes=both)
    assert choice.chosen == ONNX and "on onnxruntime-genai" in choice.explanation
    assert [r.reason for r in choice.rejected] == ["slower: decode 60.0 tok/s vs 80.0 tok/s"]
    # best quality still picks the lower perplexity
    assert choose_variant([GGUF, ONNX], 8 * GIB, VariantPolicy(), runtimes=both).chosen == GGUF


def test_faster_but_too_far_in_quality_loses() -> None:
    worse = _candidate("c-onnx", "onnxruntime-genai", 37.0, 90.0)
    choice = choose_variant(
        [GGUF, worse], 8 * GIB, VariantPolicy("fastest_within"), runtimes=["llama.cpp", "onnxruntime-genai"]
    )
    assert choice.chosen == GGUF and "quality too far" in choice.rejected[0].reason


def test_the_only_runtime_a_device_has_is_chosen_and_unservable_formats_never_are() -> None:
    nothing = _candidate("d-st", None, 10.0, 100.0)
    choice = choose_variant([GGUF, ONNX, nothing], 8 * GIB, VariantPolicy(), runtimes=["onnxruntime-genai"])
    assert choice.chosen == ONNX
    reasons = {r.digest: r.reason for r in choice.rejected}
    assert "no runtime serves its format" in reasons["d-st"] and "needs the runtime llama.cpp" in reasons["a-gguf"]
    none = choose_variant([GGUF], 8 * GIB, VariantPolicy(), runtimes=[])
    assert none.chosen is None and "the device has none" in none.rejected[0].reason


def test_runtime_of_a_manifest() -> None:
    def manifest(fmt: str, *paths: str) -> Manifest:
        files = [FileEntry(path=p, digest="sha256:" + "0" * 64, size=1) for p in paths]
        return Manifest.model_construct(format=fmt, files=files)  # runtime_of reads only these

    assert runtime_of(manifest("gguf", "m.gguf")) == "llama.cpp"
    assert runtime_of(manifest("onnx", "genai_config.json", "model.onnx")) == "onnxruntime-genai"
    assert runtime_of(manifest("onnx", "model.onnx")) is None
    assert runtime_of(manifest("safetensors", "model.safetensors", "config.json")) is None


runtimes = st.lists(st.sampled_from(["llama.cpp", "onnxruntime-genai", "executorch"]), unique=True)


@given(
    st.lists(
        st.tuples(st.sampled_from(["llama.cpp", "onnxruntime-genai", None]), st.floats(1, 100), st.floats(1, 100)),
        max_size=6,
    ),
    runtimes,
    st.sampled_from(["best_quality", "smallest_within", "fastest_within"]),
)
def test_never_chooses_a_variant_the_device_cannot_run(
    specs: list[tuple[str | None, float, float]], installed: list[str], objective: str
) -> None:
    candidates = [_candidate(f"d{i}", r, p, s) for i, (r, p, s) in enumerate(specs)]
    choice = choose_variant(candidates, 8 * GIB, VariantPolicy(objective), runtimes=installed)  # type: ignore[arg-type]
    if choice.chosen is not None:
        assert choice.chosen.runtime in installed
    assert len(choice.rejected) + (choice.chosen is not None) == len(candidates)
