"""Site adaptations resolved against blueprint limits (pure), and adapter versions in desired state."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from slmops.core.adaptation import LocalLimits, Sampling, SamplingBounds, SiteAdaptation
from slmops.core.blueprint import Blueprint
from slmops.core.desired import AppliedBlueprint, DeviceFacts, ModelCandidates, desired_state
from slmops.core.manifest import FileEntry, Lineage, Manifest, ModelFacts, Requirements, SignedManifest, Source
from slmops.core.sites import AdapterOption, resolve
from slmops.core.wire import Capabilities

GiB = 1 << 30
LIMITS = LocalLimits(
    adapters=["lora-shop"],
    system_prompt_max_chars=20,
    sampling=SamplingBounds(temperature=(0.0, 1.0), top_p=(0.5, 1.0), max_tokens=(1, 256)),
)
SHOP_V1 = AdapterOption("lora-shop", "sha256:" + "a" * 64, "m@v5 (lora-shop)", "sha256:" + "1" * 64, "m@v1", 5)


def test_values_within_limits_are_kept() -> None:
    site = SiteAdaptation(
        adapter="lora-shop", system_prompt="Be brief.", sampling=Sampling(temperature=0.3, top_p=0.9, max_tokens=64)
    )

    local = resolve(LIMITS, "berlin", site, [SHOP_V1], base_digest=SHOP_V1.base_digest, base_label="m@v1")

    assert local.site == "berlin" and local.adapter == "lora-shop" and local.system_prompt == "Be brief."
    assert local.sampling == Sampling(temperature=0.3, top_p=0.9, max_tokens=64)
    assert local.bounds == LIMITS.sampling and local.dropped == []


def test_what_exceeds_the_limits_is_dropped_with_a_reason() -> None:
    site = SiteAdaptation(
        adapter="lora-other", system_prompt="x" * 21, sampling=Sampling(temperature=1.5, top_p=0.9, max_tokens=64)
    )

    local = resolve(LIMITS, "berlin", site, [SHOP_V1], base_digest=SHOP_V1.base_digest, base_label="m@v1")

    assert local.adapter is None and local.system_prompt is None
    assert local.sampling == Sampling(top_p=0.9, max_tokens=64)
    assert local.dropped == [
        "system prompt: 21 characters, more than the 20 the blueprint allows",
        "temperature 1.5: outside the blueprint's bounds [0, 1]",
        "adapter lora-other: the blueprint does not allow it (spec.local.adapters: lora-shop)",
    ]


def test_an_adapter_for_another_base_is_dropped_naming_both_bases() -> None:
    site = SiteAdaptation(adapter="lora-shop")

    local = resolve(LIMITS, "berlin", site, [SHOP_V1], base_digest="sha256:" + "2" * 64, base_label="m@v2")

    assert local.adapter is None
    assert local.dropped == ["adapter lora-shop was trained for m@v1, the device now runs m@v2"]


def test_default_limits_grant_nothing() -> None:
    site = SiteAdaptation(system_prompt="hi", sampling=Sampling(temperature=0.5))

    local = resolve(LocalLimits(), "berlin", site)

    assert local.system_prompt is None and local.sampling == Sampling()
    assert len(local.dropped) == 2 and "allows no site system prompt" in local.dropped[0]
    assert "sets no bounds for temperature" in local.dropped[1]


_bounds = st.tuples(st.floats(0, 2), st.floats(0, 2)).map(lambda p: (min(p), max(p)))
_top_p_bounds = st.tuples(st.floats(0.01, 1), st.floats(0.01, 1)).map(lambda p: (min(p), max(p)))
_token_bounds = st.tuples(st.integers(1, 4096), st.integers(1, 4096)).map(lambda p: (min(p), max(p)))


@given(
    limits=st.builds(
        LocalLimits,
        adapters=st.lists(st.sampled_from(["a", "b", "lora-shop"]), max_size=3),
        system_prompt_max_chars=st.integers(0, 50),
        sampling=st.builds(
            SamplingBounds,
            temperature=st.none() | _bounds,
            top_p=st.none() | _top_p_bounds,
            max_tokens=st.none() | _token_bounds,
        ),
    ),
    site=st.builds(
        SiteAdaptation,
        adapter=st.none() | st.sampled_from(["a", "b", "lora-shop", "zzz"]),
        system_prompt=st.none() | st.text(max_size=80),
        sampling=st.builds(
            Sampling,
            temperature=st.none() | st.floats(0, 2),
            top_p=st.none() | st.floats(0.01, 1),
            max_tokens=st.none() | st.integers(1, 8192),
        ),
    ),
    base=st.sampled_from([SHOP_V1.base_digest, "sha256:" + "2" * 64, None]),
)
def test_resolved_values_always_lie_within_the_limits(
    limits: LocalLimits, site: SiteAdaptation, base: str | None
) -> None:
    local = resolve(limits, "s", site, [SHOP_V1], base_digest=base, base_label="m@v?")

    if local.system_prompt is not None:
        assert 0 < len(local.system_prompt) <= limits.system_prompt_max_chars
    for name in ("temperature", "top_p", "max_tokens"):
        value = getattr(local.sampling, name)
        bounds = getattr(limits.sampling, name)
        if value is not None:
            assert bounds is not None and bounds[0] <= value <= bounds[1]
    if local.adapter is not None:
        assert local.adapter in limits.adapters and local.adapter == SHOP_V1.name and base == SHOP_V1.base_digest
    asked = [site.adapter, site.system_prompt or None, *site.sampling.model_dump().values()]
    kept = [local.adapter, local.system_prompt, *local.sampling.model_dump().values()]
    assert sum(v is not None for v in asked) == sum(v is not None for v in kept) + len(local.dropped)
    assert local.bounds == limits.sampling


# ------------------------------------------------------------------------------------------ desired state


def _envelope(
    version: int,
    variant: str | None,
    load_gib: float,
    parent: str | None = None,
    adapter_of: str | None = None,
    perplexity: float = 12.0,
) -> SignedManifest:
    details = {"adapter": {"type": "lora", "base": adapter_of}} if adapter_of else {}
    size = 1000 * version
    manifest = Manifest(
        name="m",
        version=f"v{version}",
        variant=variant,
        format="gguf",
        files=[
            FileEntry(path="m.gguf", digest="sha256:" + hashlib.sha256(str(version).encode()).hexdigest(), size=size)
        ],
        facts=ModelFacts(details=details),
        requirements=Requirements(memory_load_bytes=int(load_gib * GiB)),
        metrics={"perplexity": perplexity},
        lineage=Lineage(parents=[parent] if parent else []),
        source=Source(kind="file"),
        created_at="2025-01-01T00:00:00Z",
    )
    return SignedManifest(manifest=manifest, digest=manifest.digest)


V1 = _envelope(1, None, 2)
V2 = _envelope(2, None, 2)
SHOP = _envelope(3, "lora-shop", 0.001, V1.digest, V1.digest, perplexity=9.0)  # trained for v1, better than it


def _blueprint(ref: str, local: dict[str, object] | None = None, pin: str | None = None) -> AppliedBlueprint:
    spec: dict[str, object] = {"model": {"name": "m", "ref": ref}, "local": local or {}}
    if pin:
        spec["variant"] = {"pin": pin}
    return AppliedBlueprint(
        Blueprint.model_validate(
            {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": "b"}, "spec": spec}
        ),
        1,
    )


def _device(site: str, memory_gib: float = 8) -> DeviceFacts:
    caps = Capabilities(memory_bytes=int(memory_gib * GiB), disk_free_bytes=0, cpu_cores=2)
    return DeviceFacts(f"dev-{site}", {"site": site}, caps, "x86_64-8gb")


def _found(base: SignedManifest, *versions: SignedManifest) -> ModelCandidates:
    return ModelCandidates(versions=(base, *versions), base_digest=base.digest, bases={V1.digest: V1}, adapters=(SHOP,))


def test_a_sites_adapter_becomes_the_desired_model_with_its_base() -> None:
    blueprint = _blueprint("v1", {"adapters": ["lora-shop"]})
    found = {"m@v1": _found(V1, SHOP)}
    sites = {"shop": SiteAdaptation(adapter="lora-shop")}

    shop = desired_state(_device("shop"), [blueprint], found, sites)
    other = desired_state(_device("office"), [blueprint], found, sites)

    assert shop.model is not None and shop.model.digest == SHOP.digest
    assert shop.model.base is not None and shop.model.base.digest == V1.digest
    assert shop.local.adapter == "lora-shop" and "adds adapter lora-shop" in shop.reason
    assert other.model is not None and other.model.digest == V1.digest and other.model.base is None
    assert other.local.adapter is None and other.local.site == "office"


def test_a_site_change_changes_only_that_sites_generation() -> None:
    blueprint = _blueprint("v1", {"system_prompt_max_chars": 100})
    found = {"m@v1": _found(V1)}
    before = {"shop": SiteAdaptation(system_prompt="Hello")}
    after = {"shop": SiteAdaptation(system_prompt="Hello there")}

    shop = [desired_state(_device("shop"), [blueprint], found, s).generation for s in (before, after)]
    office = [desired_state(_device("office"), [blueprint], found, s).generation for s in (before, after)]

    assert shop[0] != shop[1]
    assert office[0] == office[1]


def test_a_new_base_drops_the_sites_adapter_with_the_reason() -> None:
    blueprint = _blueprint("v2", {"adapters": ["lora-shop"]})
    found = {"m@v2": ModelCandidates(versions=(V2,), base_digest=V2.digest, bases={V1.digest: V1}, adapters=(SHOP,))}

    state = desired_state(_device("shop"), [blueprint], found, {"shop": SiteAdaptation(adapter="lora-shop")})

    assert state.model is not None and state.model.digest == V2.digest and state.model.base is None
    assert state.local.dropped == ["adapter lora-shop was trained for m@v1, the device now runs m@v2"]


def test_an_adapter_whose_pair_does_not_fit_is_not_chosen() -> None:
    blueprint = _blueprint(SHOP.digest)  # a release or alias naming the adapter itself
    found = {f"m@{SHOP.digest}": ModelCandidates(versions=(SHOP,), base_digest=SHOP.digest, bases={V1.digest: V1})}

    small = desired_state(_device("shop", memory_gib=2), [blueprint], found)
    large = desired_state(_device("shop", memory_gib=8), [blueprint], found)

    assert small.model is None
    assert "no variant fits" in small.reason
    assert (
        "m@v3 (lora-shop) does not fit: needs 2.00 GiB (its base m@v1 2.00 GiB + the adapter 0.00 GiB)" in small.reason
    )
    assert large.model is not None and large.model.digest == SHOP.digest
    assert large.model.base is not None and large.model.base.digest == V1.digest


def test_a_pinned_adapter_carries_its_base_and_adapters_are_not_chosen_automatically() -> None:
    found = {"m@v1": _found(V1, SHOP)}

    pinned = desired_state(_device("shop"), [_blueprint("v1", pin="lora-shop")], found)
    automatic = desired_state(_device("shop"), [_blueprint("v1")], found)

    assert pinned.model is not None and pinned.model.digest == SHOP.digest and pinned.model.base == V1
    assert automatic.model is not None and automatic.model.digest == V1.digest
