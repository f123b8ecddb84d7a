from __future__ import annotations

from pathlib import Path

import pytest

from slmops.errors import BlueprintError
from slmops.optimize.recipe import load_recipe


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_default_recipe_parses() -> None:
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "default.yaml")

    assert recipe.source == "gemma3-270m"
    assert [v.name for v in recipe.variants] == ["f16", "q8_0", "q4_0", "q4_k_m-imat"]
    assert recipe.variants[3].passes[1].params["type"] == "Q4_K_M"


def test_every_shipped_recipe_loads_and_the_second_runtime_one_ends_in_onnx_genai() -> None:
    shipped = {p.name: p for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml")}
    recipes = {name: load_recipe(path) for name, path in shipped.items()}  # every pass and parameter checked

    onnx = {v.name: [step.pass_name for step in v.passes] for v in recipes["onnx-genai.yaml"].variants}
    assert onnx == {"q4_0": ["dequantize", "quantize"], "ortgenai-int4": ["hf_from_gguf", "export_onnx_genai"]}


def test_both_step_spellings_are_accepted(tmp_path: Path) -> None:
    recipe = load_recipe(
        _write(
            tmp_path,
            "name: r\nsource: m\nvariants:\n  - name: a\n    passes:\n      - dequantize: {}\n"
            "      - {pass: quantize, params: {type: Q8_0}}\n",
        )
    )

    assert [(s.pass_name, s.params) for s in recipe.variants[0].passes] == [
        ("dequantize", {}),
        ("quantize", {"type": "Q8_0"}),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: r\nsource: [unclosed\n", r"not valid YAML at line \d+"),
        ("- just a list\n", "expected a mapping with name, source and variants"),
        ("name: r\nsource: m\nvariants: []\n", "variants: List should have at least 1 item"),
        ("name: r\nsource: m\nvariants:\n  - name: a\n    passes: [{squash: {}}]\n", "unknown pass 'squash'; known"),
        (
            "name: r\nsource: m\nvariants:\n  - name: a\n    passes: [{quantize: {type: Q9_9}}]\n",
            "variant 'a', step 1: invalid parameters for pass 'quantize': type: Input should be",
        ),
        (
            "name: r\nsource: m\nvariants:\n  - name: a\n    passes: [{quantize: {type: Q8_0, typo: 1}}]\n",
            "typo: Extra inputs are not permitted",
        ),
        (
            "name: r\nsource: m\nvariants:\n  - name: a\n"
            "    passes: [{quantize: {type: Q4_0, tensor_types: {'(': Q8_0}}}]\n",
            "is not a regular expression",
        ),
        (
            "name: r\nsource: m\nevaluation: {device_profiles: [phone]}\nvariants:\n"
            "  - name: a\n    passes: [dequantize]\n",
            "unknown device profiles phone; known: gateway-2gb",
        ),
        (
            "name: r\nsource: m\nevaluation: {max_tokens: 100, context_tokens: 512}\nvariants:\n"
            "  - name: a\n    passes: [dequantize]\n",
            "max_tokens \\(100\\) must be at least context_tokens \\(512\\)",
        ),
        (
            "name: r\nsource: m\nvariants:\n  - {name: a, passes: [dequantize]}\n  - {name: a, passes: [dequantize]}\n",
            "variant names must be unique; repeated: a",
        ),
        ("name: r\nsource: m\nvariants:\n  - {name: 'Bad Name', passes: [dequantize]}\n", "variant name 'Bad Name'"),
    ],
)
def test_recipe_errors_say_where_and_what(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BlueprintError, match=message):
        load_recipe(_write(tmp_path, text))


def test_a_missing_recipe_file_is_a_blueprint_error(tmp_path: Path) -> None:
    with pytest.raises(BlueprintError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")
