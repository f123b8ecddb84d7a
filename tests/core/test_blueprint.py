from __future__ import annotations

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from slmops.core.blueprint import Blueprint, parse_blueprint, precedence
from slmops.core.wire import Capabilities
from slmops.errors import BlueprintError

GiB = 1 << 30
FULL = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: tills-berlin}
spec:
  priority: 10
  selector:
    labels: {site: berlin-3}
    min_memory_gib: 2
    arch: x86_64
    cpu_flags: [avx2]
    device_class: [x86_64-8gb]
  model: {name: gemma3-270m, ref: stable}
  variant:
    policy: {objective: smallest_within, max_memory_fraction: 0.4}
  runtime: {threads: 4, context_tokens: 1024, port: 9000}
  adaptations: {system_prompt: true}
"""


def _caps(memory: int = 8 * GiB, flags: list[str] | None = None) -> Capabilities:
    return Capabilities(memory_bytes=memory, disk_free_bytes=0, cpu_cores=2, cpu_flags=flags or ["avx2"], arch="x86_64")


def test_a_full_blueprint_parses_and_matches() -> None:
    bp = parse_blueprint(FULL)

    assert bp.name == "tills-berlin" and bp.spec.model.reference == "gemma3-270m@stable"
    assert bp.spec.variant.effective_policy().max_memory_fraction == 0.4
    assert bp.spec.runtime.port == 9000 and bp.spec.adaptations.system_prompt
    sel = bp.spec.selector
    assert sel.matches({"site": "berlin-3"}, _caps(), "x86_64-8gb")
    assert sel.mismatch({"site": "x"}, _caps(), "x86_64-8gb") == "label site=x, selector wants berlin-3"
    assert "memory" in (sel.mismatch({"site": "berlin-3"}, _caps(GiB), "x86_64-8gb") or "")
    assert "avx2" in (sel.mismatch({"site": "berlin-3"}, _caps(flags=["neon"]), "x86_64-8gb") or "")
    assert "device class" in (sel.mismatch({"site": "berlin-3"}, _caps(), "x86_64-2gb") or "")


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        ("spec.runtime.threads: 0", "spec.runtime.threads"),
        ("spec.selector.colour: red", "spec.selector.colour"),
        ("spec.variant.pin: q8_0", "spec.variant: give either pin or policy"),
        ("metadata.name: Bad Name", "metadata.name"),
        ("apiVersion: v2", "apiVersion must be 'slmops/v1'"),
        ("spec.model: null", "spec.model"),
    ],
)
def test_errors_name_the_field_path(mutation: str, expected: str) -> None:
    value = yaml.safe_load(FULL)
    path, _, raw = mutation.partition(": ")
    target = value
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = yaml.safe_load(raw)

    with pytest.raises(BlueprintError) as info:
        parse_blueprint(yaml.safe_dump(value))

    assert expected in str(info.value)


def test_not_yaml_or_not_a_mapping_is_a_clear_error() -> None:
    with pytest.raises(BlueprintError, match="not valid YAML"):
        parse_blueprint("a: [")
    with pytest.raises(BlueprintError, match="must be a mapping"):
        parse_blueprint("- 1")


@given(
    st.lists(st.tuples(st.integers(-5, 5), st.sampled_from("abcdef")), min_size=1, max_size=6, unique_by=lambda t: t[1])
)
def test_precedence_is_highest_priority_then_name(items: list[tuple[int, str]]) -> None:
    blueprints = [
        Blueprint.model_validate(
            {
                "apiVersion": "slmops/v1",
                "kind": "Blueprint",
                "metadata": {"name": n},
                "spec": {"priority": p, "model": {"name": "m"}},
            }
        )
        for p, n in items
    ]
    winner = min(blueprints, key=precedence)
    best = max(p for p, _ in items)

    assert winner.spec.priority == best
    assert winner.name == min(n for p, n in items if p == best)


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sampled_from(["1", "2"]), max_size=3))
def test_the_digest_changes_exactly_when_the_content_changes(labels: dict[str, str]) -> None:
    base = yaml.safe_load(FULL)
    changed = yaml.safe_load(FULL)
    changed["spec"]["selector"]["labels"] = labels

    same = parse_blueprint(yaml.safe_dump(base)).digest == parse_blueprint(yaml.safe_dump(changed)).digest
    assert same == (labels == {"site": "berlin-3"})
