from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.cli import run
from slmops.config import Settings
from slmops.core.device_profiles import DEVICE_PROFILES, DeviceProfile
from slmops.optimize.recipe import load_recipe
from slmops.optimize.runner import run_recipe
from slmops.registry import Registry
from tests.tiny_gguf import write_tiny_gguf

pytest.importorskip("llama_cpp")

_TEXT = "the quick brown fox jumps over the lazy dog and runs far away into the green hills. " * 4
_TASKS = [
    {"id": "a", "prompt": "Question: one plus one?\nAnswer:", "options": [" two", " seven"], "answer": 0},
    {"id": "b", "prompt": "Question: opposite of up?\nAnswer:", "options": [" left", " down", " blue"], "answer": 1},
]


def _recipe(tmp_path: Path, source: str = "tiny", profiles: str = "[gateway-2gb, tiny-1mb]") -> Path:
    (tmp_path / "text.txt").write_text(_TEXT, encoding="utf-8")
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(t) for t in _TASKS), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
name: test
source: {source}
evaluation:
  text: text.txt
  max_tokens: 256
  context_tokens: 64
  tasks: tasks.jsonl
  device_profiles: {profiles}
  speed_prompt_tokens: 16
  speed_decode_tokens: 4
variants:
  - name: f16
    passes: [dequantize]
  - name: q8_0
    passes: [dequantize, {{quantize: {{type: Q8_0}}}}]
""",
        encoding="utf-8",
    )
    return recipe


@pytest.fixture
def tiny_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DEVICE_PROFILES, "tiny-1mb", DeviceProfile("tiny-1mb", 1, 1 << 20))


@pytest.fixture
def tiny_source(tmp_path: Path, registry: Registry) -> str:
    model = write_tiny_gguf(tmp_path / "tiny.gguf", arch="gemma3", file_type="Q8_0", n_embd=64, n_ff=128)
    return registry.import_model(model, "tiny").envelope.digest


def test_a_recipe_makes_evaluates_and_registers_variants_with_lineage(
    tmp_path: Path, registry: Registry, tiny_source: str, tiny_profile: None
) -> None:
    recipe = load_recipe(_recipe(tmp_path))
    settings = Settings(home=tmp_path / "home")

    first = run_recipe(registry, recipe, settings=settings)

    f16, q8 = first.variants
    assert [v.created for v in first.variants] == [True, True]
    assert f16.envelope.manifest.lineage.parents == [tiny_source]
    assert [s.pass_name for s in f16.envelope.manifest.lineage.recipe.steps] == ["dequantize"]  # type: ignore[union-attr]
    assert q8.envelope.manifest.lineage.parents == [f16.envelope.digest]  # the shared prefix is the parent
    assert [(s.pass_name, s.params["type"]) for s in q8.envelope.manifest.lineage.recipe.steps] == [  # type: ignore[union-attr]
        ("quantize", "Q8_0")
    ]
    assert q8.envelope.manifest.source.origin == f16.envelope.digest
    assert q8.envelope.manifest.variant == "q8_0" and q8.envelope.manifest.facts.quantization == "Q8_0"
    metrics = q8.envelope.manifest.metrics
    assert metrics["perplexity"] > 1 and metrics["perplexity_tokens"] == 4 * 32
    assert 0 <= metrics["accuracy"] <= 1 and metrics["accuracy_items"] == 2
    assert metrics["size_bytes"] == q8.envelope.manifest.total_size
    assert metrics["fits@gateway-2gb"] == 1 and metrics["decode_tokens_per_s@gateway-2gb"] > 0
    assert metrics["peak_rss_bytes@gateway-2gb"] >= metrics["peak_rss_load_bytes@gateway-2gb"] > 0
    assert metrics["fits@tiny-1mb"] == 0 and "decode_tokens_per_s@tiny-1mb" not in metrics  # not run
    assert first.source_metrics["perplexity"] > 1
    assert "measured on" in first.notes[0]

    again = run_recipe(registry, recipe, settings=settings)

    assert [v.created for v in again.variants] == [False, False]
    assert all(s.cached for v in again.variants for s in v.steps)
    assert all(v.evaluation_cached for v in again.variants)
    assert [v.envelope.digest for v in again.variants] == [v.envelope.digest for v in first.variants]


def test_a_cached_step_is_not_run_again(
    tmp_path: Path, registry: Registry, tiny_source: str, tiny_profile: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slmops.optimize import gguf_passes

    recipe = load_recipe(_recipe(tmp_path, profiles="[tiny-1mb]"))
    run_recipe(registry, recipe, settings=Settings(home=tmp_path / "home"))

    def refuse(*args: object) -> None:
        raise AssertionError("a cached pass ran again")

    monkeypatch.setattr(gguf_passes.Dequantize, "run", refuse)
    monkeypatch.setattr(gguf_passes.Quantize, "run", refuse)

    again = run_recipe(registry, recipe, settings=Settings(home=tmp_path / "home"))

    assert len(again.variants) == 2


def test_optimize_report_and_select_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_source: str, tiny_profile: None
) -> None:
    recipe = _recipe(tmp_path)
    assert run(["optimize", str(recipe), "--json"]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in ran["variants"]] == ["f16", "q8_0"]

    png = tmp_path / "pareto.png"
    assert run(["optimize", "report", "tiny", "--png", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in report["variants"]] == [None, "f16", "q8_0"]
    assert report["variants"][0]["is_source"] and report["variants"][0]["metrics_from"] == "last optimize run"
    assert report["variants"][2]["delta_perplexity_pct"] is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert run(["optimize", "report", "tiny"]) == 0
    table = capsys.readouterr().out
    assert "q8_0" in table and "Δppl" in table and "source" in table

    assert run(["model", "select", "tiny", "--device-class", "gateway-2gb", "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["chosen"] is not None and len(chosen["rejected"]) == 2
    assert run(["model", "select", "tiny", "-d", "gateway-2gb", "--objective", "smallest_within"]) == 0
    assert "why the others lost" in capsys.readouterr().out

    assert run(["model", "select", "tiny", "-d", "tiny-1mb", "--json"]) == 1
    none = json.loads(capsys.readouterr().out)
    assert none["chosen"] is None and all("does not fit" in r["reason"] for r in none["rejected"])

    assert run(["model", "select", "tiny", "-d", "phone"]) == 3
    assert "unknown device class 'phone'" in capsys.readouterr().err


def test_a_bad_recipe_exits_with_the_blueprint_error_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: r\nsource: m\nvariants:\n  - {name: a, passes: [{squash: {}}]}\n", encoding="utf-8")

    assert run(["optimize", str(bad)]) == 8
    assert "unknown pass 'squash'" in capsys.readouterr().err


def test_a_torch_chain_runs_through_the_recipe_runner_and_registers_a_gguf_variant(
    tmp_path: Path, registry: Registry
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model = write_tiny_gguf(tmp_path / "tiny.gguf", arch="llama", file_type="F32", n_embd=64, n_ff=128)
    source = registry.import_model(model, "tiny").envelope.digest
    path = _recipe(tmp_path, profiles="[gateway-2gb]")
    text = path.read_text().split("variants:")[0]
    path.write_text(
        text
        + """variants:
  - name: prune50
    passes: [hf_from_gguf, {prune: {sparsity: 0.5, scope: global}}, {export_gguf: {file_type: F32}}]
""",
        encoding="utf-8",
    )

    result = run_recipe(registry, load_recipe(path), settings=Settings(home=tmp_path / "home"))

    [variant] = result.variants
    m = variant.envelope.manifest
    assert m.format == "gguf" and m.variant == "prune50"
    assert [s.pass_name for s in m.lineage.recipe.steps] == ["hf_from_gguf", "prune", "export_gguf"]  # type: ignore[union-attr]
    assert m.lineage.parents == [source]
    prune_report = next(s.report for s in variant.steps if s.pass_name == "prune")
    assert abs(prune_report["overall_sparsity"] - 0.5) < 0.01
    assert m.metrics["perplexity"] > 1 and m.metrics["decode_tokens_per_s@gateway-2gb"] > 0
    assert registry.verify(variant.envelope.digest).ok
