from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from slmops.core.candidates import candidate_from_manifest
from slmops.core.device_profiles import get_profile
from slmops.core.manifest import FileEntry, Manifest, MemoryAtContext, Requirements, SignedManifest, Source
from slmops.optimize.report import pareto_frontier

_DIGEST = "sha256:" + "a" * 64


def _envelope(metrics: dict[str, float]) -> SignedManifest:
    manifest = Manifest(
        name="m",
        version="v2",
        variant="q8_0",
        format="gguf",
        files=[FileEntry(path="m.gguf", digest=_DIGEST, size=1000)],
        requirements=Requirements(
            memory_load_bytes=100,
            memory_run=[
                MemoryAtContext(context_tokens=512, bytes=200),
                MemoryAtContext(context_tokens=4096, bytes=900),
            ],
        ),
        metrics=metrics,
        source=Source(kind="derived"),
        created_at="2025-01-01T00:00:00Z",
    )
    return SignedManifest(manifest=manifest, digest=manifest.digest)


def test_a_candidate_uses_the_profiles_own_measurements() -> None:
    envelope = _envelope(
        {"perplexity": 20.0, "accuracy": 0.8, "peak_rss_bytes": 500.0, "peak_rss_bytes@pi5-8gb": 450.0,
         "decode_tokens_per_s": 30.0, "decode_tokens_per_s@pi5-8gb": 12.0}
    )  # fmt: skip

    pi5 = candidate_from_manifest(envelope, get_profile("pi5-8gb"))
    gateway = candidate_from_manifest(envelope, get_profile("gateway-2gb"))

    assert (pi5.memory_bytes, pi5.decode_tokens_per_s, pi5.perplexity, pi5.label) == (450, 12.0, 20.0, "m@v2 (q8_0)")
    assert (gateway.memory_bytes, gateway.decode_tokens_per_s) == (500, None)  # another class's speed is not used


def test_an_unmeasured_candidate_falls_back_to_the_estimate_at_the_context() -> None:
    envelope = _envelope({})

    assert candidate_from_manifest(envelope, get_profile("pi5-8gb"), context_tokens=2048).memory_bytes == 900
    assert candidate_from_manifest(envelope, get_profile("pi5-8gb"), context_tokens=512).memory_bytes == 200
    assert candidate_from_manifest(envelope, get_profile("pi5-8gb"), context_tokens=8192).memory_bytes == 900


points = st.lists(st.tuples(st.floats(0, 1e6), st.floats(0, 1e6)), min_size=1, max_size=30)


@given(points)
def test_the_pareto_frontier_is_exactly_the_undominated_points(pts: list[tuple[float, float]]) -> None:
    frontier = set(pareto_frontier(pts))

    for i, (x, y) in enumerate(pts):
        strictly_beaten = any((a <= x and b < y) or (a < x and b <= y) for a, b in pts)
        if strictly_beaten:
            assert i not in frontier
    assert frontier  # the smallest point with the lowest y is always on it
    for i in frontier:
        assert not any((a <= pts[i][0] and b < pts[i][1]) for a, b in pts)
