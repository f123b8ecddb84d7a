from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmops.core.blueprint import Blueprint
from slmops.core.desired import (
    AppliedBlueprint,
    DeviceFacts,
    ModelCandidates,
    desired_state,
    memory_needed,
)
from slmops.core.manifest import (
    FileEntry,
    Lineage,
    Manifest,
    MemoryAtContext,
    Requirements,
    SignedManifest,
    Source,
)
from slmops.core.wire import Capabilities

GiB = 1 << 30


def _envelope(
    version: int, variant: str | None, peak_gib: float | None, ppl: float, parent: str | None = None
) -> SignedManifest:
    metrics = {"perplexity": ppl}
    if peak_gib is not None:
        metrics["peak_rss_bytes"] = peak_gib * GiB
    manifest = Manifest(
        name="m",
        version=f"v{version}",
        variant=variant,
        format="gguf",
        files=[
            FileEntry(path="m.gguf", digest="sha256:" + hashlib.sha256(str(version).encode()).hexdigest(), size=version)
        ],
        requirements=Requirements(
            memory_load_bytes=GiB,
            memory_run=[
                MemoryAtContext(context_tokens=512, bytes=2 * GiB),
                MemoryAtContext(context_tokens=4096, bytes=3 * GiB),
            ],
        ),
        metrics=metrics,
        lineage=Lineage(parents=[parent] if parent else []),
        source=Source(kind="file"),
        created_at="2025-01-01T00:00:00Z",
    )
    return SignedManifest(manifest=manifest, digest=manifest.digest)


BASE = _envelope(1, None, 6, 10.0)
Q8 = _envelope(2, "q8_0", 3, 11.0, BASE.digest)
Q4 = _envelope(3, "q4_k_m", 0.8, 13.0, BASE.digest)
FOUND = {"m@latest": ModelCandidates(versions=(BASE, Q8, Q4), base_digest=BASE.digest)}


def _bp(name: str = "all", priority: int = 0, spec: dict[str, object] | None = None) -> AppliedBlueprint:
    value = {"priority": priority, "model": {"name": "m"}, **(spec or {})}
    return AppliedBlueprint(
        Blueprint.model_validate(
            {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": name}, "spec": value}
        ),
        1,
    )


def _device(memory_gib: float, labels: dict[str, str] | None = None) -> DeviceFacts:
    caps = Capabilities(memory_bytes=int(memory_gib * GiB), disk_free_bytes=0, cpu_cores=2, arch="x86_64")
    return DeviceFacts("dev-1", labels or {}, caps, "x86_64-8gb")


@pytest.mark.parametrize(("memory_gib", "expected"), [(2, Q4), (8, Q8), (16, BASE), (1, None)])
def test_the_best_variant_that_fits_half_the_memory_is_chosen(
    memory_gib: float, expected: SignedManifest | None
) -> None:
    state = desired_state(_device(memory_gib), [_bp()], FOUND)

    assert (state.model.digest if state.model else None) == (expected.digest if expected else None)
    assert state.blueprint == "all@1"
    assert (
        ("does not fit" in state.reason or "no variant fits" in state.reason)
        if expected is None
        else "fits" in state.reason
    )


def test_a_pin_wins_over_memory_and_an_unknown_pin_says_what_exists() -> None:
    pinned = desired_state(_device(16), [_bp(spec={"variant": {"pin": "q4_k_m"}})], FOUND)
    unknown = desired_state(_device(16), [_bp(spec={"variant": {"pin": "int3"}})], FOUND)

    assert pinned.model is not None and pinned.model.digest == Q4.digest
    assert unknown.model is None and "m@v2 (q8_0)" in unknown.reason


def test_the_highest_priority_blueprint_wins_and_the_reason_says_over_which() -> None:
    low = _bp("a-low", 1, {"variant": {"pin": "v1"}})
    high = _bp("z-high", 5, {"variant": {"pin": "q8_0"}, "selector": {"labels": {"ring": "canary"}}})

    canary = desired_state(_device(16, {"ring": "canary"}), [low, high], FOUND)
    other = desired_state(_device(16), [low, high], FOUND)

    assert canary.blueprint == "z-high@1" and "wins over a-low@1" in canary.reason
    assert other.blueprint == "a-low@1"
    assert desired_state(_device(16), [], FOUND).reason == "no blueprint matches this device"


def test_memory_needed_prefers_measurements_then_the_estimate_at_the_context() -> None:
    unmeasured = _envelope(4, None, None, 9.0).manifest

    assert memory_needed(Q8.manifest, 2048) == 3 * GiB
    assert memory_needed(unmeasured, 512) == 2 * GiB
    assert memory_needed(unmeasured, 1024) == 3 * GiB
    assert memory_needed(unmeasured, 65536) == 3 * GiB  # beyond every estimate: the largest one


@given(st.floats(0.5, 64), st.sampled_from([None, "q8_0", "v1"]), st.integers(-3, 3))
def test_generation_is_a_stable_hash_of_the_content(memory_gib: float, pin: str | None, priority: int) -> None:
    spec: dict[str, object] = {"variant": {"pin": pin}} if pin else {}
    blueprints = [_bp("x", priority, spec), _bp("y", 0)]

    first = desired_state(_device(memory_gib), blueprints, FOUND)
    second = desired_state(_device(memory_gib), list(reversed(blueprints)), FOUND)
    other_runtime = desired_state(
        _device(memory_gib), [_bp("x", priority, {**spec, "runtime": {"threads": 7}}), _bp("y", 0)], FOUND
    )

    assert first == second and len(first.generation) == 32
    if first.blueprint == "x@1":
        assert other_runtime.generation != first.generation


@given(st.floats(0.1, 64))
def test_a_chosen_variant_always_fits_the_policy_budget(memory_gib: float) -> None:
    state = desired_state(_device(memory_gib), [_bp()], FOUND)
    if state.model is not None:
        assert memory_needed(state.model.envelope.manifest, 2048) <= memory_gib * GiB * 0.5
