"""Turn registered model versions into variant-chooser candidates for one device class (pure; no I/O).

The optimizer stores its measurements in each variant's manifest metrics: ``perplexity``, ``accuracy``,
``size_bytes``, ``peak_rss_bytes``, ``decode_tokens_per_s`` (measured at the evaluation's own thread count) and, per
device profile, ``peak_rss_bytes@<profile>``, ``decode_tokens_per_s@<profile>``, ... This module reads them back:

- memory: the measured peak RSS for the profile, else the overall measured peak RSS, else the manifest's estimate at
  ``context_tokens`` (the smallest estimated context at least that long, else the largest one, else the load
  estimate);
- decode speed: only the profile's own measurement (``decode_tokens_per_s@<profile>``); a speed measured for another
  thread count is not this class's speed, so it is left unknown;
- runtime: :func:`runtime_of` the manifest (llama.cpp for GGUF, ONNX Runtime GenAI for an ONNX directory with
  ``genai_config.json``, None for what no runtime serves), which the chooser checks against the device's runtimes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from slmops.core.device_profiles import DeviceProfile
from slmops.core.manifest import Manifest, SignedManifest
from slmops.core.selection import VariantCandidate

__all__ = [
    "candidate_from_manifest",
    "candidates_from_manifests",
    "estimated_memory_bytes",
    "pair_candidate",
    "profile_metric",
    "runtime_of",
    "version_label",
]

GENAI_CONFIG_FILE = "genai_config.json"


def runtime_of(manifest: Manifest) -> str | None:
    """The runtime that serves a version (a key of :data:`slmops.core.wire.RUNTIME_FORMATS`), or None."""
    if manifest.format == "gguf":
        return "llama.cpp"
    if manifest.format == "onnx" and any(f.path.rsplit("/", 1)[-1] == GENAI_CONFIG_FILE for f in manifest.files):
        return "onnxruntime-genai"
    return None


def profile_metric(metric: str, profile: str) -> str:
    """The manifest metric key of ``metric`` measured for a device profile, e.g. ``decode_tokens_per_s@pi5-8gb``."""
    return f"{metric}@{profile}"


def estimated_memory_bytes(manifest: Manifest, context_tokens: int) -> int:
    runs = sorted(manifest.requirements.memory_run, key=lambda r: r.context_tokens)
    for run in runs:
        if run.context_tokens >= context_tokens:
            return run.bytes
    if runs:
        return runs[-1].bytes
    return manifest.requirements.memory_load_bytes


def version_label(manifest: Manifest) -> str:
    """``name@vN``, with the variant in parentheses when there is one."""
    label = f"{manifest.name}@{manifest.version}"
    return f"{label} ({manifest.variant})" if manifest.variant else label


def candidate_from_manifest(
    envelope: SignedManifest, profile: DeviceProfile | None = None, context_tokens: int = 2048
) -> VariantCandidate:
    """A chooser candidate for a device profile; without a profile (a real device, not a benchmark class) the
    overall measurements are used: peak RSS, and the decode speed measured at the evaluation's thread count."""
    m = envelope.manifest
    metrics = m.metrics
    if profile is None:
        memory = metrics.get("peak_rss_bytes")
        speed = metrics.get("decode_tokens_per_s")
    else:
        memory = metrics.get(profile_metric("peak_rss_bytes", profile.name), metrics.get("peak_rss_bytes"))
        speed = metrics.get(profile_metric("decode_tokens_per_s", profile.name))
    if memory is not None and memory <= 0:
        memory = None
    return VariantCandidate(
        digest=envelope.digest,
        label=version_label(m),
        size_bytes=m.total_size,
        memory_bytes=int(memory) if memory is not None else estimated_memory_bytes(m, context_tokens),
        perplexity=metrics.get("perplexity"),
        accuracy=metrics.get("accuracy"),
        decode_tokens_per_s=speed,
        runtime=runtime_of(m),
    )


def pair_candidate(
    adapter: SignedManifest, base: SignedManifest, profile: DeviceProfile | None = None, context_tokens: int = 2048
) -> VariantCandidate:
    """A chooser candidate for an adapter version, which runs over its base: size and memory are the pair's, quality
    and speed the adapter's own measurements. The base's memory is its need at the context (as for any version);
    the adapter adds its tensors, i.e. its file bytes (llama.cpp holds them in memory beside the base's weights; the
    context and KV cache are the base's, so an estimate or peak RSS of the adapter's own would count them twice)."""
    own = candidate_from_manifest(adapter, profile, context_tokens)
    under = candidate_from_manifest(base, profile, context_tokens)
    return replace(
        own,
        size_bytes=own.size_bytes + under.size_bytes,
        memory_bytes=adapter.manifest.total_size + under.memory_bytes,
        base_label=under.label,
        base_memory_bytes=under.memory_bytes,
    )


def candidates_from_manifests(
    envelopes: Iterable[SignedManifest], profile: DeviceProfile, context_tokens: int = 2048
) -> list[VariantCandidate]:
    """One candidate per version, in a stable order (by digest); versions of other formats are kept as they are."""
    unique = {e.digest: e for e in envelopes}
    return [candidate_from_manifest(unique[d], profile, context_tokens) for d in sorted(unique)]
